"""A run directory that cannot be written stops the run with exit 1 and one message, and the
ledger stays consistent: once there is room, a plain rerun finishes exactly the rest.

These mount a small tmpfs (root with CAP_SYS_ADMIN, as in CI's container); elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import attempt

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_a_full_disk_stops_the_run_and_a_rerun_with_room_finishes(cli, small_disk, tmp_path):
    run_dir = small_disk / "run"
    args = (
        "pipeline=misbehave",
        f"run.dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "pipeline.stages.work.worker._target_=tests.workers.Big",
        "+pipeline.stages.work.worker.size=20000",
        "pipeline.stages.work.items.range=200",
    )
    full = cli(*args)
    assert full.code == 1, full.text
    assert f"runner: error: run directory {run_dir}: cannot write (database or disk is full)" in (
        full.err
    )
    assert "Traceback" not in full.text
    remount(small_disk, "size=64m")
    again = cli(*args)
    assert again.code == 0, again.text
    table = pd.read_parquet(run_dir / "work" / "results.parquet")
    assert sorted(table["id"].astype(int)) == list(range(200))
    assert set(table["status"]) == {"done"}


def test_a_read_only_run_directory_is_one_message_and_exit_1(cli, small_disk, tmp_path) -> None:
    remount(small_disk, "ro")
    run_dir = small_disk / "run"
    res = cli("pipeline=misbehave", f"run.dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert res.code == 1, res.text
    assert res.err.strip() == (
        f"runner: error: run directory {run_dir}: cannot write (Read-only file system); the run "
        "stopped and the ledger keeps every unit finished so far: make room or choose a writable "
        "run.dir, then run again"
    )


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_read_only_run_directory_in_the_default_configuration_is_one_message(
    cli, small_disk, sweep: bool
) -> None:
    """Hydra creates its output directory (by default the run directory) before runner's code
    runs: that too ends with exit 1 and runner's one message, no traceback."""
    remount(small_disk, "ro")
    run_dir = small_disk / "run"
    flags = ("-m", "pipeline.stages.work.items.range=3,4") if sweep else ()
    res = cli(*flags, "pipeline=misbehave", f"run.dir={run_dir}")
    assert res.code == 1, res.text
    assert res.err.strip() == (
        f"runner: error: run directory {run_dir}: cannot write (Read-only file system); the run "
        "stopped and the ledger keeps every unit finished so far: make room or choose a writable "
        "run.dir, then run again"
    )
    # looking at it still works: plan and status write nothing there
    assert cli("pipeline=misbehave", f"run.dir={run_dir}", "mode=plan").code == 0


def test_a_full_disk_under_an_output_stops_the_run_naming_it_and_a_rerun_finishes(
    cli, small_disk, tmp_path
) -> None:
    """The ledger has room but the stage's directory (a full disk of its own) has none for
    results.parquet: exit 1, one message naming the file, every unit still done in the ledger;
    once there is room, a rerun runs nothing again and writes the table."""
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "work"
    stage_dir.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(small_disk), str(stage_dir)], check=True)
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"x" * 4096):  # until the disk under the stage directory is full
            pass
    args = (
        "pipeline=misbehave",
        f"run.dir={run_dir}",
        "pipeline.stages.work.worker._target_=tests.workers.Big",
        "+pipeline.stages.work.worker.size=2000",
        "pipeline.stages.work.items.range=100",
    )
    try:
        full = cli(*args)
        assert full.code == 1, full.text
        assert full.err.strip().splitlines()[-1] == (
            f"runner: error: {stage_dir / 'results.parquet'}: cannot write (No space left on "
            "device); the run stopped and the ledger keeps every unit finished so far: make room "
            "or choose a writable run.dir, then run again"
        )
        assert "Traceback" not in full.text
        assert not (stage_dir / "results.parquet").exists()
        assert not list(stage_dir.glob(".results.parquet.tmp-*"))  # no temporary file left
        filler.unlink()
        again = cli(*args)
        assert again.code == 0, again.text
        assert attempt(run_dir)["stages"]["work"]["skipped"] == 100  # nothing ran twice
        table = pd.read_parquet(stage_dir / "results.parquet")
        assert sorted(table["id"].astype(int)) == list(range(100))
    finally:
        subprocess.run(["umount", "-l", str(stage_dir)], check=False)


