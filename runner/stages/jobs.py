"""The `jobs` stage: heterogeneous shell jobs, each with its own resources, run as far as they fit.

It replaces a home-made Slurm-like service, and is built against that service's faults. Every
job is a Ray task asking Ray for exactly its CPUs, memory and GPUs, so Ray's own accounting
holds the limits (no counter of ours can drift), after the run's scheduler has admitted it by
priority. A job runs in its own process group, killed whole at its time limit, on Ctrl-C and
when its Ray worker dies (a watcher process outlives the worker and ends the group), so nothing
a job started is left running. A job whose worker dies is retried or marked failed, never left
running; a job's own failure is final and its siblings go on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource as rusage
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.cluster import ClusterInfo
from runner.plan import (
    Claim,
    PlanContext,
    StagePlan,
    Unit,
    claim,
    decider,
    digest,
    result_config,
)
from runner.procs import kill_group
from runner.quantities import DURATION_HELP, MEMORY_HELP, duration_seconds, memory_bytes
from runner.resources import Resources
from runner.schema import JobSpec, JobsStage, StageSpec
from runner.spec import Problems
from runner.spec import build as build_spec  # the one validator: job keys read as stage keys
from runner.stages.base import RunContext, StageKind, StageOutcome
from runner.store import UnitRow, UnitState

log = logging.getLogger(__name__)

# a job's name becomes its log file names: keep it to a safe, shell-friendly alphabet
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# one array may expand to at most this many jobs
MAX_ARRAY = 100_000
# per-job keys that only size the job: left out of the stage config the fingerprints hash
RESOURCE_KEYS = ("cpus_per_task", "memory", "gpus", "time_limit")
# seconds between SIGTERM and SIGKILL when a job's process group is stopped
KILL_GRACE = 3.0
# seconds the driver waits for cancelled tasks to stop their jobs before force-killing them
CANCEL_WAIT = KILL_GRACE + 2.0

# --- the jobs of a stage -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One resolved job: stage defaults applied, array index filled in, paths absolute."""

    id: str
    script: str | None
    command: list[str] | None
    env: dict[str, str]
    cwd: str
    resources: Resources
    time_limit: float | None
    index: int | None = None

    @property
    def argv(self) -> list[str]:
        # bash's $0 is the job's name, so its own error messages say which job
        return self.command or ["bash", "-c", self.script or "", self.id]

    def identity(self) -> str:
        """What the fingerprint hashes: what the job runs and where, never its resources."""
        what = {"script": self.script} if self.script is not None else {"command": self.command}
        return json.dumps({**what, "env": self.env, "cwd": self.cwd}, sort_keys=True)

    def record(self) -> dict[str, Any]:
        """The job as the ledger keeps it (the `input` of its row)."""
        what = {"script": self.script} if self.script is not None else {"command": self.command}
        return {
            **what,
            "env": self.env,
            "cwd": self.cwd,
            "resources": self.resources.describe(),
            "time_limit": self.time_limit,
        }

    def task_spec(self) -> dict[str, Any]:
        """What the Ray task needs to start the job."""
        env = {**self.env, "RUNNER_JOB_NAME": self.id}
        if self.index is not None:
            env["RUNNER_ARRAY_INDEX"] = str(self.index)
        return {"argv": self.argv, "env": env, "cwd": self.cwd, "time_limit": self.time_limit}


# reports one problem of one job: (key below the job, message)
Report = Callable[[str, str], None]


def load_jobs(name: str, spec: JobsStage, problems: Problems) -> list[Job]:
    """Every job of the stage, inline then from `jobs_file`, checked; problems are reported."""
    path = f"pipeline.stages.{name}"
    defaults = _defaults(spec, path, problems)
    jobs: list[Job] = []
    first_seen: dict[str, str] = {}
    entries = _entries(spec, path, problems)
    for where, report, data in entries:
        job = _validated(data, report)
        if job is None:
            continue
        if job.name in first_seen:
            report("name", f"= {job.name!r}: duplicate job name (also {first_seen[job.name]})")
            continue
        first_seen[job.name] = where
        jobs += _resolve(job, spec, defaults, report)
    if not entries and not _has_file_problem(problems, path):
        problems.add(f"{path}.jobs", "a jobs stage needs at least one job: set jobs or jobs_file")
    return jobs


