"""The jobs stage on a real Ray with real processes: concurrency within resources, time limits,
crashes, dead workers, interrupts and resume, the status table, and bad specs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from runner.carry import Dest
from runner.lifecycle import UnitState
from runner.placement import STARTED_KEY, StartTo
from runner.quantities import duration_seconds, memory_bytes
from runner.remote import plain
from runner.stages.jobs.task import GROUP, JobsGroup, run_job
from runner.store import UnitRow, read_ledger
from tests.conftest import (
    Result,
    attempt,
    cpus_free_again,
    ledger_states,
    left_on_the_node,
    run_runner,
    runner_process,
    unit_states,
    wait_until,
)

SPEC = "tests/specs/pipeline"
Cli = Callable[..., Result]


def rows(run_dir: Path, stage: str = "work") -> dict[str, UnitRow]:
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return {r.unit: r for r in ledger.rows(stage)}
    finally:
        ledger.close()


def max_overlap(found: dict[str, UnitRow]) -> int:
    """The most jobs running at one instant, from their own recorded start and end times."""
    # at equal times an end sorts before a start: touching is not overlapping
    events = sorted(
        [(r.ended, -1) for r in found.values()] + [(r.started, 1) for r in found.values()]
    )
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: only its parent has not collected it yet
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] != "Z"


def pids(*files: Path) -> list[int]:
    return [int(line) for f in files for line in f.read_text().split()]


def marks(scratch: Path, job: str) -> int:
    return len((scratch / f"{job}.marks").read_text().splitlines())


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The jobs' working directory, where they leave marks and pid files."""
    path = tmp_path / "scratch"
    path.mkdir()
    return path


