"""Shared fixtures: one local Ray for the whole session, and a way to call the CLI in-process."""

from __future__ import annotations

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_SPECS = ROOT / "tests" / "specs"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray for every test that needs it: 2 CPUs, 4 logical GPUs, a small store.

    Yields its address, so subprocess runners can join it with cluster=ray instead of paying
    for a Ray start of their own."""
    import ray

    ray.init(
        address="local",  # our own, even when another Ray runs on the host
        num_cpus=2,
        num_gpus=4,
        object_store_memory=128 << 20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# The rlhf example's demo needs rollout/1 and reward still running once train runs (then the
# burst preempts rollout/1); with the example's 4 s and 1 s of steps, a train actor that Ray
# takes 7 s to start (four busy loops beside the suite on 2 cores) runs after both ended, and
# the burst takes a free group instead. Longer steps keep the demo's order under load.
RLHF_ROLLOUT_STEPS = 200
RLHF_UNHURRIED = (
    f"pipeline.stages.rlhf.roles.rollout.steps={RLHF_ROLLOUT_STEPS}",
    "pipeline.stages.rlhf.roles.reward.steps=150",
)


@dataclass
class Result:
    """What a user sees of one `runner` invocation."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """Run `runner ARGS` in this process (sharing the session's Ray when one is up)."""
    from runner.cli import main

    monkeypatch.chdir(ROOT)

    def run(*args: str) -> Result:
        capsys.readouterr()
        flags = [a for a in args if a in ("-m", "--multirun")]
        rest = [a for a in args if a not in flags]
        code = main([*flags, "--config-dir", str(TEST_SPECS), "run.progress=off", *rest])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def runner_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python -m runner ARGS` as a user would, from the repository root."""
    flags = [a for a in args if a in ("-m", "--multirun")]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            *flags,
            "--config-dir",
            str(TEST_SPECS),
            "run.progress=log",
            *[a for a in args if a not in flags],
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@contextmanager
def embedded_runner(*args: str, config_dir: Path | None = TEST_SPECS) -> Iterator[Popen[str]]:
    """`python -m runner ARGS` on an embedded Ray of its own (RAY_ADDRESS left out), in a
    session of its own, so that a test can signal its whole process group as `timeout`,
    Slurm, systemd and a terminal do; SIGKILLed whole if the test leaves it running."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    where = ["--config-dir", str(config_dir)] if config_dir is not None else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *where, "run.progress=log", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ray_starting(pid: int) -> bool:
    """Whether the embedded Ray of runner `pid` has its GCS server: `ray.init` is under way
    (the raylet, the agents and the driver's connection come after it)."""
    from runner import procs

    for child in procs.descendants(pid):
        with suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "gcs_server":
                return True
    return False


def run_runner(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run `python -m runner ARGS` to its end."""
    proc = runner_process(*args, env=env)
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


def runner_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """`runner ARGS` started in `cwd`, with nothing of the clone on its path."""
    script = Path(sys.executable).parent / "runner"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def summary(run_dir: Path) -> dict[str, Any]:
    """The whole run's summary (every attempt of it)."""
    return json.loads((run_dir / "summary.json").read_text())


def unit_states(run_dir: Path, stage: str) -> dict[str, Any]:
    """The stage's units by id, with the state the ledger holds for each."""
    from runner.store import read_ledger

    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return {r.unit: r.state for r in ledger.rows(stage)}
    finally:
        ledger.close()


def ledger_states(run_dir: Path) -> dict[str, str]:
    """Each unit's state as the ledger holds it now, read while a run writes it (nothing yet:
    empty)."""
    try:
        db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
        rows = db.execute("SELECT unit, state FROM units").fetchall()
        db.close()
    except sqlite3.Error:
        return {}
    return dict(rows)


def attempt(run_dir: Path) -> dict[str, Any]:
    """What the last attempt of the run did (`summary.json`'s last `attempts` entry)."""
    last: dict[str, Any] = summary(run_dir)["attempts"][-1]
    return last


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `check` until true; fail the test if it never is (a bound, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def cpus_free_again() -> bool:
    """True once every CPU of the session Ray is free (every actor of a run is gone)."""
    import ray

    return bool(ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"])


def left_on_the_node(name: str, since: float) -> list[Path]:
    """Files of the jobs whose names hold `name`, written on their node since `since` and
    still in its temporary directory (in a scratch folder or anywhere else in it)."""
    temp = Path(tempfile.gettempdir())
    pattern = f"*{glob.escape(name)}*"
    found = [*temp.glob(pattern), *temp.glob(f"runner-scratch-*/*/*/{pattern}")]
    return [p for p in found if p.stat().st_mtime >= since]
