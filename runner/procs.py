"""Process bookkeeping with psutil: whom we started, and ending exactly those.

When a runner that started a local Ray is killed with SIGKILL, some Ray agents outlive it and
ignore SIGTERM. The runner records the processes it started (pid + creation time, so a reused
pid is never mistaken for ours; while Ray starts too), and the mark in the environment that
the processes started later inherit (`marked`: Ray's workers, what they run), and a resumed run
ends the leftovers, and nothing else. A job's whole process tree is ended with
`kill_tree`, which also finds children that `setsid` away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# creation times are read back from JSON; two readings of one process agree far closer
_SAME = 0.01


def start_time(pid: int) -> float | None:
    """A live process's creation time (with the pid, it names one process), or None."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _is(pid: int, started: float | None) -> bool:
    """True when `pid` is still the process that was created at `started`."""
    now = start_time(pid)
    return started is not None and now is not None and abs(now - started) < _SAME


def running(pid: int, started: float | None) -> bool:
    """Whether process `pid`, created at `started`, still runs (not gone, not a zombie)."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return _is(pid, started)


def alive_since(pid: int, since: float) -> bool:
    """Whether process `pid` is alive and was created no later than `since` (epoch seconds):
    a pid reused by a later process is not the one that started then."""
    created = start_time(pid)
    return created is not None and created <= since + 1.0


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree."""
    try:
        return [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(root: int) -> int:
    """Resident memory of `root` and every process below it, in bytes (0 when it is gone):
    what a job holds, children included, as a memory limit counts it."""
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


# the environment variable whose value marks the processes an embedded Ray of one run starts
MARK = "RUNNER_RAY_MARK"


@contextlib.contextmanager
def marked(path: Path) -> Iterator[None]:
    """While Ray starts and runs: a new mark in this process's environment, recorded in `path`
    first, which the processes Ray starts inherit: its workers (one still starting when the
    runner is SIGKILLed outlives it by half a minute), what they run. Ray's agents write their
    title over theirs: they are found by the record made while Ray starts (`record_children`).
    A later run ends what carries the mark (`reap_recorded`)."""
    before = os.environ.get(MARK)
    os.environ[MARK] = uuid.uuid4().hex
    with contextlib.suppress(OSError):  # a full disk is met, and said, by the ledger
        _record(path, [])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = before


def record_children(path: Path) -> None:
    """Write the processes this process started (pid, creation time) to `path`, with the mark
    they carry (`marked`)."""
    _record(path, [(p, t) for p in descendants(os.getpid()) if (t := start_time(p)) is not None])


def _record(path: Path, entries: list[tuple[int, float]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"mark": os.environ.get(MARK), "processes": entries}))
    tmp.replace(path)


def reap_recorded(path: Path) -> int:
    """SIGKILL the still-running processes an earlier run recorded in `path`, and those that
    carry its mark; how many."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if isinstance(found, list):  # an older runner wrote the list of processes alone
        found = {"processes": found, "mark": None}
    entries, mark = found["processes"], found["mark"]
    left = {pid for pid, started in entries if _is(pid, started)}
    if mark:
        left |= set(_carrying(mark))
    left -= {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    killed = 0
    for pid in left:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            psutil.Process(pid).kill()
            killed += 1
    path.unlink(missing_ok=True)
    if killed:
        log.info("ended %d leftover Ray process(es) of an earlier run of this directory", killed)
    return killed


def _carrying(mark: str) -> Iterator[int]:
    """The live processes whose environment holds `mark` (`marked`), read as the kernel keeps
    it: psutil's reading stops at the first empty entry, which a process that wrote its title
    over its command line may leave there."""
    wanted = f"\0{MARK}={mark}\0".encode()
    for pid in psutil.pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as block:
            if wanted in b"\0" + block.read():
                yield pid


def kill_tree(pid: int, grace: float = 3.0) -> list[int]:
    """End `pid` and every process below it: SIGTERM, then SIGKILL to those still alive after
    `grace` seconds. The tree is read before any signal, so a child that has `setsid` away
    (a new session and process group, out of reach of killpg) is still found by parentage;
    children forked during the grace period are found again before the SIGKILL. Returns the
    pids signalled."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in list(alive):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            alive += [c for c in p.children(recursive=True) if c not in alive]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return sorted({p.pid for p in tree + alive})


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait up to `timeout` seconds for processes (already signalled) to be gone."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found.append(psutil.Process(pid))
    psutil.wait_procs(found, timeout=timeout)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def record_group(path: Path, pid: int) -> None:
    """Write the leader of a process group we started (host, pid, start time) to `path`."""
    path.write_text(json.dumps([socket.gethostname(), pid, start_time(pid)]))


def reap_group(path: Path) -> None:
    """Kill the process group recorded in `path` by `record_group` if it still runs on this
    host (orphaned by a killed runner, or left by a task that could not clean up)."""
    try:
        host, pid, started = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if host == socket.gethostname() and _is(pid, started):
        kill_group(pid)
    path.unlink(missing_ok=True)


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; `signal 40` for a number Python has no name for (real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
