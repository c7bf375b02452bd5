"""The jobs of a jobs stage: each entry (inline or from `jobs_file`) read, checked against
`schema.JobSpec` with the same validator as stage keys, given the stage's defaults, expanded
over its array, and resolved to a `Job` with an absolute `cwd`.

`check` and `plan` both call `load_jobs`, so a job is read one way everywhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runner.quantities import DURATION_HELP, MEMORY_HELP, duration_seconds, memory_bytes
from runner.resources import Resources
from runner.schema import JobSpec, JobsStage
from runner.spec import Problems
from runner.spec import build as build_spec  # the one validator: job keys read as stage keys

# a job's name becomes its log file names: keep it to a safe, shell-friendly alphabet
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# one array may expand to at most this many jobs
MAX_ARRAY = 100_000


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
        return "no such file"
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