def _has_file_problem(problems: Problems, path: str) -> bool:
    return any(key == f"{path}.jobs_file" for key, _ in problems.items)


@dataclass(frozen=True)
class _Defaults:
    memory: int
    time_limit: float | None


def _defaults(spec: JobsStage, path: str, problems: Problems) -> _Defaults:
    """The stage-level memory and time limit, checked once for all jobs."""
    memory, limit = 0, None
    if spec.memory is not None:
        parsed = memory_bytes(spec.memory)
        if parsed is None:
            problems.add(f"{path}.memory", f"= {spec.memory!r}: {MEMORY_HELP}")
        memory = parsed or 0
    if spec.time_limit is not None:
        limit = duration_seconds(spec.time_limit)
        if limit is None:
            problems.add(f"{path}.time_limit", f"= {spec.time_limit!r}: {DURATION_HELP}")
    return _Defaults(memory, limit)


def _entries(spec: JobsStage, path: str, problems: Problems) -> list[tuple[str, Report, Any]]:
    """(where, how to report a problem, raw mapping) for every job entry."""
    entries: list[tuple[str, Report, Any]] = []
    for n, data in enumerate(spec.jobs):
        key = f"{path}.jobs.{n}"
        entries.append((f"jobs.{n}", _reporter(problems, key), data))
    if spec.jobs_file is not None:
        rows = _read_jobs_file(spec.jobs_file)
        if isinstance(rows, str):
            problems.add(f"{path}.jobs_file", f"= {spec.jobs_file!r}: {rows}")
            return entries
        for n, data in enumerate(rows, start=1):
            where = f"{spec.jobs_file} job {n}"
            entries.append((where, _file_reporter(problems, f"{path}.jobs_file", where), data))
    return entries


def _reporter(problems: Problems, key: str) -> Report:
    return lambda sub, message: problems.add(f"{key}.{sub}" if sub else key, message)


def _file_reporter(problems: Problems, key: str, where: str) -> Report:
    return lambda sub, message: problems.add(key, f"{where}{'.' + sub if sub else ''}: {message}")


def _read_jobs_file(value: str) -> list[Any] | str:
    """The job mappings of a YAML/JSON list or a JSONL file, or why they cannot be read."""
    path = Path(value)
    if not path.is_file():
        return f"no such file (relative to {os.getcwd()})"
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif path.suffix in (".yaml", ".yml", ".json"):
            rows = yaml.safe_load(text)
        else:
            return "unknown format; use .yaml, .yml, .json or .jsonl"
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return f"cannot read: {exc}"
    if not isinstance(rows, list) or not rows:
        return "expected a non-empty list of jobs"
    return rows


def _validated(data: Any, report: Report) -> JobSpec | None:
    """The entry checked against `JobSpec` (types, unknown keys); None when unusable."""
    found = Problems(None)
    job = build_spec(JobSpec, data, "", found)
    for key, message in found.items:
        report(key.lstrip("."), message)
    if job is None:
        return None
    ok = not found.items
    if not NAME.fullmatch(job.name):
        report("name", f"= {job.name!r}: use letters, digits, '_', '.' and '-' only")
        ok = False
    if (job.script is None) == (job.command is None):
        both = "both" if job.script is not None else "neither"
        report("", f"job {job.name!r} sets {both} of script and command: set exactly one")
        ok = False
    elif job.script is not None and not job.script.strip():
        report("script", f"= {job.script!r}: the script of job {job.name!r} is empty")
        ok = False
    elif job.command is not None and not _good_command(job.command):
        report("command", f"= {job.command!r}: expected a non-empty list of words")
        ok = False
    return job if ok else None


def _good_command(command: list[Any]) -> bool:
    return bool(command) and all(isinstance(w, str | int | float) for w in command)


