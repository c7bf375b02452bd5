"""Resume after the worst: a fresh run SIGKILLed half way, then a plain rerun, never mixes two
runs' results, and status meanwhile says the run was interrupted, not running; what the killed
runner left half-written is gone once the rerun has run."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import (
    ROOT,
    attempt,
    cpus_free_again,
    run_runner,
    runner_process,
    wait_until,
)


def done_units(run_dir: Path) -> set[str]:
    try:
        db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
        rows = db.execute("SELECT unit FROM units WHERE state='done'").fetchall()
        db.close()
    except sqlite3.Error:
        return set()
    return {r[0] for r in rows}


def workers(run_dir: Path) -> set[str]:
    return set(pd.read_parquet(run_dir / "work" / "results.parquet")["worker"])


def test_fresh_run_killed_then_rerun_never_mixes_runs(ray_session: str, tmp_path) -> None:
    gate = tmp_path / "gate"
    args = (
        "pipeline=misbehave",
        "cluster=ray",
        f"run.dir={tmp_path / 'run'}",
        "pipeline.stages.work.worker._target_=tests.workers.Gated",
        f"+pipeline.stages.work.worker.gate={gate}",
        "+pipeline.stages.work.worker.hold=[8,9,10,11]",
        # one item per call: a held item never keeps a finished one from being reported
        "++pipeline.stages.work.batch_size=1",
    )
    env = {"RAY_ADDRESS": ray_session}
    first = run_runner(*args, env=env)
    assert first.code == 0, first.text
    old = workers(tmp_path / "run")

    gate.touch()  # items 8-11 of the fresh run wait for the gate
    proc = runner_process(*args, "run.fresh=true", env=env)
    # the fresh run took back the first run's 12, then finished its own 0-7
    wait_until(
        lambda: done_units(tmp_path / "run") == {str(i) for i in range(8)},
        timeout=60,
        what="the fresh run to finish items 0-7",
    )
    proc.kill()
    proc.communicate()
    wait_until(cpus_free_again, what="the killed runner's actors to be gone")

    status = run_runner("pipeline=misbehave", f"run.dir={tmp_path / 'run'}", "mode=status")
    assert f"was interrupted: its runner (pid {proc.pid}) is no longer alive" in status.out
    assert "running" not in status.out

    gate.unlink()
    plan = run_runner(*args, "mode=plan", env=env)
    assert "run       4  not finished last time" in plan.out
    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    assert not workers(tmp_path / "run") & old  # nothing left from the first run


@pytest.mark.usefixtures("ray_session")
def test_touching_a_shard_input_reruns_nothing_and_reads_no_rows(cli, tmp_path) -> None:
    source = tmp_path / "prompts.csv"
    shutil.copy(ROOT / "runner" / "specs" / "data" / "continuation" / "prompts.csv", source)
    args = (
        "pipeline=shard_copy",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.copy.input={source}",
        "pipeline.stages.copy.num_shards=2",
        "pipeline.stages.copy.gpus_per_shard=0",
    )
    assert cli(*args).code == 0
    os.utime(source, (source.stat().st_atime + 10, source.stat().st_mtime + 10))
    assert "skip      2  done" in cli(*args, "mode=plan").out
    rerun = cli(*args)
    assert rerun.code == 0
    assert attempt(tmp_path / "run")["stages"]["copy"]["skipped"] == 2
    # the run remembered the touched file's digest: the next plan trusts size and mtime
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    (mtime,) = db.execute("SELECT mtime_ns FROM files WHERE path=?", (str(source),)).fetchone()
    db.close()
    assert mtime == source.stat().st_mtime_ns
    with source.open("a") as f:
        f.write("999999,an extra prompt\n")
    edited = cli(*args, "mode=plan").out
    assert "run       2  new                      [0-600, 601-999999]" in edited  # new ranges
    assert "skip" not in edited


ITEMS = '{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n'


@pytest.mark.parametrize(
    ("items", "pool"),
    [
        pytest.param(ITEMS.replace('"x": 1', '"x": 9'), "run       1  input changed", id="edited"),
        pytest.param(ITEMS + '{"id": "c", "x": 3}\n', "run       1  new", id="added"),
    ],
)
def test_a_stage_that_needs_a_pool_runs_again_when_the_pools_items_change(
    cli, tmp_path, items, pool
) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text(ITEMS)
    args = (
        "pipeline=items_then_jobs",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.items.file={source}",
    )
    assert cli(*args).code == 0
    source.write_text(items)
    plan = cli(*args, "mode=plan").out
    assert pool in plan
    # the job reads every item's result: its input changed too
    assert "run       1  input changed            [rows]" in plan, plan


def test_a_rerun_removes_what_a_sigkilled_runner_left_half_written(
    ray_session: str, tmp_path: Path
) -> None:
    """SIGKILLed while it wrote an output (a temporary file beside it, renamed once whole) and
    before it read a task's start (a file under `.started/`), a runner leaves both behind;
    after the rerun the run directory holds whole outputs only."""
    run = tmp_path / "run"
    args = (
        "pipeline=misbehave",
        "cluster=ray",
        f"run.dir={run}",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.seconds=0.5",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(lambda: len(done_units(run)) >= 2, timeout=60, what="some finished items")
    proc.kill()
    proc.communicate()
    wait_until(cpus_free_again, what="the killed runner's actors to be gone")
    # as the killed runner named them: `atomic_path`'s temporary file, a task's start file
    half = run / "work" / f".results.parquet.tmp-{proc.pid}"
    half.write_bytes(b"PAR1 half a table")
    (run / ".started").mkdir(exist_ok=True)
    (run / ".started" / "0123456789abcdef-7.json").write_text('{"node_id": "0a1b')

    again = run_runner(*args, env=env)

    assert again.code == 0, again.text
    assert not half.exists()
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert not list((run / ".started").iterdir())
    table = pd.read_parquet(run / "work" / "results.parquet")
    assert sorted(table["id"]) == sorted(str(i) for i in range(12))
