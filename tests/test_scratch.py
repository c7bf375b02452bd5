"""Scratch folders on a node: a process's own, kept while it runs, removed as it exits, and
swept once it is gone without removing it (killed mid-task)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from runner import scratch

# a process that takes its scratch folder, writes a file there, says where, and waits
_TAKE = """
import time
from runner import scratch
folder = scratch.folder()
open(folder + "/half-written.out", "w").write("...")
print(folder, flush=True)
time.sleep(600)
"""


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node's temporary directory of the test's own, for this process and those it starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _taker() -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _TAKE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_process_s_folder_goes_with_the_next_one_taken_and_a_live_one_stays(
    temp: Path,
) -> None:
    killed, killed_folder = _taker()
    live, live_folder = _taker()
    try:
        root = live_folder.parent
        assert killed_folder.parent == root
        assert root == Path(scratch.root()) and root.is_relative_to(temp)
        assert (killed_folder / "half-written.out").exists()
        killed.kill()  # SIGKILL: it removes nothing itself
        killed.wait()
        # named after the live process's pid, by an earlier process that had that pid
        reused = root / f"{live.pid}-1.000"
        reused.mkdir()
        unrelated = root / "notes"  # not a scratch folder's name: not ours to remove
        unrelated.mkdir()

        code = "from runner import scratch; print(scratch.folder())"
        taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert taken.returncode == 0, taken.stderr

        assert not Path(taken.stdout.strip()).exists()  # it exited: its own folder went too
        assert not killed_folder.exists()
        assert not reused.exists()
        assert (live_folder / "half-written.out").exists()
        assert unrelated.exists()
    finally:
        for proc in (killed, live):  # by their ids, whatever failed
            proc.kill()
            proc.wait()
    # the runner's sweep at a run's end: the live one is gone now
    assert scratch.sweep() == 1
    assert [p.name for p in root.iterdir()] == ["notes"]