@pytest.mark.usefixtures("ray_session")
class TestOnTheSessionRay:
    def test_four_one_cpu_jobs_run_two_at_a_time_on_two_cpus(self, cli: Cli, tmp_path, scratch):
        res = cli(
            "pipeline=jobs_sleep", f"run.dir={tmp_path}", f"pipeline.stages.work.cwd={scratch}"
        )
        assert res.code == 0, res.text
        found = rows(tmp_path)
        assert {u: r.state for u, r in found.items()} == dict.fromkeys("abcd", UnitState.done)
        assert max_overlap(found) == 2
        assert [marks(scratch, j) for j in "abcd"] == [1, 1, 1, 1]
        assert (tmp_path / "work" / "a.out").exists() and (tmp_path / "work" / "d.err").exists()
        wait_until(cpus_free_again, what="every job's CPU to be free")

    def test_resume_skips_completed_jobs_and_resources_are_not_fingerprinted(
        self, cli: Cli, tmp_path, scratch
    ):
        args = ("pipeline=jobs_sleep", f"run.dir={tmp_path}", f"pipeline.stages.work.cwd={scratch}")
        assert cli(*args).code == 0
        resized = cli(*args, "pipeline.stages.work.cpus_per_task=0.5", "mode=plan")
        assert "skip      4  policy changed, kept" in resized.out
        edited = cli(*args, "pipeline.stages.work.jobs.0.script='echo changed'", "mode=plan")
        assert "run       1  changed: pipeline.stages.work.jobs" in edited.out
        assert "skip      3  done" in edited.out
        again = cli(*args)
        assert again.code == 0
        assert attempt(tmp_path)["stages"]["work"]["skipped"] == 4
        assert [marks(scratch, j) for j in "abcd"] == [1, 1, 1, 1]

    def test_a_job_over_its_time_limit_is_timeout_and_its_processes_are_gone(
        self, cli: Cli, tmp_path, scratch
    ):
        res = cli(
            "pipeline=jobs_faults", f"run.dir={tmp_path}", f"pipeline.stages.work.cwd={scratch}"
        )
        assert res.code == 1
        over = rows(tmp_path)["overtime"]
        assert over.state is UnitState.timeout
        assert over.error == "time_limit 1s exceeded"
        assert over.result["signal"] == "SIGTERM"
        for pid in pids(scratch / "overtime.pid", scratch / "overtime.child"):
            wait_until(lambda pid=pid: not alive(pid), what=f"process {pid} of the timed-out job")

    def test_a_job_that_kills_itself_fails_while_its_siblings_complete(
        self, cli: Cli, tmp_path, scratch
    ):
        res = cli(
            "pipeline=jobs_faults", f"run.dir={tmp_path}", f"pipeline.stages.work.cwd={scratch}"
        )
        assert res.code == 1
        assert "2 job(s) did not complete: crash (killed by SIGKILL), overtime" in res.text
        found = rows(tmp_path)
        assert found["crash"].state is UnitState.failed
        assert found["crash"].result["signal"] == "SIGKILL"
        assert found["fine"].state is UnitState.done
        assert found["fine"].result["exit_code"] == 0
        assert (tmp_path / "work" / "crash.out").read_text() == "about to die\n"
        assert (tmp_path / "work" / "fine.out").read_text() == "all good\n"

    def test_status_shows_each_job_with_state_exit_times_node_and_logs(
        self, cli: Cli, tmp_path, scratch
    ):
        cli("pipeline=jobs_faults", f"run.dir={tmp_path}", f"pipeline.stages.work.cwd={scratch}")
        status = cli("pipeline=jobs_faults", f"run.dir={tmp_path}", "mode=status")
        assert status.code == 0
        assert "jobs of stage work:" in status.out
        header = r"^job\s+state\s+exit\s+start\s+end\s+node\s+stdout\s+stderr$"
        assert re.search(header, status.out, re.M)
        import ray

        clock, node = r"\d\d:\d\d:\d\d", re.escape(ray.util.get_node_ip_address())
        for job, state, code in (
            ("fine", "COMPLETED", "0"),
            ("crash", "FAILED", "SIGKILL"),
            ("overtime", "TIMEOUT", "SIGTERM"),
        ):
            times = rf"{clock}\s+{clock}\s+{node}"
            line = rf"^{job}\s+{state}\s+{code}\s+{times}\s+work/{job}\.out\s+work/{job}\.err$"
            assert re.search(line, status.out, re.M), status.out

    def test_a_job_whose_ray_worker_dies_is_retried_then_failed_never_left_running(
        self, cli: Cli, tmp_path, scratch
    ):
        res = cli(
            "pipeline=jobs_worker_dies",
            f"run.dir={tmp_path}",
            f"pipeline.stages.work.cwd={scratch}",
        )
        assert res.code == 1
        found = rows(tmp_path)
        doomed = found["doomed"]
        assert doomed.state is UnitState.failed
        assert doomed.attempts == 2
        assert doomed.error.startswith("its Ray worker died")
        assert marks(scratch, "doomed") == 2
        assert found["bystander"].state is UnitState.done
        for pid in pids(scratch / "doomed.children"):
            wait_until(lambda pid=pid: not alive(pid), what=f"child {pid} of the dead worker's job")

    def test_jobs_from_a_file_arrays_env_and_gpus(self, cli: Cli, tmp_path, scratch):
        jobs = [
            {"name": "gpu", "command": ["bash", "-c", "echo $CUDA_VISIBLE_DEVICES"], "gpus": 2},
            {
                "name": "part",
                "array": "1-3",
                # values as the file wrote them: not Python's True / None
                "env": {"GREETING": "hello {index}", "FLAG": True, "UNSET": None, "N": 3},
                "script": "echo part {index} of $RUNNER_ARRAY_INDEX, $GREETING, $FLAG,$UNSET,$N",
            },
        ]
        file = tmp_path / "jobs.jsonl"
        file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        res = cli(
            "pipeline=jobs_file",
            f"run.dir={tmp_path / 'run'}",
            f"pipeline.stages.work.cwd={scratch}",
            f"pipeline.stages.work.jobs_file={file}",
        )
        assert res.code == 0, res.text
        logs = tmp_path / "run" / "work"
        assert (logs / "part[2].out").read_text() == "part 2 of 2, hello 2, true,,3\n"
        assert sorted(rows(tmp_path / "run")) == ["gpu", "part[1]", "part[2]", "part[3]"]
        assert re.fullmatch(r"\d,\d\n", (logs / "gpu.out").read_text())

    def test_a_command_that_cannot_start_fails_with_the_reason(self, cli: Cli, tmp_path, scratch):
        file = tmp_path / "jobs.yaml"
        file.write_text("- {name: ghost, command: [no-such-program-here, --now]}\n")
        res = cli(
            "pipeline=jobs_file",
            f"run.dir={tmp_path / 'run'}",
            f"pipeline.stages.work.cwd={scratch}",
            f"pipeline.stages.work.jobs_file={file}",
        )
        assert res.code == 1
        ghost = rows(tmp_path / "run")["ghost"]
        assert ghost.state is UnitState.failed
        assert ghost.error == (
            "cannot start: [Errno 2] No such file or directory: 'no-such-program-here'"
        )

    def test_max_concurrent_caps_the_jobs_running_at_once(self, cli: Cli, tmp_path, scratch):
        file = tmp_path / "jobs.yaml"
        file.write_text("- {name: step, array: 1-3, script: sleep 0.3}\n")
        res = cli(
            "pipeline=jobs_file",
            f"run.dir={tmp_path / 'run'}",
            f"pipeline.stages.work.cwd={scratch}",
            f"pipeline.stages.work.jobs_file={file}",
            "pipeline.stages.work.max_concurrent=1",
        )
        assert res.code == 0, res.text
        assert max_overlap(rows(tmp_path / "run")) == 1

    def test_max_concurrent_beyond_the_resources_warns_how_many_can_run(
        self, cli: Cli, tmp_path, scratch
    ):
        res = cli(
            "pipeline=jobs_sleep",
            f"run.dir={tmp_path}",
            f"pipeline.stages.work.cwd={scratch}",
            "+pipeline.stages.work.max_concurrent=8",
            "mode=plan",
        )
        assert res.code == 0
        assert (
            "work: max_concurrent=8, but the cluster holds at most 2 of these jobs at once; "
            "2 will run at a time" in res.err
        )
        assert "job of 'a', 'b', 'c' and 1 more: 1 CPU each; 4 wanted, 2 fit at once" in res.out

    def test_a_job_that_can_never_fit_is_a_plan_error_naming_it(self, cli: Cli, tmp_path):
        res = cli("pipeline=jobs_too_big", f"run.dir={tmp_path}")
        assert res.code == 2
        assert (
            "plan cannot run on this cluster (1 problem):\n  - pipeline.stages.work: one job "
            "'huge' needs 64 CPU, more than any node has: 64 CPUs wanted, 2 available on the "
            "largest node"
        ) in res.err


def running(run_dir: Path) -> set[str]:
    """The units the ledger shows RUNNING (none while the runner is still creating it)."""
    ledger = read_ledger(run_dir)
    if ledger is None:
        return set()
    try:
        return {r.unit for r in ledger.rows("work") if r.state is UnitState.running}
    except sqlite3.OperationalError:
        return set()
    finally:
        ledger.close()


