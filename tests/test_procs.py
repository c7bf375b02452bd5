"""Process trees: a job's whole tree ends, children that setsid away included."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from runner import procs
from tests.conftest import wait_until

# a shell with two children: one leaves its session and process group (killpg would miss it)
# and ignores SIGTERM (only the SIGKILL after the grace period ends it)
ESCAPE = "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
TREE = f"{sys.executable} -c '{ESCAPE}time.sleep(300)' & sleep 300 & wait"


def escaped(root: int) -> bool:
    children = procs.descendants(root)
    return len(children) == 2 and any(os.getsid(p) == p for p in children)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_tree_ends_the_whole_tree_even_a_child_in_its_own_session() -> None:
    shell = subprocess.Popen(["bash", "-c", TREE], start_new_session=True)
    try:
        wait_until(lambda: escaped(shell.pid), what="a child to run in its own session")
        children = procs.descendants(shell.pid)
        signalled = procs.kill_tree(shell.pid, grace=0.5)
        assert sorted(signalled) == sorted([shell.pid, *children])
        assert all(gone(p) for p in [shell.pid, *children])
    finally:
        shell.kill()
        shell.wait()


def test_kill_tree_of_a_finished_process_signals_nothing() -> None:
    done = subprocess.Popen(["true"])
    done.wait()
    assert procs.kill_tree(done.pid) == []


def test_start_time_names_one_process_and_none_once_it_is_gone() -> None:
    p = subprocess.Popen(["sleep", "30"])
    started = procs.start_time(p.pid)
    assert started is not None and procs.start_time(p.pid) == started
    p.kill()
    p.wait()
    assert procs.start_time(p.pid) is None
