"""What every stage kind must do, one suite run against each (as Hydra reruns one launcher test
suite against every launcher): a kind is a small class, and the executor gives all of them the
same lifecycle, so the same observable contract holds for pool, jobs, shard and roles."""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from runner import procs
from runner.executor import FLUSH_SECONDS, WAIT_SECONDS
from runner.lifecycle import UnitState
from runner.store import UnitRow, read_ledger
from tests.conftest import ROOT, TEST_SPECS, Result, run_runner, runner_process, wait_until

Cli = Callable[..., Result]

KINDS = ["pool", "jobs", "shard", "roles"]
UNITS = {"pool": 30, "jobs": 4, "shard": 4, "roles": 2}


def ledger_rows(run_dir: Path) -> list[UnitRow]:
    if not (run_dir / "ledger.sqlite").exists():
        return []
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return list(ledger.rows("work"))
    except sqlite3.OperationalError:  # the runner is still creating it
        return []
    finally:
        ledger.close()


def states(run_dir: Path) -> list[UnitState]:
    return [r.state for r in ledger_rows(run_dir)]


@pytest.mark.parametrize("kind", KINDS)
def test_plan_run_then_a_rerun_skips_every_unit(
    ray_session: str, cli: Cli, tmp_path: Path, kind: str
) -> None:
    import ray

    spec = (f"pipeline=conform_{kind}", f"run.dir={tmp_path}")
    plan = cli(*spec, "mode=plan")
    assert plan.code == 0, plan.text
    assert re.search(rf"run\s+{UNITS[kind]}\s+new", plan.out), plan.out
    first = cli(*spec)
    assert first.code == 0, first.text
    rows = ledger_rows(tmp_path)
    assert len(rows) == UNITS[kind]
    here = ray.get_runtime_context().get_node_id()
    for row in rows:
        assert row.state is UnitState.done
        assert row.node_id == here and row.node_ip  # the node it ran on, as Ray names it
        assert row.started is not None and row.ended is not None and row.started <= row.ended
    again = cli(*spec, "mode=plan")
    assert re.search(rf"skip\s+{UNITS[kind]}\s+done", again.out), again.out
    rerun = cli(*spec)
    assert rerun.code == 0
    assert [r.ended for r in ledger_rows(tmp_path)] == [r.ended for r in rows]  # nothing redone


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_mid_stage_then_resume_loses_and_duplicates_nothing(
    ray_session: str, tmp_path: Path, kind: str
) -> None:
    args = (f"pipeline=conform_{kind}", f"run.dir={tmp_path}", "cluster=ray")
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(
        lambda: UnitState.running in states(tmp_path) or UnitState.done in states(tmp_path),
        timeout=90,
        what="a unit running",
    )
    proc.kill()
    proc.communicate()
    before = {r.unit: r for r in ledger_rows(tmp_path) if r.state is UnitState.done}
    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    after = ledger_rows(tmp_path)
    assert sorted(r.unit for r in after) == sorted({r.unit for r in after})  # no duplicate
    assert len(after) == UNITS[kind] and {r.state for r in after} == {UnitState.done}
    for row in after:  # what was done before the kill was not run again
        if row.unit in before:
            assert row.ended == before[row.unit].ended


