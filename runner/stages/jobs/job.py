"""The jobs of a jobs stage: each entry (inline or from `jobs_file`) read, checked against
`schema.JobSpec` with the same validator as stage keys, given the stage's defaults, expanded
over its array, and resolved to a `Job` with an absolute `cwd`.

`check` and `plan` both call `load_jobs`, so a job is read one way everywhere. A job may be
written as SCNS-Conductor's submit body (`{job: {account, name, partition, ntasks_per_node,
cpus_per_task, memory_per_node, time_limit, ...}, script}`), so its users' JSON runs as is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from runner.jsondata import line_error
from runner.quantities import DURATION_HELP, MEMORY_HELP, duration_seconds, memory_bytes
from runner.resources import Resources
from runner.spec import Problems
from runner.spec import build as build_spec  # the one validator: job keys read as stage keys
from runner.stages.jobs.schema import JobSpec, JobsStage
from runner.stages.jobs.task import JobTask

# a job's name becomes its log file names: keep it to a safe, shell-friendly alphabet
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# one array may expand to at most this many jobs: Slurm's own ceiling (MaxArraySize may be
# set up to 4000001, indices 0-4000000)
MAX_ARRAY = 4_000_001


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
    # SCNS's keys the executor places and accounts by
    partition: str | None = None
    account: str | None = None
    exclusive: bool = False
    priority: float = 0.0
    # absolute paths for the job's streams (None: the stage's <run.dir>/<stage>/JOB.out/.err)
    stdout: str | None = None
    stderr: str | None = None

    @property
    def argv(self) -> list[str]:
        # bash's $0 is the job's name, so its own error messages say which job
        return self.command or ["bash", "-c", self.script or "", self.id]

    def identity(self) -> str:
        """What the fingerprint hashes: what the job runs and where, never its resources."""
        what = {"script": self.script} if self.script is not None else {"command": self.command}
        return json.dumps({**what, "env": self.env, "cwd": self.cwd}, sort_keys=True)

    def record(self) -> dict[str, object]:
        """The job as the ledger keeps it (the `input` of its row)."""
        what = {"script": self.script} if self.script is not None else {"command": self.command}
        scns = {"account": self.account, "partition": self.partition}
        return {
            **what,
            "env": self.env,
            "cwd": self.cwd,
            "resources": self.resources.describe(),
            "time_limit": self.time_limit,
            **{k: v for k, v in scns.items() if v is not None},
            **({"exclusive": True} if self.exclusive else {}),
            "priority": self.priority,
        }

    def task_spec(self) -> JobTask:
        """What the Ray task needs to start the job."""
        env = {**self.env, "RUNNER_JOB_NAME": self.id}
        if self.index is not None:
            env["RUNNER_ARRAY_INDEX"] = str(self.index)
        return JobTask(
            argv=self.argv,
            env=env,
            cwd=self.cwd,
            time_limit=self.time_limit,
            memory=int(self.resources.memory),
        )


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
        job = _validated(submit_body(data), report)
        if job is None:
            continue
        if job.name in first_seen:
            report("name", f"= {job.name!r}: duplicate job name (also {first_seen[job.name]})")
            continue
        first_seen[job.name] = where
        jobs += _resolve(job, spec, defaults, report)
    if not entries and not spec.follow and not _has_file_problem(problems, path):
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


def _entries(spec: JobsStage, path: str, problems: Problems) -> list[tuple[str, Report, object]]:
    """(where, how to report a problem, raw mapping) for every job entry."""
    entries: list[tuple[str, Report, object]] = []
    for n, data in enumerate(spec.jobs):
        key = f"{path}.jobs.{n}"
        entries.append((f"jobs.{n}", _reporter(problems, key), data))
    if spec.jobs_file is not None:
        rows = _read_jobs_file(spec.jobs_file, spec.follow)
        if isinstance(rows, str):
            problems.add(f"{path}.jobs_file", f"= {spec.jobs_file!r}: {rows}")
            return entries
        for at, data in rows:
            where = f"{spec.jobs_file} {at}"
            entries.append((where, _file_reporter(problems, f"{path}.jobs_file", where), data))
    return entries


def _reporter(problems: Problems, key: str) -> Report:
    return lambda sub, message: problems.add(f"{key}.{sub}" if sub else key, message)


def _file_reporter(problems: Problems, key: str, where: str) -> Report:
    return lambda sub, message: problems.add(key, f"{where}{'.' + sub if sub else ''}: {message}")


def closes(data: object) -> bool:
    """The line `{"close": true}` that ends a followed jobs_file."""
    return isinstance(data, dict) and data == {"close": True}


def complete_lines(text: str) -> list[str]:
    """The lines of a JSONL file being written: the last one only once its newline is there."""
    return text.split("\n")[:-1]


def _read_jobs_file(value: str, follow: bool = False) -> list[tuple[str, object]] | str:
    """The job mappings of a YAML/JSON list or a JSONL file, each with where it is (`line 3`
    of a JSONL file, as an editor numbers it past blank lines; `job 3` of a list), or why
    they cannot be read (a followed file may be empty; its close line and an unfinished last
    line are left out)."""
    path = Path(value)
    if not path.is_file():
        return "no such file"
    if path.suffix not in (".yaml", ".yml", ".json", ".jsonl"):
        return "unknown format; use .yaml, .yml, .json or .jsonl"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read: {exc}"
    if follow and path.suffix != ".jsonl":
        return "follow: true reads a JSONL file (one job a line); use .jsonl"
    if not text.strip() and not follow:
        return "the file is empty; expected a list of jobs ({name, script | command, ...})"
    if path.suffix == ".jsonl":
        return _jsonl_jobs(complete_lines(text) if follow else text.splitlines(), follow)
    try:
        rows: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return f"{where}not valid YAML/JSON ({problem})"
    if not isinstance(rows, list) or not rows:
        return "expected a non-empty list of jobs ({name, script | command, ...})"
    return [(f"job {n}", data) for n, data in enumerate(rows, start=1)]


def _jsonl_jobs(lines: list[str], follow: bool) -> list[tuple[str, object]] | str:
    """The jobs of a JSONL file's lines, each named by its line (blank lines are counted and
    skipped; a followed file's close line is left out), or why a line cannot be read."""
    found: list[tuple[str, object]] = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                data = json.loads(line.rstrip("\r\n"))
            except ValueError as exc:
                return f"line {n} is not JSON {line_error(exc)}; expected one job object per line"
            if not (follow and closes(data)):
                found.append((f"line {n}", data))
    return found


