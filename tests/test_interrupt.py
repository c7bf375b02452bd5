"""Stopping a run: Ctrl-C / SIGTERM exit 130 / 143 cleanly; SIGKILL then rerun finishes the rest.

These run `python -m runner` as a user would, joined to the session's Ray with cluster=ray
(a Ray start per test would cost seconds each)."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import attempt, cpus_free_again, run_runner, runner_process, wait_until


def done_units(run_dir: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
        (n,) = db.execute("SELECT COUNT(*) FROM units WHERE state='done'").fetchone()
        db.close()
        return int(n)
    except sqlite3.Error:
        return 0


def test_sigkill_mid_pychecker_then_rerun_finishes_the_rest_once(ray_session, tmp_path) -> None:
    args = (
        "pipeline=pychecker",
        "cluster=ray",
        f"run.dir={tmp_path}",
        "pipeline.stages.check.num_workers=2",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(lambda: done_units(tmp_path) >= 10, timeout=90, what="10 checked items")
    proc.kill()
    proc.communicate()
    first = done_units(tmp_path)
    wait_until(cpus_free_again, what="the killed runner's actors to be gone")

    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    table = pd.read_parquet(tmp_path / "check" / "results.parquet")
    assert len(table) == 60
    assert table["id"].is_unique
    loops = table[table["id"].str.endswith("-loop")]
    assert set(loops["status"]) == {"timeout"}
    assert set(table[table["id"].str.endswith("-correct")]["result"].map(lambda r: r["score"])) == {
        1.0
    }
    assert attempt(tmp_path)["stages"]["check"]["skipped"] >= first


@pytest.mark.parametrize(
    ("sig", "code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl_c"), pytest.param(signal.SIGTERM, 143, id="term")],
)
def test_a_signal_cancels_running_units_and_exits_with_its_code(
    ray_session: str, tmp_path: Path, sig: int, code: int
) -> None:
    args = (
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.seconds=0.5",
        "pipeline.stages.work.items.range=400",
    )
    proc = runner_process(*args, "cluster=ray", env={"RAY_ADDRESS": ray_session})
    wait_until(lambda: done_units(tmp_path) >= 2, timeout=60, what="some finished items")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out + err
    assert "interrupted by signal" in err
    wait_until(cpus_free_again, what="every actor of the run to be gone")
    status = run_runner("pipeline=misbehave", f"run.dir={tmp_path}", "mode=status")
    assert "interrupted" in status.out
    assert "cancelled" in status.out
    resumed = run_runner(*args, "mode=plan")
    assert "not finished last time" in resumed.out
    assert "skip" in resumed.out