MESSAGE = (
    "runner: error: run directory {}: cannot write (No space left on device); the run "
    "stopped and the ledger keeps every unit finished so far: make room or choose a writable "
    "run.dir, then run again"
)


@pytest.mark.parametrize("hog", ["talk", "slices"], ids=["job log", "shard log"])
def test_a_full_disk_hit_by_a_units_own_writes_stops_the_run_and_a_rerun_finishes(
    cli, small_disk, tmp_path, hog: str
) -> None:
    """A job's stdout, a shard's log: written on the worker's side, where the runner sees no
    OSError, only a unit that failed. The disk under the run directory is full: exit 1, the
    one message, the unit not recorded done or failed; with room, a plain rerun finishes."""
    run_dir = small_disk / "run"
    args = ("pipeline=disk_hog", f"run.dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}")
    if hog == "slices":  # the job fits, the shard's 3 MB do not
        args += ("pipeline.stages.talk.jobs.0.script='echo small'",)
    full = cli(*args)
    assert full.code == 1, full.text
    # the disk fills under the unit's own writes or under the ledger's, whichever writes next
    # (SQLite says so in its words): the same one message either way
    last = full.err.strip().splitlines()[-1]
    sqlite_full = MESSAGE.replace("No space left on device", "database or disk is full")
    assert last in (MESSAGE.format(run_dir), sqlite_full.format(run_dir)), full.err
    assert "Traceback" not in full.text
    remount(small_disk, "size=64m")
    again = cli(*args)
    assert again.code == 0, again.text
    stages = attempt(run_dir)["stages"]
    assert stages["talk"]["done"] + stages["talk"]["skipped"] == 1
    assert stages["slices"]["done"] == 1
    if hog == "talk":
        assert (run_dir / "talk" / "chatty.out").read_text().endswith("\nfinished\n")


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_full_disk_met_by_hydras_own_setup_is_one_message(
    cli, small_disk, tmp_path, sweep: bool
) -> None:
    """Hydra's set-up of the run directory (a sweep job's too: its log, its .hydra/ snapshot)
    on a full disk: exit 1 and the one message; once there is room, a rerun finishes."""
    run_dir = small_disk / "run"
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"x" * 4096):
            pass
    flags = ("-m", "pipeline.stages.work.items.range=3,4") if sweep else ()
    res = cli(*flags, "pipeline=misbehave", f"run.dir={run_dir}")
    assert res.code == 1, res.text
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), res.text
    assert "cannot write (No space left on device); the run stopped" in lines[0]
    filler.unlink()
    again = cli(*flags, "pipeline=misbehave", f"run.dir={run_dir}")
    assert again.code == 0, again.text


def test_a_full_disk_under_one_sweep_job_is_one_message(cli, small_disk, tmp_path) -> None:
    """The sweep's directory has room, one job's directory (a full disk mounted there) has
    none for Hydra's set-up of that job (its log, its .hydra/ snapshot): exit 1, the one
    message naming that directory, no traceback."""
    sweep_dir = tmp_path / "sweep"
    job_dir = sweep_dir / "pipeline.stages.work.items.range=3"
    job_dir.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(small_disk), str(job_dir)], check=True)
    try:
        filler = small_disk / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"x" * 4096):
                pass
        res = cli(
            "-m", "pipeline.stages.work.items.range=3", "pipeline=misbehave", f"run.dir={sweep_dir}"
        )
        assert res.code == 1, res.text
        assert "Traceback" not in res.text
        lines = res.err.strip().splitlines()
        assert lines[-1].startswith("runner: error: ") and str(job_dir) in lines[-1], res.text
        assert "cannot write (No space left on device); the run stopped" in lines[-1]
    finally:
        subprocess.run(["umount", "-l", str(job_dir)], check=False)
