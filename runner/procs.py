"""Process bookkeeping through /proc: whom we started, and ending exactly those.

When a runner that started a local Ray is killed with SIGKILL, some Ray agents outlive it and
ignore SIGTERM. The runner records the processes it started (pid + kernel start time, so a
reused pid is never mistaken for ours) and a resumed run ends the leftovers, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[19])


def start_time(pid: int) -> int | None:
    """A live process's start time in clock ticks (with the pid, it names one process), or None."""
    st = _stat(pid)
    return None if st is None else st[1]


def running(pid: int, started: int | None) -> bool:
    """Whether process `pid`, started at `started`, still runs (not gone, not a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0] != "Z" and int(rest[19]) == started


def alive_since(pid: int, since: float) -> bool:
    """Whether process `pid` is alive and was started no later than `since` (epoch seconds):
    a pid reused by a later process is not the one that started then."""
    ticks = start_time(pid)
    if ticks is None:
        return False
    try:
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return True  # cannot tell: a live pid is believed
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    # btime has a one-second resolution
    return started <= since + 1.0


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def record_children(path: Path) -> None:
    """Write the processes this process started (pid, start time) to `path`."""
    entries = [(pid, st[1]) for pid in descendants(os.getpid()) if (st := _stat(pid))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)


def reap_recorded(path: Path) -> int:
    """SIGKILL the still-running processes recorded in `path` by an earlier run; how many."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    killed = 0
    for pid, started in entries:
        if started is not None and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    path.unlink(missing_ok=True)
    if killed:
        log.info("ended %d leftover Ray process(es) of an earlier run of this directory", killed)
    return killed


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
    if host == socket.gethostname() and start_time(pid) == started:
        kill_group(pid)
    path.unlink(missing_ok=True)


def signal_name(number: int) -> str:
    """`SIGKILL` for 9; `signal 40` for a number Python has no name for (real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
