"""Every run writes its timeline picture, its trace and report.html; mode=report redraws them."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import planfile, spans, timeline
from runner.cluster import ClusterInfo
from runner.plan import Plan, StagePlan
from runner.resources import Resources
from runner.schema import StageSpec
from runner.store import Ledger, UnitRow, UnitState


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.usefixtures("ray_session")
def test_a_run_writes_picture_trace_and_report_and_mode_report_redraws_them(
    cli, tmp_path: Path
) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.max_failures=2",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        "+pipeline.stages.work.worker.fail=[1]",
    )
    assert res.code == 0, res.text
    picture, trace, page = (tmp_path / n for n in ("timeline.png", "trace.json", "report.html"))
    assert f"timeline: {picture}" in res.out
    assert f"trace: {trace}" in res.out
    assert f"report: {page}" in res.out
    width, height = png_size(picture)
    assert width > 1000 and height > 200
    html = page.read_text()
    assert "<h2>Failures</h2>" in html and "<td>work</td>" in html and "<td>failed</td>" in html

    for path in (picture, trace, page):
        path.unlink()
    again = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=report")
    assert again.code == 0
    for path in (picture, trace, page):
        assert f"wrote {path}" in again.out
        assert path.exists()


def test_report_before_any_run_says_so(cli, tmp_path: Path) -> None:
    res = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=report")
    assert res.code == 0
    assert "no run to draw yet" in res.out


def many_lanes(path: Path, lanes: int) -> Ledger:
    """A ledger of one pool stage whose `lanes` workers on 4 hosts each ran two items."""
    ledger = Ledger(path / "ledger.sqlite")
    started = ledger.start_run()
    ledger.save_stage("check", "pool", "fp", {}, "done", started, started + 60)
    rows = []
    for i in range(lanes):
        worker = f"host{i % 4}:{1000 + i}"
        for j in range(2):
            state = UnitState.failed if i == 7 and j == 1 else UnitState.done
            t = started + i * 0.01 + j * 5
            rows.append(UnitRow("check", f"item{i}-{j}", "fp", state, 1, t, t + 4, 4, worker))
    ledger.write(rows)
    return ledger


def test_a_500_lane_run_is_drawn_in_grouped_rows_without_dropping_a_lane(tmp_path: Path) -> None:
    view = spans.read(many_lanes(tmp_path, 500))
    drawing = timeline.draw(view, "many", tmp_path / "timeline.png")
    assert drawing.lanes == 500
    assert sum(row.tracks for row in drawing.rows) == 500
    assert len(drawing.rows) <= timeline.MAX_ROWS and drawing.grouped
    assert drawing.bars == 1000
    assert {row.node for row in drawing.rows} == {f"host{n}" for n in range(4)}
    assert "check: " in drawing.rows[0].label and drawing.rows[0].label.endswith(" lanes")
    assert png_size(drawing.path)[1] > 300


def test_a_small_run_gets_one_row_per_lane_named_after_its_worker(tmp_path: Path) -> None:
    view = spans.read(many_lanes(tmp_path, 6))
    drawing = timeline.draw(view, "few", tmp_path / "timeline.png")
    assert [r.tracks for r in drawing.rows] == [1] * 6 and not drawing.grouped
    assert drawing.rows[0].label == "check/host0:1000"


def test_a_stage_of_many_units_is_drawn_as_runs_of_back_to_back_units(tmp_path: Path) -> None:
    """A million pool items cannot be told apart on a screen: above DETAIL_LIMIT units, a
    worker's back-to-back units of one state are one slice; a failure keeps its own."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start_run()
    ledger.save_stage("check", "pool", "fp", {}, "done", 0.0)
    n, started = spans.DETAIL_LIMIT + 1000, 1_000_000.0
    failing = n // 2 + 1  # an odd one, on worker 1, half way
    rows = []
    for i in range(n):
        worker = f"host:{i % 2}"
        t = started + (i // 2) * 0.001
        state = UnitState.failed if i == failing else UnitState.done
        rows.append(UnitRow("check", f"item{i}", "fp", state, 1, t, t + 0.001, 0.001, worker))
    ledger.write(rows)
    view = spans.read(ledger, since=0.0)
    # worker 0: one run; worker 1: a run, the failure, a run
    assert sorted(s.state for s in view.slices) == ["done", "done", "done", "failed"]
    assert (
        sum(int(s.unit.split("(")[1].split()[0]) if "(" in s.unit else 1 for s in view.slices) == n
    )
    drawing = timeline.draw(view, "many units", tmp_path / "timeline.png")
    assert drawing.bars == 4


def test_a_stage_whose_kind_draws_each_unit_on_a_track_of_its_own_is_drawn_so_from_its_plan(
    tmp_path: Path,
) -> None:
    """The picture and the trace read which stages draw each unit on its own track (a role
    replica's, across its attempts) from `plan.json`, as the stage's kind declared it
    (`StageKind.unit_tracks`), whatever the kind is called; other stages by worker."""
    ledger = many_lanes(tmp_path, 3)
    stage = StagePlan("check", "pool", StageSpec(kind="pool"), "fp", {}, [], unit_tracks=True)
    cluster = ClusterInfo((Resources(cpus=2),), "here")
    planfile.record(Plan("p", cluster, {"check": stage}), tmp_path / planfile.PLAN_FILE)
    record = planfile.load(tmp_path / planfile.PLAN_FILE)
    assert record is not None and record.unit_tracks == {"check"}
    own = {s.track for s in spans.read(ledger, record).slices}
    assert own == {f"check/item{i}-{j}" for i in range(3) for j in range(2)}
    by_worker = {s.track for s in spans.read(ledger).slices}
    assert by_worker == {f"check/host{i}:{1000 + i}" for i in range(3)}
