"""`mode=cancel` names a unit by its id or as STAGE/ID: an id two running stages have is refused
with both candidates named, and the end-of-run table counts what was cancelled."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.cancel import cancel as ask_to_cancel
from runner.lifecycle import UnitState
from tests.conftest import (
    cpus_free_again,
    embedded_runner,
    ledger_states,
    ray_starting,
    run_runner,
    runner_process,
    unit_states,
    wait_until,
)


def table_row(out: str, stage: str) -> dict[str, str]:
    """A stage's row of the end-of-run table, by column."""
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("stage ")).split()
    row = next(line for line in lines if line.startswith(f"{stage} ")).split()
    return dict(zip(header, row, strict=False))


def test_an_id_of_two_stages_is_refused_and_stage_slash_id_cancels_one(
    ray_session: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "gate").touch()
    run = tmp_path / "run"
    args = ("pipeline=cancel_twins", "cluster=ray", f"run.dir={run}")
    env = {"RAY_ADDRESS": ray_session, "RUNNER_TEST_SCRATCH": str(scratch)}
    proc = runner_process(*args, env=env)
    wait_until((scratch / "started-3").exists, timeout=90, what="item 3 of square to run")

    both = run_runner(*args, "mode=cancel", "units=[3]", env=env)
    assert both.code == 2, both.text
    assert "nothing cancelled: '3' is a unit of 2 stages: square/3, cube/3" in both.err
    assert "units=[square/3]" in both.err  # how to name one
    one = run_runner(*args, "mode=cancel", "units=[square/3]", env=env)
    assert one.code == 0, one.text
    assert one.out.strip() == "square/3: CANCELLED"

    (scratch / "gate").unlink()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert unit_states(run, "square")["3"] is UnitState.cancelled
    assert set(unit_states(run, "cube").values()) == {UnitState.done}
    square, cube = table_row(out, "square"), table_row(out, "cube")
    assert (square["done"], square["cancelled"]) == ("5", "1")
    assert (cube["done"], cube["cancelled"]) == ("6", "0")
    wait_until(cpus_free_again, what="every worker's CPU to be free")


def test_a_cancel_after_the_runner_was_sigkilled_says_there_is_no_run_in_progress(
    ray_session: str, tmp_path: Path
) -> None:
    """The killed runner's attempt never ended in the ledger, but nobody is left to answer:
    `mode=cancel` says so, as `mode=status` calls the run interrupted, instead of waiting for
    an answer that cannot come."""
    args = (
        "pipeline=misbehave",
        "cluster=ray",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.seconds=0.5",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(lambda: "done" in ledger_states(tmp_path).values(), timeout=60, what="an item")
    proc.kill()
    proc.communicate()
    wait_until(cpus_free_again, what="the killed runner's workers to be gone")

    res = run_runner(*args, "mode=cancel", "units=[work/11]", env=env)

    assert res.code == 2, res.text
    assert res.err.strip().splitlines()[-1] == (
        f"runner: error: {tmp_path}: no run in progress to cancel units of "
        "(start one with `runner pipeline=misbehave`)"
    )
    assert not list((tmp_path / "cancel-requests").glob("*"))


def test_a_cancel_while_the_run_starts_waits_for_its_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mode=cancel` in the seconds an embedded Ray takes to start: the runner holds the run
    directory but has not recorded its attempt yet. The request waits for the runner's first
    pass (not "no run in progress"), and the named unit never runs."""
    args = (
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.items.range=4",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
    )
    with embedded_runner(*args) as proc:
        wait_until(lambda: ray_starting(proc.pid), timeout=60, what="Ray starting")
        code = ask_to_cancel(tmp_path, ["work/2"], "misbehave")  # what `mode=cancel` runs, at once
        out, err = proc.communicate(timeout=90)  # a bound against hangs, not a timing claim
    assert code == 0
    assert capsys.readouterr().out.strip() == "work/2: CANCELLED"
    assert proc.returncode == 0, out + err
    done, cancelled = UnitState.done, UnitState.cancelled
    assert unit_states(tmp_path, "work") == {"0": done, "1": done, "2": cancelled, "3": done}