def start_resume_pipeline(
    run_dir: Path, scratch: Path, address: str
) -> tuple[subprocess.Popen[str], tuple[str, ...], list[int]]:
    """Start the resume pipeline as a user would; return once both slow jobs run."""
    args = (
        "pipeline=jobs_resume",
        "cluster=ray",
        f"run.dir={run_dir}",
        f"pipeline.stages.work.cwd={scratch}",
    )
    proc = runner_process(*args, env={"RAY_ADDRESS": address})
    slow = [scratch / f"slow[{n}].{what}" for n in (1, 2) for what in ("pid", "child")]
    wait_until(
        lambda: all(p.exists() and p.read_text() for p in slow),
        timeout=60,
        what="both slow jobs to start",
    )
    wait_until(  # and the runner has heard it (through the run's inbox: cluster=ray)
        lambda: {"slow[1]", "slow[2]"} <= running(run_dir),
        timeout=60,
        what="both slow jobs RUNNING in the ledger",
    )
    return proc, args, pids(*slow)


def test_sigkill_of_the_runner_then_the_same_command_finishes_only_the_rest(
    ray_session: str, tmp_path: Path, scratch: Path
) -> None:
    began = time.time()
    proc, args, started = start_resume_pipeline(tmp_path, scratch, ray_session)
    proc.kill()
    proc.communicate()
    for pid in started:
        wait_until(lambda pid=pid: not alive(pid), what=f"process {pid} of the killed runner's job")
    assert rows(tmp_path)["slow[1]"].state is UnitState.running  # as the killed runner left it

    again = run_runner(*args, env={"RAY_ADDRESS": ray_session})
    assert again.code == 0, again.text
    assert {r.state for r in rows(tmp_path).values()} == {UnitState.done}
    assert [marks(scratch, f"quick[{n}]") for n in (1, 2)] == [1, 1]
    assert [marks(scratch, f"slow[{n}]") for n in (1, 2)] == [2, 2]
    assert attempt(tmp_path)["stages"]["work"]["skipped"] == 2
    wait_until(cpus_free_again, what="every job's CPU to be free")
    # the killed jobs' logs, written on their node (no shared filesystem), went with them
    assert not left_on_the_node("slow[", began)


def test_status_after_a_sigkill_of_the_runner_shows_its_running_jobs_interrupted(
    ray_session: str, tmp_path: Path, scratch: Path
) -> None:
    """The killed runner left its jobs RUNNING in the ledger; their processes are gone, so
    status says they were interrupted, as it says of their stage."""
    proc, _, started = start_resume_pipeline(tmp_path, scratch, ray_session)
    proc.kill()
    proc.communicate()
    for pid in started:
        wait_until(lambda pid=pid: not alive(pid), what=f"process {pid} of the killed runner's job")

    status = run_runner("pipeline=jobs_resume", f"run.dir={tmp_path}", "mode=status")

    assert status.code == 0, status.text
    for n in (1, 2):
        assert re.search(rf"^slow\[{n}\]\s+INTERRUPTED\s", status.out, re.M), status.out
        assert re.search(rf"^work\s+slow\[{n}\]\s+interrupted\s+1$", status.out, re.M)
    assert "RUNNING" not in status.out
    assert "running" not in status.out
    wait_until(cpus_free_again, what="every job's CPU to be free")


@pytest.mark.parametrize(
    ("sig", "code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl_c"), pytest.param(signal.SIGTERM, 143, id="term")],
)
def test_a_signal_cancels_running_jobs_and_kills_their_process_groups(
    ray_session: str, tmp_path: Path, scratch: Path, sig: int, code: int
) -> None:
    proc, args, started = start_resume_pipeline(tmp_path, scratch, ray_session)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out + err
    assert not [pid for pid in started if alive(pid)]
    found = rows(tmp_path)
    assert [found[f"slow[{n}]"].state for n in (1, 2)] == [UnitState.cancelled] * 2
    status = run_runner("pipeline=jobs_resume", f"run.dir={tmp_path}", "mode=status")
    assert re.search(r"^slow\[1\]\s+CANCELLED\s", status.out, re.M), status.out
    plan = run_runner(*args, "mode=plan", env={"RAY_ADDRESS": ray_session})
    assert "run       2  not finished last time   [slow[1], slow[2]]" in plan.out
    wait_until(cpus_free_again, what="every job's CPU to be free")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            "pipeline.stages.work.time_limit: = 'soon': expected a duration such as 90s, 10m or "
            "2h (a plain number is minutes; Slurm's [D-]HH:MM:SS works too)",
            id="stage_time_limit_malformed",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.0.memory: = '12Q': expected a size such as 512M or 8G "
            "(K, M, G, T; a plain number is megabytes)",
            id="memory_malformed",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.1.time_limit: = -5: expected a duration",
            id="time_limit_negative",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.2.script: = '  ': the script of job 'blank' is empty",
            id="empty_script",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.3.cwd: = '/no/such/dir': no such directory",
            id="cwd_missing",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.5.name: = 'twice': duplicate job name (also jobs.4)",
            id="duplicate_name",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.6.array: = '5-1': the array range is empty: write "
            "LOW-HIGH with LOW <= HIGH, e.g. 1-100",
            id="empty_array",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.7: job 'both' sets both of script and command: set "
            "exactly one",
            id="script_and_command",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.8: job 'neither' sets neither of script and command: set "
            "exactly one",
            id="neither_script_nor_command",
        ),
        pytest.param(
            "pipeline.stages.work.jobs.9.scirpt: unknown key; did you mean 'script'?",
            id="unknown_job_key",
        ),
    ],
)
def test_bad_jobs_exit_2_naming_file_key_value_and_what_is_allowed(cli: Cli, message) -> None:
    res = cli("pipeline=jobs_bad", "run.dir=/nonexistent/never-created")
    assert res.code == 2
    assert "invalid spec (11 problems):" in res.err
    assert f"  - {SPEC}/jobs_bad.yaml: {message}" in res.err


