"""Reading a finished run: `mode=status`, `mode=report` and `mode=cancel` read the run
directory (its ledger and the config each attempt saved), so they need neither the run's
input files nor the overrides it was started with."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    cpus_free_again,
    ledger_states,
    run_runner,
    runner_process,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("ray_session")


def test_a_run_whose_input_moved_away_is_still_read(cli, tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    shutil.copy(ROOT / "tests" / "data" / "items.jsonl", items)
    run_dir = tmp_path / "run"
    args = ("pipeline=items_file", f"run.dir={run_dir}", f"pipeline.stages.work.items.file={items}")
    assert cli(*args).code == 0
    wait_until(cpus_free_again, what="the pool's worker to be gone")
    items.rename(tmp_path / "moved.jsonl")

    status = cli(*args, "mode=status")
    assert status.code == 0, status.text
    assert status.out.splitlines()[2].split()[:4] == ["work", "pool", "done", "3"]
    (run_dir / "report.html").unlink()
    drawn = cli(*args, "mode=report")
    assert drawn.code == 0, drawn.text
    assert (run_dir / "report.html").is_file()
    cancelled = cli(*args, "mode=cancel", "units=[a]")
    assert cancelled.code == 2
    assert (
        "no run in progress to cancel units of (start one with `runner pipeline=items_file`)"
        in (cancelled.err)
    )
    # planning still reads the inputs: it says what is missing
    plan = cli(*args, "mode=plan")
    assert plan.code == 2 and "no such file" in plan.err


def test_a_run_is_read_by_its_directory_alone_named_from_its_saved_config(
    cli, tmp_path: Path
) -> None:
    run_dir, items = tmp_path / "run", ROOT / "tests" / "data" / "items.jsonl"
    ran = cli(
        "pipeline=items_file", f"run.dir={run_dir}", f"pipeline.stages.work.items.file={items}"
    )
    assert ran.code == 0, ran.text
    wait_until(cpus_free_again, what="the pool's worker to be gone")
    (snapshot,) = (run_dir / ".hydra").glob("*/config.yaml")
    status = cli("mode=status", f"run.dir={run_dir}")  # no pipeline=: the default is another
    assert status.code == 0, status.text
    assert f"pipeline items_file; the last attempt's config: {snapshot}" in status.out
    drawn = cli("mode=report", f"run.dir={run_dir}")
    assert drawn.code == 0, drawn.text
    assert "<title>items_file " in (run_dir / "report.html").read_text()


def test_a_followed_run_is_read_without_its_follow_override(cli, tmp_path: Path) -> None:
    file, scratch = tmp_path / "submit.jsonl", tmp_path / "scratch"
    scratch.mkdir()
    file.write_text(
        json.dumps({"job": {"name": "first", "cpus_per_task": 0.5}, "script": "echo 1"})
        + "\n"
        + json.dumps({"close": True})
        + "\n"
    )
    args = (
        "pipeline=jobs_scns",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
    )
    ran = cli(*args, "+pipeline.stages.work.follow=true")
    assert ran.code == 0, ran.text
    wait_until(cpus_free_again, what="the job's CPU to be free")
    status = cli(*args, "mode=status")  # without +...follow=true: the close line is not a job
    assert status.code == 0, status.text
    assert status.out.splitlines()[2].split()[:4] == ["work", "jobs", "done", "1"]


def test_a_stage_whose_need_failed_is_listed_everywhere_saying_why_it_did_not_run(
    cli, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = ("pipeline=needs_failed", f"run.dir={run_dir}")
    ran = cli(*args)
    assert ran.code == 1, ran.text
    wait_until(cpus_free_again, what="the jobs' CPUs to be free")
    why = "not run: needs first, which did not succeed"
    assert ran.out.splitlines()[2].split()[:7] == ["second", "jobs", "0", "0", "0", "0", "0"]
    assert f"second: {why}" in ran.out.splitlines()
    second = json.loads((run_dir / "summary.json").read_text())["stages"]["second"]
    assert (second["ok"], second["message"], second["done"]) == (False, why, 0)

    status = cli("mode=status", f"run.dir={run_dir}")
    assert status.code == 0, status.text
    rows = [line.split(None, 2) for line in status.out.splitlines()[1:4]]
    assert [r[:2] for r in rows] == [["stage", "kind"], ["first", "jobs"], ["second", "jobs"]]
    assert rows[2][2].startswith(f"{why}  0 ")
    assert "jobs of stage first:" in status.out and "jobs of stage second" not in status.out
    page = (run_dir / "report.html").read_text()
    # no units, no requeue, no preemption (its reasons' zeros are left out)
    row = f'<tr><td>second</td><td>jobs</td><td>{why}</td><td>-</td><td class="n">0</td><td>-</td>'
    assert row in page


def test_a_stage_a_signal_kept_from_starting_is_listed_saying_so(
    ray_session: str, tmp_path: Path
) -> None:
    """Ctrl-C while the first stage runs: the second, which needs it, never started; status
    and report.html list it all the same, saying why."""
    run_dir = tmp_path / "run"
    args = (
        "pipeline=needs_failed",
        f"run.dir={run_dir}",
        "pipeline.stages.first.jobs.0.command=[sleep, '60']",
        "cluster=ray",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(lambda: ledger_states(run_dir).get("fails") == "running", what="the first stage")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    wait_until(cpus_free_again, what="the job's CPU to be free")

    why = "not started: the run was stopped first"
    status = run_runner(*args, "mode=status", env=env)
    assert status.code == 0, status.text
    rows = [line.split(None, 2) for line in status.out.splitlines() if line.startswith("second")]
    assert rows and rows[0][2].startswith(f"{why}  0 "), status.out
    page = (run_dir / "report.html").read_text()
    assert f"<tr><td>second</td><td>jobs</td><td>{why}</td><td>-</td>" in page