def _resolve(job: JobSpec, spec: JobsStage, defaults: _Defaults, report: Report) -> list[Job]:
    """The job with the stage's defaults, expanded over its array; [] after a problem."""
    memory, limit = defaults.memory, defaults.time_limit
    ok = True
    if job.memory is not None:
        parsed_memory = memory_bytes(job.memory)
        if parsed_memory is None:
            report("memory", f"= {job.memory!r}: {MEMORY_HELP}")
            ok = False
        memory = parsed_memory or 0
    if job.time_limit is not None:
        limit = duration_seconds(job.time_limit)
        if limit is None:
            report("time_limit", f"= {job.time_limit!r}: {DURATION_HELP}")
            ok = False
    indices: list[int | None] = [None]
    if job.array is not None:
        parsed = array_indices(job.array)
        if not parsed:
            report("array", f"= {job.array!r}: {_array_problem(parsed)}")
            return []
        indices = list(parsed)
    resources = Resources(
        cpus=job.cpus_per_task if job.cpus_per_task is not None else spec.cpus_per_task,
        gpus=job.gpus if job.gpus is not None else spec.gpus,
        memory=float(memory),
    )
    jobs = [_one(job, spec, index, resources, limit) for index in indices]
    for resolved in jobs:
        if not Path(resolved.cwd).is_dir():
            given = _fill(job.cwd if job.cwd is not None else spec.cwd or "", resolved.index)
            where = "" if Path(given).is_absolute() else f" (relative to {os.getcwd()})"
            report("cwd", f"= {given!r}: no such directory{where}")
            return []
    return jobs if ok else []


def _one(
    job: JobSpec, spec: JobsStage, index: int | None, resources: Resources, limit: float | None
) -> Job:
    env = {str(k): _fill(str(v), index) for k, v in {**spec.env, **job.env}.items()}
    cwd = _fill(job.cwd if job.cwd is not None else spec.cwd or ".", index)
    return Job(
        id=job.name if index is None else f"{job.name}[{index}]",
        script=None if job.script is None else _fill(job.script, index),
        command=None if job.command is None else [_fill(str(w), index) for w in job.command],
        env=env,
        cwd=str(Path(cwd).expanduser().absolute()),
        resources=resources,
        time_limit=limit,
        index=index,
    )


def _fill(text: str, index: int | None) -> str:
    """`{index}` replaced by the array index; every other brace is the script's own."""
    return text if index is None else text.replace("{index}", str(index))


def array_indices(value: str | int) -> list[int] | None:
    """Slurm's array syntax: `1-100`, `0-30:10`, `1,3,5-7`, `7`; None when unreadable or too
    large, [] when the ranges are empty."""
    if isinstance(value, int):
        return [value] if value >= 0 else None
    indices: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+)(?::(\d+))?)?\s*", part)
        if match is None or (match[3] is not None and int(match[3]) < 1):
            return None
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        indices += range(low, high + 1, int(match[3] or 1))
        if len(indices) > MAX_ARRAY:
            return None
    return list(dict.fromkeys(indices))


def _array_problem(parsed: list[int] | None) -> str:
    if parsed is None:
        return (
            f"expected LOW-HIGH[:STEP], a comma list of them, or one index "
            f"(at most {MAX_ARRAY} jobs), e.g. 1-100"
        )
    return "the array range is empty: write LOW-HIGH with LOW <= HIGH, e.g. 1-100"