def test_a_bad_line_of_a_jsonl_jobs_file_is_named_by_its_line(cli: Cli, tmp_path: Path) -> None:
    """A JSONL file's problems name the line an editor shows (a blank line counts), as a
    followed file's do; they were `job N`, the Nth job, which a blank line put off by one."""
    file = tmp_path / "submit.jsonl"
    file.write_text(
        '{"job": {"name": "a"}, "script": "true"}\n\n'
        '{"job": {"name": "b", "time_limit": "soon"}, "script": "true"}\n'
        '{"job": {"name": "a"}, "script": "true"}\n'
    )
    res = cli("pipeline=jobs_file", f"pipeline.stages.work.jobs_file={file}", "mode=plan")
    assert res.code == 2, res.text
    assert f"{file} line 3.time_limit: = 'soon': expected a duration" in res.err, res.err
    assert f"{file} line 4.name: = 'a': duplicate job name (also {file} line 1)" in res.err


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("512M", 512 << 20),
        ("8G", 8 << 30),
        ("1.5GiB", 3 << 29),
        ("8Gi", 8 << 30),
        ("64k", 64 << 10),
        (100, 100 << 20),
    ],
)
def test_memory_takes_sizes_and_plain_megabytes(text, nbytes) -> None:
    assert memory_bytes(text) == nbytes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        (30, 1800),
        ("45", 2700),
        ("10:30", 630),
        ("1:00:00", 3600),
        ("1-12", 129600),
    ],
)
def test_time_limit_takes_units_plain_minutes_and_slurm_clocks(text, seconds) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["soon", "12Q", "-5", "0", "5x"])
def test_unreadable_time_limits_are_refused(text) -> None:
    assert duration_seconds(text) is None


def scns_bodies(path: Path, cpus: float, memory: str, meet: Path | None = None) -> Path:
    """SCNS's own example: four concurrent jobs submitted with `curl -d '{job: ..., script}'`.
    With `meet`, each job then waits (20 s at most) until all four have come to that folder:
    run at once, they overlap however slowly a busy machine starts them."""
    wait = ""
    if meet is not None:
        wait = (
            f"\ntouch {meet}/$RUNNER_JOB_NAME"
            f"\nfor _ in $(seq 200); do [ $(ls {meet} | wc -l) -ge 4 ] && break; sleep 0.1; done"
        )
    bodies = [
        {
            "job": {
                "account": "test",
                "name": f"concurrent-job-{i}",
                "partition": "compute-high-mem",
                "ntasks_per_node": 1,
                "cpus_per_task": cpus,
                "memory_per_node": memory,
            },
            "script": f'#!/bin/bash\necho "Job {i} is running"{wait}',
        }
        for i in range(1, 5)
    ]
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    return path


def test_scns_submit_bodies_plan_as_written(tmp_path: Path) -> None:
    bodies = scns_bodies(tmp_path / "submit.jsonl", cpus=4, memory="8G")
    args = (
        "pipeline=jobs_scns",
        f"pipeline.stages.work.jobs_file={bodies}",
        "mode=plan",
        "cluster.num_cpus=16",
        "cluster.memory_gb=64",
    )
    res = run_runner(*args, "cluster.partitions=[compute-high-mem]")
    assert res.code == 0, res.text
    assert "4 CPU, 8G mem each; 4 wanted, 4 fit at once" in res.out
    wrong = run_runner(*args, "cluster.partitions=[compute,gpu]")
    assert wrong.code == 2
    assert (
        "pipeline.stages.work: job 'concurrent-job-1': partition = 'compute-high-mem': no node "
        "of the cluster has it (partitions: compute, gpu)" in wrong.err
    )
    undeclared = run_runner(*args)
    assert "(partitions: none declared; set cluster.partitions)" in undeclared.err


def test_scns_fields_resolve_onto_the_job(tmp_path: Path) -> None:
    from runner.spec import Problems
    from runner.stages.jobs.job import load_jobs
    from runner.stages.jobs.schema import JobsStage

    body = {
        "job": {
            "account": "lab",
            "name": "train",
            "partition": "gpu",
            "ntasks_per_node": 2,
            "cpus_per_task": 3,
            "memory_per_node": "8G",
            "time_limit": "90",
            "exclusive": True,
            "environment": {"A": "1"},
            "current_working_directory": str(tmp_path),
            "standard_output": "logs/train.out",
            "standard_error": str(tmp_path / "train.err"),
            "priority": 7,
        },
        "script": "echo hi",
    }
    problems = Problems(None)
    [job] = load_jobs("work", JobsStage(kind="jobs", jobs=[body]), problems)
    assert problems.items == []
    assert (job.resources.cpus, job.resources.memory) == (6, 8 << 30)
    assert job.time_limit == 90 * 60
    assert (job.partition, job.account, job.exclusive, job.priority) == ("gpu", "lab", True, 7)
    assert (job.env, job.cwd) == ({"A": "1"}, str(tmp_path))
    assert (job.stdout, job.stderr) == (
        str(tmp_path / "logs" / "train.out"),
        str(tmp_path / "train.err"),
    )
    assert job.record()["account"] == "lab"


def test_scns_names_and_ours_for_one_setting_are_refused_together(tmp_path: Path) -> None:
    from runner.spec import Problems
    from runner.stages.jobs.job import load_jobs
    from runner.stages.jobs.schema import JobsStage

    body = {"name": "j", "script": "true", "memory": "1G", "memory_per_node": "2G"}
    problems = Problems(None)
    load_jobs("work", JobsStage(kind="jobs", jobs=[body]), problems)
    assert problems.items == [
        (
            "pipeline.stages.work.jobs.0.memory_per_node",
            "= '2G': give memory or memory_per_node (SCNS's name), not both",
        )
    ]


