"""A process's own scratch folder on its node, removed once the process is gone.

A Ray worker killed in the middle of a task (a cancel past its grace, a preemption, a pool's
time limit, the kernel's OOM killer) runs no `finally`, so what it made in the node's
temporary directory would stay there for good: a carried job log, a shard's files, a
checker's candidate. So each process that needs scratch space writes in a folder named after
itself (its pid and creation time, which `procs` uses to name one process), under one folder
per user and pid namespace (`root`). A process that exits normally removes its own; the
folders of processes that are gone are removed by the next process on the node that takes a
folder of its own, and by the runner when a run ends.

`procs` (psutil) is imported only where a folder is taken or swept: every pool worker imports
this module through `carry`, and most never take one."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile


def root() -> str:
    """The folder that holds the scratch folders of this user's processes on this node, in
    this pid namespace: containers that share a temporary directory see one another's pids
    as gone, so each sweeps only its own."""
    return os.path.join(tempfile.gettempdir(), f"runner-scratch-{os.getuid()}", _namespace())


@functools.cache
def _namespace() -> str:
    """This process's pid namespace, as `pid-<inode>` (`pid` where it cannot be read)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "pid"
    return "pid-" + "".join(c for c in link if c.isdigit())


@functools.cache
def folder() -> str:
    """This process's scratch folder (made on the first call, after a sweep of the gone),
    removed when the process exits normally."""
    from runner.procs import start_time

    sweep()
    pid = os.getpid()
    created = start_time(pid)
    assert created is not None  # this process runs
    mine = os.path.join(root(), f"{pid}-{created:.3f}")
    os.makedirs(mine, exist_ok=True)
    atexit.register(_remove, mine, pid)
    return mine


def _remove(mine: str, pid: int) -> None:
    """At exit: remove this process's folder (not a forked child's parent's)."""
    if os.getpid() == pid:
        shutil.rmtree(mine, ignore_errors=True)


def sweep() -> int:
    """Remove the scratch folders of processes that are gone (a reused pid does not keep
    one: its creation time differs); how many were removed."""
    top = root()
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if _owner_runs(name):
            continue
        # another sweep may be removing it too
        shutil.rmtree(os.path.join(top, name), ignore_errors=True)
        removed += 1
    return removed


def _owner_runs(name: str) -> bool:
    """Whether the process a folder is named after (`<pid>-<creation time>`) still runs; a
    name of any other shape is not a scratch folder's and stays."""
    from runner.procs import running

    pid, _, created = name.partition("-")
    try:
        return running(int(pid), float(created))
    except ValueError:
        return True
