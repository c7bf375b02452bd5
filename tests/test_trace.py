"""The rlhf example's run artifacts: trace.json is a Chrome trace-event file (Perfetto,
chrome://tracing) of what ran where; report.html holds the stage, failure and plan tables."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from runner.cli import main
from runner.store import read_ledger
from tests.conftest import ROOT, TEST_SPECS


@pytest.fixture(scope="module")
def rlhf(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the rlhf example. On a quiet machine train preempts a rollout (a label rule)
    and the burst the other (same pool); under load the rollouts may finish before train is
    admitted: the tests hold the records against each other, not against that timing."""
    run_dir = tmp_path_factory.mktemp("rlhf")
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        code = main(
            [
                "--config-dir",
                str(TEST_SPECS),
                "run.progress=off",
                "pipeline=rlhf",
                f"run.dir={run_dir}",
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    return run_dir


def trace_events(run_dir: Path) -> list[dict[str, Any]]:
    events = json.loads((run_dir / "trace.json").read_text())
    assert isinstance(events, list)  # an array, like `ray timeline`, so the two concatenate
    for e in events:
        assert {"name", "ph", "pid"} <= e.keys()
        assert e["ph"] in ("X", "i", "C", "M")
    return events


def test_the_rlhf_trace_has_a_slice_per_attempt_and_an_instant_per_preemption(
    rlhf: Path,
) -> None:
    tmp_path = rlhf
    events = trace_events(tmp_path)
    ledger = read_ledger(tmp_path)
    assert ledger is not None
    run = ledger.last_run()
    assert run is not None
    rows = list(ledger.rows("rlhf"))
    recorded = ledger.events()
    preempted_attempts = [e for e in recorded if e["kind"] == "attempt"]

    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(rows) + len(preempted_attempts)
    for s in slices:
        assert isinstance(s["ts"], int) and s["dur"] > 0
        # microseconds since the epoch, Ray's clock: within the run
        assert run["started"] * 1e6 <= s["ts"] <= (run["started"] + 600) * 1e6
        assert {"stage", "state", "attempts", "node"} <= s["args"].keys()
    assert sorted(s["name"] for s in slices if s["args"]["state"] == "done") == sorted(
        r.unit for r in rows
    )
    assert sum(s["args"]["state"] == "preempted" for s in slices) == len(preempted_attempts)

    preemptions = [e for e in events if e["ph"] == "i" and e["cat"] == "preempted"]
    by_reason = {r: n for r, n in res_reasons(tmp_path).items() if n}
    assert sorted(e["args"]["reason"] for e in preemptions) == sorted(
        r for r, n in by_reason.items() for _ in range(n)
    )

    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert any(n.startswith("Node ") for n in names)
    threads = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {f"rlhf/{r.unit}" for r in rows}  # a track per replica, and no other
    cpu = [e for e in events if e["ph"] == "C" and e["name"] == "CPU in use"]
    assert cpu and all(e["args"]["capacity"] == 2 for e in cpu)
    assert max(e["args"]["in use"] for e in cpu) <= 2


def res_reasons(run_dir: Path, stage: str = "rlhf") -> dict[str, int]:
    return stage_summary(run_dir, stage)["preemptions"]


def stage_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary["stages"][stage]


def stage_row(page: str, stage: str, kind: str, requeues: int, reasons: dict[str, int]) -> str:
    """The start of a stage's row in report.html: state, units by state, requeues and
    preemptions by reason, as summary.json gives them (the reasons that chose a victim)."""
    by_reason = ", ".join(f"{r}: {n}" for r, n in reasons.items() if n) or "-"
    found = re.search(
        f"<tr><td>{stage}</td><td>{kind}</td><td>done</td><td>done: (\\d+)</td>"
        f'<td class="n">{requeues}</td><td>{by_reason}</td>',
        page,
    )
    assert found is not None, page.split("<h2>Stages</h2>")[1].split("</table>")[0]
    return found.group(1)


def test_the_rlhf_report_holds_the_stage_slowest_failure_and_plan_tables(rlhf: Path) -> None:
    page = (rlhf / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    assert "exit code 0;" in page  # the run's own exit code, recorded before the report
    for heading in ("Stages", "Timeline", "Slowest units", "Failures", "Plan"):
        assert f"<h2>{heading}</h2>" in page
    stage = stage_summary(rlhf, "rlhf")
    assert stage_row(page, "rlhf", "roles", stage["requeues"], stage["preemptions"]) == "5"
    assert stage["requeues"] == sum(stage["preemptions"].values())  # every requeue a preemption
    assert "10: " in page and "s mean" in page  # waiting time of the priority-10 role
    assert "CPUs held " in page
    assert '<img alt="timeline" src="data:image/png;base64,iVBOR' in page
    assert '<tr><td>run</td><td>new</td><td class="n">5</td></tr>' in page
    assert "train replica: 1 CPU each; 1 wanted, 1 fit at once" in page


def test_a_replica_preempted_before_it_started_is_one_requeue_in_summary_and_report(
    ray_session: str, cli, tmp_path: Path
) -> None:
    """Train arrives while the rollout's actor is still being built: the rollout is preempted
    before it ran, and queued again. summary.json and report.html read that one number from
    one record, so they say the same."""
    res = cli(
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.roles.rollout.actor._target_=tests.workers.SlowStart",
        "+pipeline.stages.work.roles.rollout.actor.start_seconds=2",
        "pipeline.stages.work.roles.train.start_after=0.3",
    )
    assert res.code == 0, res.text
    stage = stage_summary(tmp_path, "work")
    assert stage["preemptions"] == {"label": 1, "same_pool": 0, "cross_pool": 0}
    assert stage["requeues"] == 1
    assert "work: preemptions: label 1, same_pool 0, cross_pool 0; requeues 1;" in res.out
    page = (tmp_path / "report.html").read_text()
    assert stage_row(page, "work", "roles", 1, stage["preemptions"]) == "2"