def _descendants(pid: int) -> list[tuple[int, float | None]]:
    return [(p, procs.start_time(p)) for p in procs.descendants(pid)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("sig", "code"),
    [pytest.param(signal.SIGTERM, 143, id="term"), pytest.param(signal.SIGINT, 130, id="int")],
)
def test_a_signal_to_the_whole_process_group_with_its_embedded_ray_ends_the_run_cleanly(
    tmp_path: Path, kind: str, sig: int, code: int
) -> None:
    """What `timeout`, Slurm, systemd and Kubernetes do: signal the runner's whole group, the
    embedded Ray's processes included."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "--config-dir",
            str(TEST_SPECS),
            "run.progress=log",
            f"pipeline=conform_{kind}",
            f"run.dir={tmp_path}",
            "cluster=local",
            "cluster.num_cpus=2",
            "cluster.num_gpus=0",
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: UnitState.running in states(tmp_path) or UnitState.done in states(tmp_path),
            timeout=90,
            what="a unit running",
        )
        family = _descendants(proc.pid)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)  # a bound against hangs, not a timing claim
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, out + err
    assert UnitState.running not in states(tmp_path)  # the ledger is true
    wait_until(
        lambda: not any(procs.running(p, t) for p, t in family),
        timeout=20,
        what="every process of the run to be gone",
    )


@pytest.mark.parametrize(
    ("spec", "failed", "attempts", "message"),
    [
        pytest.param(
            "conform_fail_pool",
            {"3", "7"},
            3,
            "2 item(s) failed or timed out; max_failures allows 1",
            id="pool",
        ),
        pytest.param("shard_fail", {"600-899"}, 2, "1 shard(s) failed", id="shard"),
        pytest.param(
            "conform_fail_jobs",
            {"bad"},
            1,
            "1 job(s) did not complete: bad (exit code 3)",
            id="jobs",
        ),
    ],
)
def test_a_failing_unit_is_retried_then_counted_against_the_stage(
    ray_session: str,
    cli: Cli,
    tmp_path: Path,
    spec: str,
    failed: set[str],
    attempts: int,
    message: str,
) -> None:
    res = cli(f"pipeline={spec}", f"run.dir={tmp_path}")
    assert res.code == 1, res.text
    assert message in res.text
    ledger = read_ledger(tmp_path)
    assert ledger is not None
    try:
        rows = {r.unit: r for r in ledger.rows(ledger.stages()[0]["stage"])}
    finally:
        ledger.close()
    assert {u for u, r in rows.items() if r.state is UnitState.failed} == failed
    assert {rows[u].attempts for u in failed} == {attempts}
    assert all(r.state is UnitState.done for u, r in rows.items() if u not in failed)


@pytest.mark.parametrize("kind", KINDS)
def test_the_simulated_run_admits_units_in_the_order_of_the_real_one(
    ray_session: str, cli: Cli, tmp_path: Path, kind: str
) -> None:
    """One slot (every unit takes both CPUs), units of distinct priorities where the kind has
    them: the order is the scheduler's, and `cluster=sim` drives the same scheduler with the
    kind's own asks."""
    real = cli(f"pipeline=order_{kind}", f"run.dir={tmp_path}")
    assert real.code == 0, real.text
    ledger = read_ledger(tmp_path)
    assert ledger is not None
    rows = list(ledger.rows("work"))
    ledger.close()
    by_start = sorted(enumerate(rows), key=lambda ir: (ir[1].started or 0.0, ir[0]))
    real_order = [f"work/{r.unit}" for _, r in by_start]
    sim = cli(f"pipeline=order_{kind}", "cluster=sim", "cluster.nodes=[{cpus: 2}]")
    assert sim.code == 0, sim.text
    line = next(ln for ln in sim.out.splitlines() if ln.startswith("units in the order"))
    assert line.split(": ", 1)[1].split(", ") == real_order


def _one_to_cancel(run_dir: Path, kind: str) -> str | None:
    """A unit that runs (a pool's items are in the ledger only once they end: one still to
    end, once the first has)."""
    rows = ledger_rows(run_dir)
    if kind == "pool":
        done = {r.unit for r in rows if r.state is UnitState.done}
        return str(max(set(map(str, range(16))) - done, key=int)) if done else None
    if kind == "jobs":
        running = {r.unit for r in rows if r.state is UnitState.running}
        return "stubborn" if "stubborn" in running else None
    return next((r.unit for r in rows if r.state is UnitState.running), None)


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_with_grace_ends_one_running_unit_cancelled_and_the_rest_completes(
    ray_session: str, tmp_path: Path, kind: str
) -> None:
    """`mode=cancel`: the unit is asked to stop, given its stage's grace, then killed (the
    stubborn job ignores SIGTERM); it ends CANCELLED, nothing of it left, the others done."""
    args = (f"pipeline=cancel_{kind}", f"run.dir={tmp_path}", "cluster=ray")
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    try:
        found: list[str] = []

        def chosen() -> bool:
            unit = _one_to_cancel(tmp_path, kind)
            found.extend([unit] if unit else [])
            return unit is not None

        wait_until(chosen, timeout=90, what="a unit to cancel")
        victim = found[0]
        res = run_runner(*args, "mode=cancel", f"units=[{victim}]", env=env)
        assert res.code == 0, res.text
        assert f"work/{victim}: CANCELLED" in res.out, res.text
        out, err = proc.communicate(timeout=120)  # a bound against hangs, not a timing claim
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rows = {r.unit: r.state for r in ledger_rows(tmp_path)}
    assert rows.pop(victim) is UnitState.cancelled
    assert rows and set(rows.values()) == {UnitState.done}, out + err


def _tally(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_mid_pool_then_resume_redoes_no_more_than_one_ledger_flush_holds(
    ray_session: str, tmp_path: Path
) -> None:
    """Pool items reach the ledger in batches at most FLUSH_SECONDS apart, so a SIGKILL loses
    (and the resume redoes) at most what the workers finish in one flush interval and the
    loop's turn: counted in items, not timed."""
    tally = tmp_path / "tally.txt"
    args = (
        "pipeline=redo_pool",
        f"run.dir={tmp_path / 'run'}",
        "cluster=ray",
        f"pipeline.stages.work.worker.path={tally}",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(lambda: len(_tally(tally)) >= 60, timeout=90, what="60 items finished")
    proc.kill()
    finished = set(_tally(tally))  # read at once: what finished before the kill
    proc.communicate()
    recorded = {r.unit for r in ledger_rows(tmp_path / "run") if r.state is UnitState.done}
    assert recorded <= finished  # nothing recorded that did not happen
    workers, seconds = 2, 0.05
    bound = workers * (math.ceil((FLUSH_SECONDS + WAIT_SECONDS) / seconds) + 1)
    redone = finished - recorded
    assert len(redone) <= bound, f"{len(redone)} items finished but lost: {sorted(redone)}"
    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    after = ledger_rows(tmp_path / "run")
    assert len(after) == 400 and {r.state for r in after} == {UnitState.done}
