"""What runs inside a job's Ray task: the job in its own process group, guarded by a watcher,
stopped at its time limit, on cancel, and when the Ray worker dies."""

from __future__ import annotations

import os
import resource as rusage
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from runner.placement import Started, here
from runner.procs import kill_group, signal_name

# seconds between SIGTERM and SIGKILL when a job's process group is stopped
KILL_GRACE = 3.0

# The leader of a job's process group, started before the job: it holds a pipe from the Ray
# worker, so when the worker dies (crash, OOM kill, its driver SIGKILLed) it reads EOF and kills
# the whole group. It ignores SIGTERM, so it still guards the group during the kill grace.
_WATCHER = "trap '' TERM INT HUP; read -r _; kill -KILL 0"


def run_job(spec: dict[str, Any], out: str, err: str) -> Iterator[Started | dict[str, Any]]:
    """Run one job to its end in its own process group: first say where it runs (`Started`),
    then what happened, as the ledger keeps it.

    A cancel from the runner arrives as KeyboardInterrupt; the group is stopped either way."""
    yield here()
    node = socket.gethostname()
    started = time.time()
    cpu_before = _children_cpu()
    watcher = subprocess.Popen(
        ["bash", "-c", _WATCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        process_group=0,
    )
    proc: subprocess.Popen[bytes] | None = None
    timed_out = False
    try:
        proc = _start(spec, out, err, group=watcher.pid)
        timed_out = _wait(proc, spec["time_limit"], started)
    except OSError as exc:
        error = f"cannot start: {exc}"
        yield {"state": "failed", "error": error, "node": node, "started": started}
        return
    finally:
        _stop_group(watcher, proc)
    assert proc is not None
    yield _outcome(proc, timed_out, node, started, _children_cpu() - cpu_before, spec)


def _start(spec: dict[str, Any], out: str, err: str, group: int) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        return subprocess.Popen(
            spec["argv"],
            cwd=spec["cwd"],
            env={**os.environ, **spec["env"]},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=group,
        )


def _wait(proc: subprocess.Popen[bytes], limit: float | None, started: float) -> bool:
    """Wait for the job's own process to exit; True when the time limit came first.

    Popen.wait(timeout) polls from 0.5 ms up, so a job that exits at once costs ~1 ms, not a
    fixed poll period; the short bound keeps Ray's cancellation able to interrupt the wait."""
    while True:
        left = None if limit is None else limit - (time.time() - started)
        if left is not None and left <= 0:
            return True
        try:
            proc.wait(timeout=0.5 if left is None else min(left, 0.5))
            return False
        except subprocess.TimeoutExpired:
            continue


def _stop_group(watcher: subprocess.Popen[bytes], proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a job still running and give it KILL_GRACE to end, then SIGKILL its whole group
    (also after a normal exit: nothing a job started outlives it), watcher included."""
    if proc is not None and proc.poll() is None:
        kill_group(watcher.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    kill_group(watcher.pid, signal.SIGKILL)
    if proc is not None:
        if proc.poll() is None:  # it left the group (setsid): it is still the job's to end
            proc.kill()
        proc.wait()
    watcher.wait()
    if watcher.stdin is not None:  # its pipe, held open until now on purpose
        watcher.stdin.close()


def _outcome(
    proc: subprocess.Popen[bytes],
    timed_out: bool,
    node: str,
    started: float,
    cpu: float,
    spec: dict[str, Any],
) -> dict[str, Any]:
    code = proc.returncode
    sig = signal_name(-code) if code < 0 else None
    if timed_out:
        state, error = "timeout", f"time_limit {spec['time_limit']:g}s exceeded"
    elif code == 0:
        state, error = "done", None
    else:
        state, error = "failed", f"killed by {sig}" if sig else f"exit code {code}"
    return {
        "state": state,
        "error": error,
        "node": node,
        "started": started,
        "ended": time.time(),
        "exit_code": code if code >= 0 else None,
        "signal": sig,
        "pid": proc.pid,
        "cpu": cpu,
    }


def _children_cpu() -> float:
    usage = rusage.getrusage(rusage.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
