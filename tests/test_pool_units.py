"""A pool's units fail alone and say why; workers write logs; a plain function is a worker;
resume reruns what changed (code, input content) and never what only says how to run."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("ray_session")


def results(run_dir: Path, stage: str = "work") -> pd.DataFrame:
    return pd.read_parquet(run_dir / stage / "results.parquet").set_index("id")


def test_a_result_that_cannot_be_stored_fails_its_item_alone(cli, tmp_path: Path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Unstorable",
        "+pipeline.stages.work.worker.bad=[3]",
        "pipeline.stages.work.retries=0",
    )
    assert res.code == 1, res.text
    assert "1 item(s) failed or timed out; max_failures allows 0" in res.text
    table = results(tmp_path)
    assert table.loc["3", "status"] == "failed"
    assert table.loc["3", "error"] == (
        "ResultError: the result is not JSON (a _thread.lock cannot be stored): return dicts, "
        "lists, strings, numbers, booleans or None (numpy values are converted)"
    )
    done = table.drop("3")
    assert (done["status"] == "done").all()
    # numpy values are stored as plain numbers
    assert [r["n"] for r in done["result"]] == [int(i) for i in done.index]


def test_results_holding_empty_objects_are_written(cli, tmp_path: Path) -> None:
    """Every item returns a dict with an empty dict in it: Parquet cannot hold a struct without
    fields, so the results column is the JSON texts (the run used to crash writing it)."""
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Annotated",
    )
    assert res.code == 0, res.text
    assert "Traceback" not in res.text
    table = results(tmp_path)
    assert [json.loads(r) for r in table["result"]] == [
        {"score": i, "notes": {}} for i in range(12)
    ]


@pytest.mark.parametrize("shared_fs", ["true", "false"])
def test_a_plain_function_is_a_worker_and_its_output_goes_to_worker_logs(
    cli, tmp_path, shared_fs: str
) -> None:
    """Whether the nodes share the run directory or not (then each batch's reply carries the
    worker's new log lines back), the worker logs end up under the run directory."""
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.double",
        "+pipeline.stages.work.worker.plus=1",
        f"cluster.shared_fs={shared_fs}",
    )
    assert res.code == 0, res.text
    table = results(tmp_path)
    assert (table["result"] == 2 * table["input"] + 1).all()
    logs = sorted((tmp_path / "work" / "logs").glob("worker-*.log"))
    assert logs, "no worker log"
    text = "".join(p.read_text() for p in logs)
    assert all(f"doubling {i}\n" in text for i in range(12))
    assert "INFO tests.double: doubled 7" in text


def test_policy_and_resource_changes_rerun_nothing(cli, tmp_path: Path) -> None:
    assert cli("pipeline=misbehave", f"run.dir={tmp_path}").code == 0
    plan = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "mode=plan",
        "pipeline.stages.work.retries=3",
        "pipeline.stages.work.max_failures=2",
        "+pipeline.stages.work.step_timeout=30",
        "pipeline.stages.work.num_workers=1",
        "+pipeline.stages.work.max_concurrency=2",
        "pipeline.stages.work.cpus_per_worker=0.25",
    )
    assert "skip     12  policy changed, kept" in plan.out
    assert "run " not in plan.out


@pytest.fixture
def edited_worker() -> Iterator[Path]:
    """A worker module the test may edit, importable by the session's Ray workers."""
    path = ROOT / "tests" / f"edited_worker_{os.getpid()}.py"
    path.write_text("def work(item):\n    return item + 1\n")
    try:
        yield path
    finally:
        path.unlink()


def test_changing_the_worker_code_reruns_its_units(cli, tmp_path, edited_worker) -> None:
    target = f"pipeline.stages.work.worker._target_=tests.{edited_worker.stem}.work"
    assert cli("pipeline=misbehave", f"run.dir={tmp_path}", target).code == 0
    same = cli("pipeline=misbehave", f"run.dir={tmp_path}", target, "mode=plan")
    assert "skip     12  done" in same.out
    edited_worker.write_text("def work(item):\n    return item + 2\n")
    changed = cli("pipeline=misbehave", f"run.dir={tmp_path}", target, "mode=plan")
    assert "run      12  code changed" in changed.out


def test_touching_input_files_reruns_nothing_editing_one_reruns_it(cli, tmp_path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(3):
        (inputs / f"{n}.txt").write_text(f"text {n}\n")
    args = (
        "pipeline=misbehave",
        f"run.dir={tmp_path / 'run'}",
        "~pipeline.stages.work.items",
        f"+pipeline.stages.work.items.glob={inputs}/*.txt",
    )
    assert cli(*args).code == 0
    later = time.time() + 10
    for n in range(3):
        os.utime(inputs / f"{n}.txt", (later, later))
    assert "skip      3  done" in cli(*args, "mode=plan").out
    (inputs / "1.txt").write_text("edited\n")
    plan = cli(*args, "mode=plan")
    assert f"run       1  input changed            [{inputs}/1.txt]" in plan.out
    assert "skip      2  done" in plan.out