# --- spec checks and planning ------------------------------------------------------------


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Every job readable, named once, runnable (script or command, a cwd that exists)."""
    assert isinstance(spec, JobsStage)
    load_jobs(name, spec, problems)


def plan(name: str, spec: StageSpec, raw: dict[str, Any], ctx: PlanContext) -> StagePlan:
    """One unit per job (fingerprint: what it runs, its env and cwd, its upstream stages),
    one claim per job shape, and a warning when `max_concurrent` asks for more than fits."""
    assert isinstance(spec, JobsStage)
    problems = Problems(None)
    jobs = load_jobs(name, spec, problems)
    problems.raise_if_any()
    config = _config(spec, raw)
    upstream = [ctx.upstream[n].fingerprint for n in spec.needs]
    decide = decider(name, config, ctx)
    units = [decide(Unit(j.id, digest(j.identity(), *upstream), j)) for j in jobs]
    to_run: list[Job] = [u.payload for u in units if u.run]
    if warning := _concurrency_warning(name, spec.max_concurrent, to_run, ctx.cluster):
        log.warning(warning)
    fingerprint = digest("jobs", *(u.fingerprint for u in units))
    return StagePlan(name, "jobs", spec, fingerprint, config, units, _claims(to_run, ctx.cluster))


def _config(spec: JobsStage, raw: dict[str, Any]) -> dict[str, Any]:
    """The stage's result config, with each inline job's resource keys left out too."""
    config = result_config(spec, raw)
    config["jobs"] = [
        {k: v for k, v in job.items() if k not in RESOURCE_KEYS} if isinstance(job, dict) else job
        for job in config.get("jobs", [])
    ]
    return config


def _shapes(jobs: list[Job]) -> dict[Resources, list[str]]:
    shapes: dict[Resources, list[str]] = {}
    for job in jobs:
        shapes.setdefault(job.resources, []).append(job.id)
    return shapes


def _claims(jobs: list[Job], cluster: ClusterInfo) -> list[Claim]:
    """One claim per resource shape; a shape no node can hold is a plan error naming its jobs."""
    return [claim(_label(ids), res, len(ids), cluster) for res, ids in _shapes(jobs).items()]


def _label(ids: list[str]) -> str:
    if len(ids) == 1:
        return f"job '{ids[0]}'"
    shown = ", ".join(f"'{i}'" for i in ids[:3])
    return f"job of {shown}" + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def _concurrency_warning(
    name: str, wanted: int | None, jobs: list[Job], cluster: ClusterInfo
) -> str | None:
    """Say how many jobs can really run at once when `max_concurrent` asks for more."""
    if wanted is None or len(jobs) < 2:
        return None
    can = max(claim("", res, wanted, cluster).fit for res in _shapes(jobs))
    if can >= min(wanted, len(jobs)):
        return None
    return (
        f"{name}: max_concurrent={wanted}, but the cluster holds at most {can} of these jobs "
        f"at once; {can} will run at a time"
    )


# --- inside the Ray task -----------------------------------------------------------------

# The leader of a job's process group, started before the job: it holds a pipe from the Ray
# worker, so when the worker dies (crash, OOM kill, its driver SIGKILLed) it reads EOF and kills
# the whole group. It ignores SIGTERM, so it still guards the group during the kill grace.
_WATCHER = "trap '' TERM INT HUP; read -r _; kill -KILL 0"


def run_job(spec: dict[str, Any], out: str, err: str) -> dict[str, Any]:
    """Run one job to its end in its own process group; what happened, as the ledger keeps it.

    A cancel from the driver arrives as KeyboardInterrupt; the group is stopped either way."""
    node = socket.gethostname()
    started = time.time()
    cpu_before = _children_cpu()
    watcher = subprocess.Popen(
        ["bash", "-c", _WATCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        process_group=0,
    )
    proc: subprocess.Popen[bytes] | None = None
    timed_out = False
    try:
        proc = _start(spec, out, err, group=watcher.pid)
        timed_out = _wait(proc, spec["time_limit"], started)
    except OSError as exc:
        error = f"cannot start: {exc}"
        return {"state": "failed", "error": error, "node": node, "started": started}
    finally:
        _stop_group(watcher, proc)
    assert proc is not None
    return _outcome(proc, timed_out, node, started, _children_cpu() - cpu_before, spec)


def _start(spec: dict[str, Any], out: str, err: str, group: int) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        return subprocess.Popen(
            spec["argv"],
            cwd=spec["cwd"],
            env={**os.environ, **spec["env"]},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=group,
        )


def _wait(proc: subprocess.Popen[bytes], limit: float | None, started: float) -> bool:
    """Wait for the job's own process to exit; True when the time limit came first."""
    while proc.poll() is None:
        if limit is not None and time.time() - started >= limit:
            return True
        time.sleep(0.05)
    return False


