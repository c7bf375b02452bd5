"""`mode=cancel` names a unit by its id or as STAGE/ID: an id two running stages have is refused
with both candidates named, and the end-of-run table counts what was cancelled."""

from __future__ import annotations

from pathlib import Path

from runner.lifecycle import UnitState
from tests.conftest import cpus_free_again, run_runner, runner_process, unit_states, wait_until


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
