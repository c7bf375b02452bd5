"""The pool stage on a real Ray: results, resume, fingerprints, timeouts, crashes, failures."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pandas as pd
import pytest

from tests import workers
from tests.conftest import attempt, cpus_free_again, summary, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


def results(run_dir: Path, stage: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / stage / "results.parquet")


def test_a_pipeline_runs_and_writes_every_result_once_in_the_items_order(
    cli, tmp_path: Path
) -> None:
    res = cli("pipeline=numbers", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    scaled = results(tmp_path, "scale")
    assert list(scaled["id"]) == [str(i) for i in range(50)]
    assert (scaled["result"] == scaled["input"] * 3).all()
    assert set(scaled["status"]) == {"done"}
    described = results(tmp_path, "describe")
    # a stage `from:` another keeps its order: 0, 1, 2, ..., 10, not the text order 0, 1, 10
    assert list(described["id"]) == [str(i) for i in range(50)]
    assert described.set_index("id").loc["7", "result"] == {"value": 21, "even": False, "digits": 2}
    stages = summary(tmp_path)["stages"]
    assert stages["scale"]["done"] == 50 and stages["describe"]["done"] == 50
    assert "run succeeded" in res.err + res.out
    wait_until(cpus_free_again, what="every worker actor to be gone")


def test_a_rerun_skips_finished_work_and_resource_changes_rerun_nothing(cli, tmp_path) -> None:
    assert cli("pipeline=numbers", f"run.dir={tmp_path}").code == 0
    again = cli(
        "pipeline=numbers",
        f"run.dir={tmp_path}",
        "pipeline.stages.scale.num_workers=1",
        "mode=plan",
    )
    assert "skip     50  done" in again.out
    assert "run " not in again.out.split("stage scale")[1].split("stage")[0]
    rerun = cli("pipeline=numbers", f"run.dir={tmp_path}", "pipeline.stages.scale.num_workers=1")
    assert rerun.code == 0
    assert attempt(tmp_path)["stages"]["scale"]["skipped"] == 50
    assert attempt(tmp_path)["stages"]["describe"]["skipped"] == 50


def test_changing_a_worker_argument_reruns_the_stage_and_what_needs_it(cli, tmp_path) -> None:
    assert cli("pipeline=numbers", f"run.dir={tmp_path}").code == 0
    plan = cli(
        "pipeline=numbers",
        f"run.dir={tmp_path}",
        "pipeline.stages.scale.worker.factor=4",
        "mode=plan",
    )
    assert "run      50  changed: pipeline.stages.scale.worker.factor" in plan.out
    assert "run all: known when 'scale' has run" in plan.out
    assert (
        cli("pipeline=numbers", f"run.dir={tmp_path}", "pipeline.stages.scale.worker.factor=4").code
        == 0
    )
    assert (results(tmp_path, "scale")["result"] == results(tmp_path, "scale")["input"] * 4).all()
    assert summary(tmp_path)["stages"]["describe"]["done"] == 50
    replan = cli(
        "pipeline=numbers",
        f"run.dir={tmp_path}",
        "pipeline.stages.scale.worker.factor=4",
        "mode=plan",
    )
    assert "skip     50  done" in replan.out.split("stage describe")[1]


def test_fresh_reruns_everything(cli, tmp_path: Path) -> None:
    assert cli("pipeline=numbers", f"run.dir={tmp_path}").code == 0
    plan = cli("pipeline=numbers", f"run.dir={tmp_path}", "run.fresh=true", "mode=plan")
    assert "run      50  fresh run" in plan.out


def test_an_item_past_step_timeout_is_recorded_and_its_worker_freed(cli, tmp_path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "+pipeline.stages.work.step_timeout=1",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.hang=[3]",
        "pipeline.stages.work.max_failures=1",
    )
    assert res.code == 0, res.text
    table = results(tmp_path, "work").set_index("id")
    assert table.loc["3", "status"] == "timeout"
    assert table.loc["3", "error"] == "step_timeout 1s exceeded"
    assert table.loc["3", "attempts"] == 1
    assert (table.drop("3")["status"] == "done").all()
    hung_pid = int(table.loc["3", "worker"].rsplit(":", 1)[1])
    wait_until(lambda: not Path(f"/proc/{hung_pid}").exists(), what="the hung worker to exit")
    wait_until(cpus_free_again, what="its CPUs to be free")


def test_a_crashed_worker_is_replaced_and_only_its_item_spends_retries(cli, tmp_path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.max_failures=1",
        "pipeline.stages.work.worker._target_=tests.workers.Crashy",
        "+pipeline.stages.work.worker.crash=[5]",
    )
    assert res.code == 0, res.text
    table = results(tmp_path, "work").set_index("id")
    assert table.loc["5", "status"] == "failed"
    assert table.loc["5", "attempts"] == 2  # retries: 1
    assert "worker process died" in table.loc["5", "error"]
    others = table.drop("5")
    assert (others["status"] == "done").all()
    assert (others["result"] == others["input"]).all()


def test_failures_beyond_max_failures_exit_1_after_all_other_work(cli, tmp_path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        "+pipeline.stages.work.worker.fail=[2,4]",
    )
    assert res.code == 1
    # the first failure (of two workers: 2 or 4) is said where the run ends, with where the
    # others are
    assert re.search(
        r"work: 2 item\(s\) failed or timed out; max_failures allows 0; the first: ([24]): "
        r"ValueError: bad item \1 \(mode=status lists all; tracebacks in "
        + re.escape(f"{tmp_path}/work/logs/)"),
        res.text,
    ), res.text
    table = results(tmp_path, "work").set_index("id")
    error = table.loc["2", "error"].splitlines()
    assert error[0] == "ValueError: bad item 2"
    lines, first = inspect.getsourcelines(workers.Faulty)  # wherever workers.py has it
    raise_line = first + next(i for i, line in enumerate(lines) if "raise ValueError" in line)
    assert error[-1].endswith(f"tests/workers.py:{raise_line} in __call__")  # its last frame
    assert table.loc["2", "attempts"] == 2
    assert (table.drop(["2", "4"])["status"] == "done").all()
    status = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=status")
    assert "units not done (2):" in status.out
    assert "ValueError: bad item 4" in status.out
    # where the rest of the story is: the whole traceback is in the worker's log
    logs = tmp_path / "work" / "logs"
    assert f"whole tracebacks and worker output in {logs}/" in status.out
    text = "".join(p.read_text() for p in logs.glob("worker-*.log"))
    assert "item 2 failed:\nTraceback (most recent call last):" in text
    assert 'raise ValueError(f"bad item {item}")' in text


def test_max_failures_as_a_fraction_tolerates_some(cli, tmp_path: Path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.max_failures=0.2",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        "+pipeline.stages.work.worker.fail=[2,4]",
    )
    assert res.code == 0, res.text


def test_a_worker_that_cannot_start_fails_its_stage_with_the_reason(cli, tmp_path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.BrokenInit",
    )
    assert res.code == 1
    assert "worker tests.workers.BrokenInit failed to start" in res.text
    assert "model.bin not found" in res.text


def test_a_second_runner_on_the_same_run_dir_stops_at_once(cli, tmp_path: Path) -> None:
    from runner.store import RunStore

    holder = RunStore(tmp_path)
    holder.open()
    try:
        res = cli("pipeline=numbers", f"run.dir={tmp_path}")
    finally:
        holder.close()
    assert res.code == 2
    assert f"run directory {tmp_path} is in use by another runner" in res.err


def test_items_from_a_list_a_glob_and_a_csv(cli, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for n in range(3):
        (tmp_path / "in" / f"f{n}.txt").write_text("x")
    pd.DataFrame({"key": ["a", "b"], "n": [1, 2]}).to_csv(tmp_path / "rows.csv", index=False)
    for items, ids in (
        ("{list: [10, 20]}", ["0", "1"]),
        (f"{{glob: '{tmp_path}/in/*.txt'}}", [f"{tmp_path}/in/f{n}.txt" for n in range(3)]),
        (f"{{file: '{tmp_path}/rows.csv', id: key}}", ["a", "b"]),
    ):
        run_dir = tmp_path / f"run{len(ids)}{ids[0][-1]}"
        res = cli(
            "pipeline=misbehave",
            f"run.dir={run_dir}",
            "~pipeline.stages.work.items",
            f"+pipeline.stages.work.items={items}",
        )
        assert res.code == 0, res.text
        assert list(results(run_dir, "work")["id"]) == ids


def test_status_reports_the_ledger(cli, tmp_path: Path) -> None:
    empty = cli("pipeline=numbers", f"run.dir={tmp_path}", "mode=status")
    assert "no run yet" in empty.out
    cli("pipeline=numbers", f"run.dir={tmp_path}")
    status = cli("pipeline=numbers", f"run.dir={tmp_path}", "mode=status")
    assert status.code == 0
    lines = [ln.split() for ln in status.out.splitlines()]
    assert lines[2][:7] == ["scale", "pool", "done", "50", "0", "0", "0"]


def test_a_finished_stage_given_more_items_runs_only_the_new_ones(cli, tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"n": {n}}}\n' for n in range(12)))
    args = (
        "pipeline=misbehave",
        f"run.dir={tmp_path / 'run'}",
        "~pipeline.stages.work.items",
        f"+pipeline.stages.work.items={{file: '{items}'}}",
    )
    assert cli(*args).code == 0
    items.write_text("".join(f'{{"n": {n}}}\n' for n in range(15)))
    plan = cli(*args, "mode=plan")
    assert "skip     12  done" in plan.out
    assert "run       3  new                      [12, 13, 14]" in plan.out
    assert cli(*args).code == 0
    again = cli(*args, "mode=plan")
    assert "skip     15  done" in again.out
    assert sorted(results(tmp_path / "run", "work")["id"].astype(int)) == list(range(15))


def test_status_of_many_unfinished_units_shows_a_page_and_the_count(cli, tmp_path) -> None:
    failing = ",".join(str(n) for n in range(25))
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.items.range=30",
        "pipeline.stages.work.retries=0",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        f"+pipeline.stages.work.worker.fail=[{failing}]",
    )
    assert res.code == 1
    status = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=status")
    assert "units not done (25):" in status.out
    assert "... and 5 more" in status.out
    shown = [ln for ln in status.out.splitlines() if "ValueError: bad item" in ln]
    assert len(shown) == 20
