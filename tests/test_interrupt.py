"""Stopping a run: Ctrl-C / SIGTERM exit 130 / 143 cleanly; SIGKILL then rerun finishes the rest.

These run `python -m runner` as a user would, joined to the session's Ray with cluster=ray
(a Ray start per test would cost seconds each), but for a signal while the embedded Ray
starts."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner import procs
from runner.store import RAY_PIDS
from tests.conftest import (
    ROOT,
    TEST_SPECS,
    attempt,
    cpus_free_again,
    embedded_runner,
    ray_starting,
    run_runner,
    runner_process,
    wait_until,
)


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
    said = re.search(
        rf"runner: error: interrupted by signal {sig}: running units were cancelled; the "
        rf"(\d+) unit\(s\) done are kept in {re.escape(str(tmp_path))}: run the same "
        "command again to resume",
        err,
    )
    assert said, err
    assert int(said[1]) == done_units(tmp_path)
    wait_until(cpus_free_again, what="every actor of the run to be gone")
    status = run_runner("pipeline=misbehave", f"run.dir={tmp_path}", "mode=status")
    assert "interrupted" in status.out
    assert "cancelled" in status.out
    resumed = run_runner(*args, "mode=plan")
    assert "not finished last time" in resumed.out
    assert "skip" in resumed.out


@pytest.mark.parametrize(
    ("sig", "group", "code"),
    [
        pytest.param(signal.SIGINT, False, 130, id="ctrl_c_to_the_runner"),
        pytest.param(signal.SIGTERM, True, 143, id="term_to_the_process_group"),
    ],
)
def test_a_signal_while_ray_starts_ends_the_run_cleanly(
    ray_session: str, tmp_path: Path, sig: int, group: bool, code: int
) -> None:
    """A Ctrl-C or a SIGTERM in the seconds the embedded Ray takes to start: the shell's exit
    code and the one message, no traceback, no crash of the interpreter (SIGSEGV, SIGABRT),
    no Ray process left behind (its agents once were), and a rerun does the work."""
    args = ("pipeline=misbehave", f"run.dir={tmp_path}", "pipeline.stages.work.items.range=4")
    with embedded_runner(*args) as proc:
        wait_until(lambda: ray_starting(proc.pid), timeout=60, what="Ray starting")
        family = [(p, procs.start_time(p)) for p in procs.descendants(proc.pid)]
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # a bound against hangs, not a timing claim
    assert proc.returncode == code, out + err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"runner: error: interrupted by signal {sig}: "), err
    wait_until(
        lambda: not any(procs.running(p, t) for p, t in family),
        timeout=20,
        what="every process of the run's Ray to be gone",
    )
    again = run_runner(*args, "cluster=ray", env={"RAY_ADDRESS": ray_session})
    assert again.code == 0, again.text
    assert done_units(tmp_path) == 4


# `runner ARGS` whose embedded Ray has started its processes but whose start has not returned
# (they are up a second before `ray.init` returns): it touches the file argv[1] then and waits
SLOW_START = """
import sys, time
from pathlib import Path
from runner import cli, cluster

started, up = cluster._init_local, Path(sys.argv[1])

def slowly(*args):
    started(*args)
    up.touch()
    time.sleep(600)

cluster._init_local = slowly
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_runner_sigkilled_while_ray_starts_leaves_no_ray_process_past_the_rerun(
    ray_session: str, tmp_path: Path
) -> None:
    """SIGKILL of the runner alone (not its process group) while its embedded Ray starts: Ray's
    GCS and raylet die with it, its agents do not (for a minute). The rerun ends them."""
    up = tmp_path / "ray-is-up"
    run = tmp_path / "run"
    args = ("pipeline=misbehave", f"run.dir={run}", "pipeline.stages.work.items.range=4")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-c", SLOW_START, str(up), "--config-dir", str(TEST_SPECS), *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_until(up.exists, timeout=90, what="the embedded Ray's processes")
        family = [(p, procs.start_time(p)) for p in procs.descendants(proc.pid)]
        wait_until(  # the runner records them every tenth of a second while Ray starts
            lambda: {p for p, t in family if procs.running(p, t)} <= recorded(run / RAY_PIDS),
            what="the runner to record its Ray's processes",
        )
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    again = run_runner(*args, "cluster=ray", env={"RAY_ADDRESS": ray_session})

    assert again.code == 0, again.text
    wait_until(  # a bound: left alone, the agents outlive the runner by a minute
        lambda: not any(procs.running(p, t) for p, t in family),
        timeout=10,
        what="every process of the killed runner's Ray to be gone",
    )
    assert done_units(run) == 4


def recorded(path: Path) -> set[int]:
    """The processes a runner recorded as its Ray's (`ray-processes.json`)."""
    try:
        return {pid for pid, _ in json.loads(path.read_text())["processes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
