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
        st = _stat(pid)
        if st is not None and st[1] == started:
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