@pytest.mark.usefixtures("ray_session")
def test_scns_example_scaled_runs_all_four_at_once_and_records_the_account(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    meet = tmp_path / "meet"
    meet.mkdir()
    bodies = scns_bodies(tmp_path / "submit.jsonl", cpus=0.5, memory="64M", meet=meet)
    # job 4 is the lab's, burns some CPU, and names its own stdout file as SCNS lets it
    lines = bodies.read_text().splitlines()
    job4 = json.loads(lines[3])
    job4["job"] |= {"account": "lab", "standard_output": "job4.log"}
    job4["script"] += "\npython3 -c 'sum(range(3_000_000))'"
    bodies.write_text("\n".join([*lines[:3], json.dumps(job4)]) + "\n")
    res = cli(
        "pipeline=jobs_scns",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.jobs_file={bodies}",
        f"pipeline.stages.work.cwd={scratch}",
        "cluster.partitions=[compute-high-mem]",
    )
    assert res.code == 0, res.text
    found = rows(tmp_path / "run")
    assert {r.state for r in found.values()} == {UnitState.done}
    assert max_overlap(found) == 4
    assert [r.input["account"] for _, r in sorted(found.items())] == ["test"] * 3 + ["lab"]
    assert (tmp_path / "run" / "work" / "concurrent-job-3.out").read_text() == "Job 3 is running\n"
    assert (scratch / "job4.log").read_text() == "Job 4 is running\n"
    # the summary's accounting table: jobs and CPU-seconds per account
    accounts = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["work"][
        "accounts"
    ]
    assert accounts.keys() == {"lab", "test"}
    assert accounts["lab"]["jobs"] == 1 and accounts["test"]["jobs"] == 3
    assert accounts["lab"]["cpu_s"] > 0
    assert re.search(r"^stage +account +jobs +cpu-seconds$", res.out, re.M)
    assert re.search(r"^work +lab +1 +\d+\.\d$", res.out, re.M)
    assert re.search(r"^work +test +3 +\d+\.\d$", res.out, re.M)
    wait_until(cpus_free_again, what="every job's CPU to be free")


HOG = (
    "python3 -c 'import time\n"
    "held = []\n"
    "while True:\n"
    '    held.append(b"x" * (8 << 20))\n'
    "    time.sleep(0.01)'"
)


@pytest.mark.usefixtures("ray_session")
def test_a_job_over_its_memory_is_out_of_memory_while_its_neighbour_completes(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    file = tmp_path / "jobs.yaml"
    jobs = [
        {"name": "hog", "memory": "100M", "script": f"{HOG} &\nwait"},
        {"name": "neighbour", "memory": "100M", "script": "sleep 1; echo still here"},
    ]
    file.write_text(json.dumps(jobs))
    args = (
        "pipeline=jobs_file",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
    )
    res = cli(*args)
    assert res.code == 1
    found = rows(tmp_path / "run")
    hog, neighbour = found["hog"], found["neighbour"]
    assert hog.state is UnitState.out_of_memory
    assert hog.result["signal"] == "SIGKILL"
    assert hog.result["memory_limit"] == "watchdog"
    assert re.fullmatch(r"memory 100M exceeded: its processes held \d+M \(watchdog\)", hog.error)
    assert neighbour.state is UnitState.done
    assert (tmp_path / "run" / "work" / "neighbour.out").read_text() == "still here\n"
    status = cli(*args, "mode=status")
    assert re.search(r"^hog\s+OUT_OF_MEMORY\s+SIGKILL\s", status.out, re.M), status.out
    assert "hog: OUT_OF_MEMORY: memory 100M exceeded: its processes held" in status.out
    # the stage's row counts the hog as failed, as the end-of-run table does (it was in none)
    assert re.search(r"^work\s+jobs\s+failed\s+1\s+1\s+0\s+0\s", status.out, re.M), status.out
    assert re.search(r"^work\s+jobs\s+1\s+1\s+0\s+0\s+0\s", res.out, re.M), res.out


@pytest.mark.usefixtures("ray_session")
def test_jobs_start_by_priority_and_a_big_one_is_not_starved_by_small_ones(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    """On 2 CPUs: `first` runs; `big` (2 CPUs) waits for it with a reservation; `untimed` has
    no time limit and waits behind `big`; `quick` ends, by its time limit, before `big` could
    start and backfills beside `first`."""
    file = tmp_path / "jobs.yaml"
    jobs = [
        {"name": "untimed", "priority": 1, "cpus_per_task": 1, "script": "true"},
        {"name": "quick", "priority": 0, "cpus_per_task": 1, "time_limit": "5s", "script": "true"},
        {"name": "big", "priority": 5, "cpus_per_task": 2, "script": "true"},
        {
            "name": "first",
            "priority": 9,
            "cpus_per_task": 1,
            "time_limit": "1m",
            "script": "sleep 1.5",
        },
    ]
    file.write_text(json.dumps(jobs))
    res = cli(
        "pipeline=jobs_file",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
    )
    assert res.code == 0, res.text
    found = rows(tmp_path / "run")
    first, big, untimed, quick = (found[j] for j in ("first", "big", "untimed", "quick"))
    assert quick.ended <= first.ended  # backfilled beside `first`
    assert big.started >= first.ended  # then `big`, before `untimed` although it came first
    assert untimed.started >= big.ended
    wait_until(cpus_free_again, what="every job's CPU to be free")


def test_mode_cancel_stops_one_running_job_and_one_waiting_while_the_rest_completes(
    ray_session: str, tmp_path: Path, scratch: Path
) -> None:
    file = tmp_path / "jobs.yaml"
    jobs = [
        {  # ignores SIGTERM: killed after cancel_grace
            "name": "victim",
            "script": "trap '' TERM\necho $$ > victim.pid\n"
            "sleep 60 &\necho $! > victim.child\nwait",
        },
        {"name": "other", "script": "while [ ! -e go ]; do sleep 0.05; done\necho done"},
        {"name": "waiting", "cpus_per_task": 2, "script": "echo never"},
    ]
    file.write_text(json.dumps(jobs))
    args = (
        "pipeline=jobs_file",
        "cluster=ray",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
        "+pipeline.stages.work.cancel_grace=1",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    started = [scratch / "victim.pid", scratch / "victim.child"]
    wait_until(lambda: all(p.exists() and p.read_text() for p in started), what="victim to run")

    res = run_runner(*args, "mode=cancel", "units=[victim,waiting]", env=env)
    assert res.code == 0, res.text
    assert "work/victim: CANCELLED" in res.out and "work/waiting: CANCELLED" in res.out
    # its process group ends with it (by SIGKILL after the grace: on a busy machine a moment
    # after the ledger says CANCELLED)
    wait_until(
        lambda: not [pid for pid in pids(*started) if alive(pid)], what="the victim's processes"
    )
    unknown = run_runner(*args, "mode=cancel", "units=[nobody]", env=env)
    assert unknown.code == 2
    assert "no unit of the running run is named 'nobody'" in unknown.err

    (scratch / "go").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    found = rows(tmp_path / "run")
    assert {u: r.state for u, r in found.items()} == {
        "victim": UnitState.cancelled,
        "other": UnitState.done,
        "waiting": UnitState.cancelled,
    }
    assert not (tmp_path / "run" / "work" / "waiting.out").exists()
    after = run_runner(*args, "mode=cancel", "units=[other]", env=env)
    assert after.code == 2
    assert "no run in progress to cancel units of" in after.err
    wait_until(cpus_free_again, what="every job's CPU to be free")


def test_a_followed_jobs_file_runs_lines_appended_after_the_start_until_close(
    ray_session: str, tmp_path: Path, scratch: Path
) -> None:
    """SCNS's queue worker, restarted with every job so far done: it has nothing to run yet,
    and follows the file all the same."""
    file = tmp_path / "submit.jsonl"
    run_dir = tmp_path / "run"

    def submit(line: dict[str, object]) -> None:
        with file.open("a") as f:
            f.write(json.dumps(line) + "\n")

    submit({"job": {"name": "first", "cpus_per_task": 0.5}, "script": "echo 1 >> first.marks"})
    args = (
        "pipeline=jobs_scns",
        "cluster=ray",
        f"run.dir={run_dir}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
        "+pipeline.stages.work.follow=true",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(
        lambda: ledger_states(run_dir).get("first") == "done", timeout=60, what="the first job done"
    )
    assert proc.poll() is None  # still following
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err

    proc = runner_process(*args, env=env)
    log = run_dir / "runner.log"
    wait_until(
        lambda: "work: 0 unit(s) to run, 1 skipped (done)" in log.read_text(),
        timeout=60,
        what="the restarted run's plan",
    )
    submit({"job": {"name": "later", "cpus_per_task": 0.5}, "script": "echo 1 >> later.marks"})
    wait_until(lambda: (scratch / "later.marks").exists(), timeout=60, what="the appended job")
    assert proc.poll() is None  # still following
    submit({"close": True})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert {u: r.state for u, r in rows(run_dir).items()} == {
        "first": UnitState.done,
        "later": UnitState.done,
    }
    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    assert [marks(scratch, j) for j in ("first", "later")] == [1, 1]
    assert attempt(run_dir)["stages"]["work"]["skipped"] == 2
    wait_until(cpus_free_again, what="every job's CPU to be free")


def test_mode_cancel_stops_a_running_pool_item_and_a_running_shard_too(
    ray_session: str, tmp_path: Path, scratch: Path
) -> None:
    """The same `mode=cancel` for a pool item (its worker goes on with the next items) and a
    shard (its command's process is gone; the other shard commits)."""
    (scratch / "gate").touch()
    run = tmp_path / "run"
    args = ("pipeline=cancel_units", "cluster=ray", f"run.dir={run}")
    env = {"RAY_ADDRESS": ray_session, "RUNNER_TEST_SCRATCH": str(scratch)}
    proc = runner_process(*args, env=env)

    shard_pid = scratch / "shard-0.pid"
    wait_until((scratch / "started-3").exists, timeout=60, what="pool item 3 to run")
    wait_until(lambda: shard_pid.exists() and shard_pid.read_text(), what="shard 0-599 to run")
    res = run_runner(*args, "mode=cancel", "units=[3,0-599]", env=env)
    assert res.code == 0, res.text
    assert "items/3: CANCELLED" in res.out and "slices/0-599: CANCELLED" in res.out
    assert not alive(pids(shard_pid)[0])

    (scratch / "gate").unlink()
    out, err = proc.communicate(timeout=90)
    items, slices = unit_states(run, "items"), unit_states(run, "slices")
    assert items == {"3": UnitState.cancelled} | {str(i): UnitState.done for i in (0, 1, 2, 4, 5)}
    assert slices == {"0-599": UnitState.cancelled, "600-1199": UnitState.done}
    assert proc.returncode == 0, out + err
    assert "slices: cancelled ranges, not in the merge: 0-599" in out
    merged = pd.read_csv(run / "slices" / "merged.csv")
    assert merged["id"].min() == 600 and merged["id"].is_unique
    wait_until(cpus_free_again, what="every unit's CPU to be free")


@pytest.mark.usefixtures("ray_session")
def test_what_a_finished_job_left_running_is_killed_and_the_next_job_shares_the_guard(
    tmp_path: Path,
) -> None:
    """The jobs of one Ray worker take turns in one process group with one watcher: a job's
    leftovers die at its end, and the group and its watcher stay for the next job."""
    spec = {
        "argv": ["sh", "-c", "sleep 60 & echo $! > left"],
        "env": {},
        "cwd": str(tmp_path),
        "time_limit": None,
        "memory": 0,
        **{name: plain(Dest(str(tmp_path / f"{name}.log"))) for name in ("stdout", "stderr")},
    }

    def started_to(key: str) -> dict[str, Any]:
        return plain(StartTo(key, path=str(tmp_path / "started" / f"{key}.json")))

    first = run_job(spec, started_to("a"))
    assert first["state"] == "done"
    wait_until(lambda: not alive(pids(tmp_path / "left")[0]), what="the job's leftover to go")
    group, watcher = GROUP.ready(), GROUP.watcher
    assert watcher is not None and watcher.alive() and alive(watcher.pid)
    second = run_job(spec, started_to("b"))
    assert second["state"] == "done"
    assert (GROUP.ready(), GROUP.watcher) == (group, watcher)


def _job_spec(tmp_path: Path, argv: list[str]) -> dict[str, Any]:
    """A `run_job` argument for `argv`, its streams under `tmp_path`."""
    streams = {name: plain(Dest(str(tmp_path / f"{name}.log"))) for name in ("out", "err")}
    return {
        "argv": argv,
        "env": {},
        "cwd": str(tmp_path),
        "time_limit": None,
        "memory": 0,
        "stdout": streams["out"],
        "stderr": streams["err"],
    }


@pytest.mark.usefixtures("ray_session")
def test_a_job_says_where_it_runs_once_it_has_run_a_moment_or_else_in_its_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that ends before `ANNOUNCE_AFTER` writes no start file: its start comes in its
    reply (the Ray backend takes it out first). One still running by then says it in the
    start file, and its reply carries no second copy."""
    import ray

    def started_to(key: str) -> dict[str, Any]:
        return plain(StartTo(key, path=str(tmp_path / "started" / f"{key}.json")))

    monkeypatch.setattr("runner.placement.ANNOUNCE_AFTER", 600.0)  # ends long before
    quick = run_job(_job_spec(tmp_path, ["true"]), started_to("quick"))
    assert quick["state"] == "done"
    carried = quick[STARTED_KEY]
    assert carried["pid"] == os.getpid()
    assert carried["node_id"] == ray.get_runtime_context().get_node_id()
    assert carried["time"] == quick["started"]
    assert not (tmp_path / "started").exists()

    monkeypatch.setattr("runner.placement.ANNOUNCE_AFTER", 0.05)
    said = tmp_path / "started" / "slow.json"  # the job waits for it, up to a minute
    wait = f"for i in $(seq 600); do test -e {said} && exit 0; sleep 0.1; done; exit 1"
    slow = run_job(_job_spec(tmp_path, ["sh", "-c", wait]), started_to("slow"))
    assert slow["state"] == "done", slow
    assert STARTED_KEY not in slow
    assert json.loads(said.read_text())["time"] == slow["started"]


@pytest.mark.usefixtures("ray_session")
def test_a_start_that_cannot_be_said_comes_in_the_reply_and_the_job_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its start file cannot be made (here: its directory's place is a file): the job is not
    stopped for it, and its reply says where it ran."""
    (tmp_path / "started").write_text("")  # not a directory
    monkeypatch.setattr("runner.placement.ANNOUNCE_AFTER", 0.0)  # due at once
    to = plain(StartTo("k", path=str(tmp_path / "started" / "k.json")))
    reply = run_job(_job_spec(tmp_path, ["sh", "-c", "sleep 0.3; echo ran"]), to)
    assert reply["state"] == "done", reply
    assert (tmp_path / "out.log").read_text() == "ran\n"
    assert reply[STARTED_KEY]["time"] == reply["started"]
    assert "cannot say where k runs" in caplog.text


@pytest.fixture
def group() -> Iterator[JobsGroup]:
    """A jobs group of the test's own, let go at the end (watcher ended, anchor reaped)."""
    made = JobsGroup()
    yield made
    if made.watcher is not None:
        made.watcher.end(kill=True)
    if made.anchor is not None:
        with contextlib.suppress(ChildProcessError):  # the test may have reaped it
            os.waitpid(made.anchor.pid, 0)


def test_when_the_worker_goes_its_watcher_kills_the_job_running_in_the_group(
    group: JobsGroup,
) -> None:
    """The watcher's pipe from the worker closing (the worker died) kills the jobs' group."""
    pgid = group.ready()
    assert group.watcher is not None
    watcher = group.watcher.pid
    job = subprocess.Popen(["sleep", "60"], process_group=pgid)
    try:
        group.watcher.end(kill=False)
        group.watcher = None
        assert job.wait(timeout=30) == -signal.SIGKILL
        wait_until(lambda: not alive(watcher), what="the watcher to end")
    finally:
        job.kill()
        job.wait()


# A Ray worker as it exits: SIGKILL to each of its direct children (what
# RAY_kill_child_processes_on_worker_exit does), then the exit itself.
WORKER_EXIT = """
import os, signal, subprocess, sys
from runner.stages.jobs.task import JobsGroup
group = JobsGroup()
job = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, process_group=group.ready())
print(job.stdout.readline().decode().strip(), flush=True)
children = [int(c) for c in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()]
for child in children:
    os.kill(child, signal.SIGKILL)
os._exit(0)
"""


def test_a_job_s_own_children_die_when_its_worker_exits_killing_its_direct_children() -> None:
    """Ray kills a worker's direct children as it exits; the watcher is not one of them, so
    it still ends what the job started (a grandchild of the worker) once the worker is gone."""
    worker = subprocess.run(
        [sys.executable, "-c", WORKER_EXIT], capture_output=True, text=True, timeout=60
    )
    assert worker.returncode == 0, worker.stderr
    grandchild = int(worker.stdout)
    try:
        wait_until(lambda: not alive(grandchild), what="the job's own child to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_a_group_whose_anchor_someone_else_reaped_is_made_anew_and_left_alone(
    group: JobsGroup,
) -> None:
    """Once its id may be anyone's, the old group is not the jobs' any more: a new group and
    watcher take over, and the old watcher goes without killing anything."""
    old = group.ready()
    old_watcher = group.watcher
    assert old_watcher is not None
    bystander = subprocess.Popen(["sleep", "60"], process_group=old)
    try:
        os.waitpid(old, 0)  # someone else in the worker waited for the anchor
        assert group.ready() != old
        wait_until(lambda: not alive(old_watcher.pid), what="the old watcher to be killed")
        assert bystander.poll() is None  # the old group was not killed
        assert group.watcher is not None and group.watcher.alive()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_second_job_at_once_in_one_workers_group_is_refused(group: JobsGroup) -> None:
    """Two jobs at once in one group would end each other's processes: never with Ray's one
    task at a time per worker, and refused should that ever change."""
    with group.turn(), pytest.raises(RuntimeError, match="another job"), group.turn():
        pass
    with group.turn() as pgid:  # free again once the first job's turn is over
        assert pgid == group.ready()


# --- SCNS's exclusive: true: a node to itself --------------------------------------------------

EXCLUSIVE = [
    {"name": "first", "priority": 9, "cpus_per_task": 0.5, "script": "sleep 1"},
    {"name": "alone", "priority": 5, "cpus_per_task": 0.5, "exclusive": True, "script": "sleep 1"},
    {"name": "beside-a", "priority": 0, "cpus_per_task": 0.5, "script": "sleep 1"},
    {"name": "beside-b", "priority": 0, "cpus_per_task": 0.5, "script": "sleep 1"},
]


def exclusive_args(tmp_path: Path, scratch: Path) -> tuple[str, ...]:
    """Four half-CPU jobs, one of them exclusive: on 2 CPUs all four would fit at once."""
    file = tmp_path / "jobs.json"
    file.write_text(json.dumps(EXCLUSIVE))
    return (
        "pipeline=jobs_file",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.work.cwd={scratch}",
        f"pipeline.stages.work.jobs_file={file}",
    )


def test_the_plan_says_an_exclusive_job_needs_a_whole_node(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    args = exclusive_args(tmp_path, scratch)
    res = cli(*args, "mode=plan", "cluster.num_cpus=2")
    assert res.code == 0, res.text
    assert "exclusive job 'alone' (a whole node each): 0.5 CPU each; 1 wanted, 1 fit at once" in (
        res.out
    )
    assert "job of 'first', 'beside-a', 'beside-b': 0.5 CPU each; 3 wanted, 3 fit at once" in (
        res.out
    )
    huge = json.loads(json.dumps(EXCLUSIVE))
    huge[1]["cpus_per_task"] = 4
    (tmp_path / "jobs.json").write_text(json.dumps(huge))
    res = cli(*args, "mode=plan", "cluster.num_cpus=2")
    assert res.code == 2
    assert (
        "pipeline.stages.work: one exclusive job 'alone' (a whole node each) needs 4 CPU, more "
        "than any node has" in res.err
    )


def test_an_exclusive_job_runs_alone_on_the_simulated_node(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    """`cluster=sim` drives the same scheduler: `first` runs, `alone` waits for the node to
    empty (the two smaller jobs wait behind it, although they would fit beside `first`), then
    the two run together: three virtual seconds, not one."""
    res = cli(*exclusive_args(tmp_path, scratch), "cluster=sim", "cluster.nodes=[{cpus: 2}]")
    assert res.code == 0, res.text
    assert (
        "units in the order they started: work/first, work/alone, work/beside-a, work/beside-b"
        in res.out
    )
    assert "makespan from the first unit's start: 3 virtual seconds" in res.out


@pytest.mark.usefixtures("ray_session")
def test_nothing_runs_beside_an_exclusive_job_on_its_node(
    cli: Cli, tmp_path: Path, scratch: Path
) -> None:
    """On the session's one 2-CPU node four half-CPU jobs fit at once; the exclusive one
    starts once `first` has ended, the lower-priority ones after it, and the ledger's times
    and nodes show no job beside it while it ran."""
    res = cli(*exclusive_args(tmp_path, scratch))
    assert res.code == 0, res.text
    found = rows(tmp_path / "run")
    assert {r.state for r in found.values()} == {UnitState.done}
    alone = found.pop("alone")
    assert {r.node_id for r in found.values()} == {alone.node_id}  # they share its node
    for name, r in found.items():
        assert r.ended <= alone.started or r.started >= alone.ended, (name, r, alone)
    assert found["first"].ended <= alone.started  # ahead of it by priority
    # behind it by priority: kept off its node while it waited, though they fitted beside `first`
    assert found["beside-a"].started >= alone.ended and found["beside-b"].started >= alone.ended
    wait_until(cpus_free_again, what="every job's CPU to be free")


@pytest.mark.usefixtures("ray_session")
def test_a_failed_jobs_error_ends_with_the_last_line_it_wrote_to_stderr(
    cli: Cli, tmp_path: Path
) -> None:
    """'exit code 127' alone leaves the user to open the .err file: the error says why."""
    script = "pipeline.stages.first.jobs.0.command=[sh, -c, 'echo loading >&2; nosuchcmd --x']"
    res = cli("pipeline=needs_failed", f"run.dir={tmp_path}", script)
    assert res.code == 1, res.text
    line = "first: 1 job(s) did not complete: fails (exit code 127: sh: 1: nosuchcmd: not found)"
    assert line in res.out.splitlines(), res.out
    wait_until(cpus_free_again, what="the jobs' CPUs to be free")