def read_line(name: str, spec: JobsStage, data: object, where: str) -> tuple[list[Job], list[str]]:
    """One job appended to a followed jobs_file, read as `load_jobs` reads any: its jobs, or
    the problems that keep it from running."""
    problems = Problems(None)
    path = f"pipeline.stages.{name}"
    defaults = _defaults(spec, path, problems)
    report = _file_reporter(problems, f"{path}.jobs_file", where)
    job = _validated(submit_body(data), report)
    jobs = _resolve(job, spec, defaults, report) if job is not None else []
    return jobs, [f"{key}: {message}" for key, message in problems.items]


def submit_body(data: object) -> object:
    """SCNS's submit body, `{job: {...}, script: ...}`, as one flat job; anything else as is."""
    if isinstance(data, dict) and isinstance(data.get("job"), dict):
        return {**data["job"], **{k: v for k, v in data.items() if k != "job"}}
    return data


def _validated(data: object, report: Report) -> JobSpec | None:
    """The entry checked against `JobSpec` (types, unknown keys); None when unusable."""
    found = Problems(None)
    job = build_spec(JobSpec, data, "", found)
    for key, message in found.items:
        report(key.lstrip("."), message)
    if job is None:
        return None
    ok = not found.items
    # a script or command of the wrong type is said already, and left out of the job
    said = {key.lstrip(".") for key, _ in found.items} & {"script", "command"}
    if not NAME.fullmatch(job.name):
        report("name", f"= {job.name!r}: use letters, digits, '_', '.' and '-' only")
        ok = False
    if not said and (job.script is None) == (job.command is None):
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


def _good_command(command: Sequence[object]) -> bool:
    return bool(command) and all(isinstance(w, str | int | float) for w in command)


def _resolve(job: JobSpec, spec: JobsStage, defaults: _Defaults, report: Report) -> list[Job]:
    """The job with the stage's defaults, expanded over its array; [] after a problem."""
    ok = _one_of(job, report, ("memory", "memory_per_node"), ("cwd", "current_working_directory"))
    memory, memory_ok = _memory(job, defaults, report)
    limit, limit_ok = _time_limit(job, defaults, report)
    ok = ok and memory_ok and limit_ok
    indices: list[int | None] = [None]
    if job.array is not None:
        parsed = array_indices(job.array)
        if not parsed:
            report("array", f"= {job.array!r}: {_array_problem(parsed)}")
            return []
        indices = list(parsed)
    per_task = job.cpus_per_task if job.cpus_per_task is not None else spec.cpus_per_task
    resources = Resources(
        cpus=per_task * (job.ntasks_per_node or 1),
        gpus=job.gpus if job.gpus is not None else spec.gpus,
        memory=float(memory),
    )
    # an array's tasks mostly share one directory: resolved and checked once each
    places: dict[str, Path] = {}
    jobs = [_one(job, spec, index, resources, limit, places) for index in indices]
    if not _directories_exist(job, spec, jobs, report):
        return []
    return jobs if ok else []