def _stop_group(watcher: subprocess.Popen[bytes], proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a job still running and give it KILL_GRACE to end, then SIGKILL its whole group
    (also after a normal exit: nothing a job started outlives it), watcher included."""
    if proc is not None and proc.poll() is None:
        kill_group(watcher.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    kill_group(watcher.pid, signal.SIGKILL)
    if proc is not None:
        if proc.poll() is None:  # it left the group (setsid): it is still the job's to end
            proc.kill()
        proc.wait()
    watcher.wait()


def _outcome(
    proc: subprocess.Popen[bytes],
    timed_out: bool,
    node: str,
    started: float,
    cpu: float,
    spec: dict[str, Any],
) -> dict[str, Any]:
    code = proc.returncode
    sig = signal.Signals(-code).name if code < 0 else None
    if timed_out:
        state, error = "timeout", f"time_limit {spec['time_limit']:g}s exceeded"
    elif code == 0:
        state, error = "done", None
    else:
        state, error = "failed", f"killed by {sig}" if sig else f"exit code {code}"
    return {
        "state": state,
        "error": error,
        "node": node,
        "started": started,
        "ended": time.time(),
        "exit_code": code if code >= 0 else None,
        "signal": sig,
        "pid": proc.pid,
        "cpu": cpu,
    }


def _children_cpu() -> float:
    usage = rusage.getrusage(rusage.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_remote_job: Any = None


def _remote() -> Any:
    global _remote_job
    if _remote_job is None:
        import ray

        _remote_job = ray.remote(run_job)
    return _remote_job


# --- the driver --------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    unit: Unit
    attempts: int = 0
    grant: Any = None
    submitted: float = 0.0

    @property
    def job(self) -> Job:
        job: Job = self.unit.payload
        return job


@dataclass
class _Tally:
    done: int = 0
    failed: int = 0
    timeout: int = 0
    cancelled: int = 0
    cpu: float = 0.0
    problems: list[str] = field(default_factory=list)


class JobsRun:
    """Drives one jobs stage: admission, Ray tasks, outcomes, retries, cancellation, ledger."""

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        assert isinstance(stage.spec, JobsStage)
        self.stage, self.spec, self.ctx = stage, stage.spec, ctx
        self.pending: deque[_Entry] = deque(_Entry(u) for u in stage.to_run)
        self.running: dict[Any, _Entry] = {}
        self.logs = ctx.stage_dir(stage.name).resolve()
        self.tally = _Tally()

    def run(self) -> StageOutcome:
        t0 = time.monotonic()
        total = len(self.stage.units or [])
        outcome = StageOutcome(self.stage.name, "jobs", total=total)
        outcome.skipped = total - len(self.pending)
        self._write([self._row(e, UnitState.pending) for e in self.pending])
        self.ctx.progress.start(self.stage.name, len(self.pending))
        try:
            self._loop()
        finally:
            self._cancel_all()
            self.ctx.progress.finish(self.stage.name)
        outcome.wall = time.monotonic() - t0
        return self._conclude(outcome)

    def _conclude(self, outcome: StageOutcome) -> StageOutcome:
        t = self.tally
        outcome.done, outcome.failed, outcome.timeout = t.done, t.failed, t.timeout
        outcome.cancelled, outcome.cpu_seconds = t.cancelled, t.cpu
        outcome.interrupted = self.ctx.stop.is_set()
        outcome.outputs.append(str(self.logs))
        if t.problems:
            shown = ", ".join(t.problems[:5]) + (" ..." if len(t.problems) > 5 else "")
            outcome.message = f"{len(t.problems)} job(s) did not complete: {shown}"
        outcome.ok = not t.problems and not outcome.interrupted
        return outcome

    def _loop(self) -> None:
        import ray

        while (self.pending or self.running) and not self.ctx.stop.is_set():
            self._admit()
            if not self.running:
                self.ctx.stop.wait(0.2)
                continue
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.2)
            for ref in ready:
                self._collect(ref)

    def _admit(self) -> None:
        """Start every pending job the scheduler grants now, in order; a job that does not fit
        lets smaller ones behind it start (backfill)."""
        cap = self.spec.max_concurrent
        refused: set[Resources] = set()
        for entry in list(self.pending):
            if self.ctx.stop.is_set() or (cap is not None and len(self.running) >= cap):
                return
            res = entry.job.resources
            if res in refused:
                continue
            grant = self.ctx.scheduler.acquire(
                f"{self.stage.name}/{entry.unit.id}", res, self.spec.priority, timeout=0
            )
            if grant is None:
                refused.add(res)
                continue
            self.pending.remove(entry)
            self._launch(entry, grant)

    def _launch(self, entry: _Entry, grant: Any) -> None:
        job = entry.job
        entry.grant, entry.attempts, entry.submitted = grant, entry.attempts + 1, time.time()
        out, err = self._log_paths(job.id)
        ref = (
            _remote()
            .options(**job.resources.ray_options(), max_retries=0, name=f"job {job.id}")
            .remote(job.task_spec(), out, err)
        )
        self.running[ref] = entry
        self._write([self._row(entry, UnitState.running, started=entry.submitted)])

    def _log_paths(self, job_id: str) -> tuple[str, str]:
        return str(self.logs / f"{job_id}.out"), str(self.logs / f"{job_id}.err")

    def _collect(self, ref: Any) -> None:
        import ray

        entry = self.running.pop(ref)
        self.ctx.scheduler.release(entry.grant)
        try:
            reply = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            self._finish(entry, {"state": "cancelled", "error": "cancelled"})
        except ray.exceptions.RayTaskError as exc:  # run_job itself raised: a bug, say what
            self._finish(entry, {"state": "failed", "error": _first_line(exc)})
        except ray.exceptions.RayError as exc:  # the worker died (crash, OOM kill, node lost)
            self._worker_died(entry, exc)
        else:
            self._finish(entry, reply)

    def _worker_died(self, entry: _Entry, exc: Exception) -> None:
        if entry.attempts <= self.spec.retries:
            log.warning(
                "%s: the Ray worker of job %s died (%s); starting it again (attempt %d of %d)",
                self.stage.name,
                entry.unit.id,
                type(exc).__name__,
                entry.attempts + 1,
                self.spec.retries + 1,
            )
            self.pending.appendleft(entry)
            self._write([self._row(entry, UnitState.pending)])
            return
        error = f"its Ray worker died ({type(exc).__name__}) on attempt {entry.attempts}"
        self._finish(entry, {"state": "failed", "error": error})

    def _finish(self, entry: _Entry, reply: Mapping[str, Any]) -> None:
        state = UnitState(reply["state"])
        started = reply.get("started", entry.submitted)
        ended = reply.get("ended", time.time())
        details = {k: reply.get(k) for k in ("exit_code", "signal", "node", "pid")}
        node, error = reply.get("node"), reply.get("error")
        self._write([self._row(entry, state, started, ended, error, details, node)])
        self.tally.cpu += reply.get("cpu", 0.0)
        setattr(self.tally, state.value, getattr(self.tally, state.value) + 1)
        if state in (UnitState.failed, UnitState.timeout):
            self.tally.problems.append(f"{entry.unit.id} ({error})")
        if state is not UnitState.cancelled:
            ok = state is UnitState.done
            self.ctx.progress.advance(self.stage.name, done=int(ok), failed=int(not ok))

    def _cancel_all(self) -> None:
        """Cancel running jobs (their tasks stop their process groups), wait a little for that,
        force-kill the workers of the rest (their watchers end the groups), record them."""
        import ray

        for ref in self.running:
            ray.cancel(ref)
        if self.running:
            refs = list(self.running)
            done, late = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT)
            for ref in late:
                ray.cancel(ref, force=True)
            for ref in done:
                self._collect(ref)
            for ref in late:
                entry = self.running.pop(ref)
                self.ctx.scheduler.release(entry.grant)
                self._finish(entry, {"state": "cancelled", "error": "cancelled"})
        rows = [self._row(e, UnitState.cancelled, error="cancelled") for e in self.pending]
        self.tally.cancelled += len(self.pending)
        self.pending.clear()
        self._write(rows)

    def _row(
        self,
        entry: _Entry,
        state: UnitState,
        started: float | None = None,
        ended: float | None = None,
        error: str | None = None,
        details: dict[str, Any] | None = None,
        node: str | None = None,
    ) -> UnitRow:
        out, err = self._log_paths(entry.unit.id)
        result = {**(details or {}), "stdout": out, "stderr": err}
        duration = ended - started if started is not None and ended is not None else None
        return UnitRow(
            self.stage.name,
            entry.unit.id,
            entry.unit.fingerprint,
            state,
            entry.attempts,
            started,
            ended,
            duration,
            node,
            error,
            entry.job.record(),
            result,
        )

    def _write(self, rows: list[UnitRow]) -> None:
        self.ctx.ledger.write(rows)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return JobsRun(stage, ctx).run()


KIND = StageKind(JobsStage, check, plan, run)
