"""The run directory: one runner at a time, atomic outputs, the leftovers of a killed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import procs
from runner.errors import RunLockedError
from runner.store import RunStore, atomic_path


def test_the_lock_admits_one_runner_and_names_the_holder(tmp_path: Path) -> None:
    first = RunStore(tmp_path)
    first.open()
    with pytest.raises(RunLockedError, match=f"in use by another runner \\(pid {os.getpid()}\\)"):
        RunStore(tmp_path).open()
    first.close()
    second = RunStore(tmp_path)
    second.open()
    second.close()


def test_a_failed_write_leaves_no_output(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_opening_a_run_directory_removes_temporary_files_whose_writer_is_gone(
    tmp_path: Path,
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    shards = tmp_path / "continue" / "shards"
    shards.mkdir(parents=True)
    left = [
        tmp_path / f".summary.json.tmp-{gone.pid}",
        tmp_path / "continue" / f".merged.csv.tmp-{gone.pid}",
        shards / f".shard-0002.input.csv.tmp-{gone.pid}",
    ]
    # a writer still at work: the runner of a run directory nested in this one
    busy = tmp_path / "nested" / f".summary.json.tmp-{os.getpid()}"
    busy.parent.mkdir()
    for path in [*left, busy]:
        path.write_text("half")
    store = RunStore(tmp_path)
    store.open()
    store.close()
    assert [p for p in left if p.exists()] == []
    assert busy.exists()


def test_recorded_leftovers_are_ended_and_nothing_else(tmp_path: Path) -> None:
    ours = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = tmp_path / "ray-processes.json"
        procs.record_children(record)
        found = json.loads(record.read_text())
        # keep only `ours` as if it alone were started by the earlier run
        ours_only = [e for e in found["processes"] if e[0] == ours.pid]
        record.write_text(json.dumps({**found, "processes": ours_only}))
        assert procs.reap_recorded(record) == 1
        ours.wait(timeout=10)
        time.sleep(0.1)
        assert bystander.poll() is None
        assert not record.exists()
    finally:
        for p in (ours, bystander):
            p.kill()
            p.wait()


def test_a_process_started_after_the_record_is_ended_by_its_mark_and_nothing_else(
    tmp_path: Path,
) -> None:
    """A Ray worker started after the runner recorded its Ray's processes (one still starting
    when the runner was SIGKILLed) is not in the record: it carries the run's mark."""
    record = tmp_path / "ray-processes.json"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with procs.marked(record):
        late = subprocess.Popen(sleep, start_new_session=True)
    bystander = subprocess.Popen(sleep)
    try:
        assert procs.reap_recorded(record) == 1
        late.wait(timeout=10)
        time.sleep(0.1)
        assert bystander.poll() is None
        assert not record.exists()
    finally:
        for p in (late, bystander):
            p.kill()
            p.wait()


def test_a_saved_state_goes_to_the_ledger_only_when_json_keeps_it(caplog) -> None:
    from runner import saved_state

    assert saved_state.as_result("s", "u", {"step": 3, "seen": [1, 2]}) == {
        "saved_state": {"step": 3, "seen": [1, 2]}
    }
    assert saved_state.as_result("s", "u", None) is None
    assert saved_state.as_result("s", "u", (3, 4)) is None  # JSON gives a list back
    assert saved_state.as_result("s", "u", {"w": object()}) is None
    assert "s: u: its saved state (dict) is not JSON-storable; it is kept in memory only" in (
        caplog.text
    )