def _memory(job: JobSpec, defaults: _Defaults, report: Report) -> tuple[int, bool]:
    """The job's memory in bytes (the stage's when it gives none), and whether it parsed."""
    memory_key = "memory" if job.memory is not None else "memory_per_node"
    memory_text = job.memory if job.memory is not None else job.memory_per_node
    if memory_text is None:
        return defaults.memory, True
    parsed_memory = memory_bytes(memory_text)
    if parsed_memory is None:
        report(memory_key, f"= {memory_text!r}: {MEMORY_HELP}")
        return 0, False
    return parsed_memory, True


def _time_limit(job: JobSpec, defaults: _Defaults, report: Report) -> tuple[float | None, bool]:
    """The job's time limit in seconds (the stage's when it gives none), and whether it
    parsed."""
    if job.time_limit is None:
        return defaults.time_limit, True
    limit = duration_seconds(job.time_limit)
    if limit is None:
        report("time_limit", f"= {job.time_limit!r}: {DURATION_HELP}")
        return None, False
    return limit, True


def _directories_exist(job: JobSpec, spec: JobsStage, jobs: list[Job], report: Report) -> bool:
    """Whether every task's working directory exists; the first missing one is reported."""
    seen: set[str] = set()
    for resolved in jobs:
        if resolved.cwd in seen:
            continue
        seen.add(resolved.cwd)
        if not Path(resolved.cwd).is_dir():
            own = _cwd(job)
            given = _fill(own if own is not None else spec.cwd or "", resolved.index)
            where = "" if Path(given).is_absolute() else f" (relative to {os.getcwd()})"
            key = "current_working_directory" if job.current_working_directory else "cwd"
            report(key, f"= {given!r}: no such directory{where}")
            return False
    return True


def _one_of(job: JobSpec, report: Report, *pairs: tuple[str, str]) -> bool:
    """A key and its SCNS name are one setting: give one of them."""
    ok = True
    for ours, scns in pairs:
        if getattr(job, ours) is not None and getattr(job, scns) is not None:
            report(scns, f"= {getattr(job, scns)!r}: give {ours} or {scns} (SCNS's name), not both")
            ok = False
    return ok


def _cwd(job: JobSpec) -> str | None:
    return job.cwd if job.cwd is not None else job.current_working_directory


def _one(
    job: JobSpec,
    spec: JobsStage,
    index: int | None,
    resources: Resources,
    limit: float | None,
    places: dict[str, Path],
) -> Job:
    merged = {**spec.env, **job.environment, **job.env}
    env = {str(k): _fill(_env_text(v), index) for k, v in merged.items()}
    given = _cwd(job)
    cwd = _fill(given if given is not None else spec.cwd or ".", index)
    where = places.get(cwd)
    if where is None:
        where = places[cwd] = Path(cwd).expanduser().absolute()
    return Job(
        id=job.name if index is None else f"{job.name}[{index}]",
        script=None if job.script is None else _fill(job.script, index),
        command=None if job.command is None else [_fill(str(w), index) for w in job.command],
        env=env,
        cwd=str(where),
        resources=resources,
        time_limit=limit,
        index=index,
        partition=job.partition,
        account=job.account,
        exclusive=job.exclusive,
        priority=job.priority if job.priority is not None else spec.priority,
        stdout=_stream(job.standard_output, where, index),
        stderr=_stream(job.standard_error, where, index),
    )


def _stream(path: str | None, cwd: Path, index: int | None) -> str | None:
    """A job's stream file as an absolute path, relative ones from its cwd (as SCNS does)."""
    return None if path is None else str(cwd / Path(_fill(path, index)).expanduser())


def _env_text(value: object) -> str:
    """An environment variable's text as the YAML wrote it: `true`/`false` for a boolean (not
    Python's `True`), empty for null (not `None`), a number's digits."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


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
        span = range(low, high + 1, int(match[3] or 1))
        if len(indices) + len(span) > MAX_ARRAY:  # before a typo's billion indices are made
            return None
        indices += span
    return list(dict.fromkeys(indices))


def _array_problem(parsed: list[int] | None) -> str:
    if parsed is None:
        return (
            f"expected LOW-HIGH[:STEP], a comma list of them, or one index "
            f"(at most {MAX_ARRAY} jobs), e.g. 1-100"
        )
    return "the array range is empty: write LOW-HIGH with LOW <= HIGH, e.g. 1-100"
