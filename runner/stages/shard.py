"""The `shard` stage: a dataset cut into id ranges, each run by a command or a function on its
own GPU group, outputs committed one by one and merged.

Hand-rolled launchers (R2R's `auto_scheduler.py`) mark a range done when its worker *starts*,
drop ranges beyond the free GPU groups, wait for the slowest worker of each batch, and merge
whatever files lie in the directory. Here a shard is done only once its output is complete and
committed (row count checked, renamed, manifest written, then the ledger row); every range is
queued and runs as soon as a GPU group frees up (no batch barrier); Ray owns GPU placement, so
two shards never share a GPU; the merge reads the manifests of this plan only.

Ranges are over the sorted unique ids, so they do not depend on the file's row order. A
shard's fingerprint hashes the stage's result config, its range and the input's identity
(path, size, mtime): a resumed run decides from metadata and the ledger, never by re-reading
the data. Files of a shard live in `<run.dir>/<stage>/shards/` under `shard-NNNN.*`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import string
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import gpus, procs
from runner.errors import PlanError
from runner.merge import Committed, manifest_of, merge, read_table, write_table
from runner.plan import PlanContext, StagePlan, Unit, claim, decider, digest, result_config
from runner.plan import stage_fingerprint as fingerprint_of
from runner.resources import Resources
from runner.schema import ShardStage, StageSpec
from runner.spec import Problems, did_you_mean
from runner.stages.base import RunContext, StageKind, StageOutcome
from runner.stages.pool import import_error
from runner.store import Ledger, UnitRow, UnitState, write_json

log = logging.getLogger(__name__)

PLACEHOLDERS = ("input", "output", "low", "high", "gpus", "shard", "done")
INPUT_SUFFIXES = (".csv", ".parquet")
FORMATS = ("parquet", "csv")
MERGE_KEYS = ("sort_by", "format")
# log lines quoted when a shard fails for good
TAIL_LINES = 15
POLL_SECONDS = 0.2
# how long a cancelled shard's task gets to kill its command before Ray kills the task
CANCEL_GRACE = 3.0


# --- spec checks -------------------------------------------------------------------------


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """The input exists and has the id column; one of command / fn, with known placeholders."""
    assert isinstance(spec, ShardStage)
    path = f"pipeline.stages.{name}"
    _check_input(spec, path, problems)
    _check_work(spec, path, problems)
    _check_merge(spec.merge, f"{path}.merge", problems)
    if spec.gpus_per_shard > 1 and spec.gpus_per_shard != int(spec.gpus_per_shard):
        problems.add(
            f"{path}.gpus_per_shard",
            f"= {spec.gpus_per_shard!r}: above 1, GPUs per shard must be a whole number "
            "(a fraction below 1 shares a GPU)",
        )


def _check_input(spec: ShardStage, path: str, problems: Problems) -> None:
    source = Path(spec.input)
    if not source.is_file():
        problems.add(f"{path}.input", f"= {spec.input!r}: no such file (relative to {os.getcwd()})")
        return
    if source.suffix not in INPUT_SUFFIXES:
        problems.add(
            f"{path}.input", f"= {spec.input!r}: unknown format; use a .csv or .parquet file"
        )
        return
    try:
        columns = _columns(source)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        problems.add(f"{path}.input", f"= {spec.input!r}: cannot read: {exc}")
        return
    if spec.id_column not in columns:
        problems.add(
            f"{path}.id_column",
            f"= {spec.id_column!r}: no such column in {spec.input}"
            f"{did_you_mean(spec.id_column, columns)} (columns: {', '.join(columns)})",
        )


def _columns(source: Path) -> list[str]:
    """The column names, from the header or the parquet schema alone."""
    if source.suffix == ".csv":
        import pandas as pd

        return [str(c) for c in pd.read_csv(source, nrows=0).columns]
    import pyarrow.parquet as pq

    return [str(c) for c in pq.read_schema(source).names]


def _check_work(spec: ShardStage, path: str, problems: Problems) -> None:
    if (spec.command is None) == (spec.fn is None):
        problems.add(
            f"{path}.command",
            "give exactly one of `command` (an argv list) or `fn` ({_target_: pkg.mod.function})",
        )
    if spec.command is not None:
        for message in _command_problems(spec.command):
            problems.add(f"{path}.command", message)
    if spec.fn is not None:
        target = spec.fn.get("_target_")
        if not isinstance(target, str) or not target:
            problems.add(f"{path}.fn._target_", "missing: name the function, pkg.mod.function")
        elif (error := import_error(target)) is not None:
            problems.add(f"{path}.fn._target_", f"= {target!r}: cannot import: {error}")


def _command_problems(argv: list[str]) -> list[str]:
    if not argv:
        return ["= []: expected a non-empty argv list"]
    found: list[str] = []
    allowed = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    for arg in argv:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError:
            found.append(f"= {arg!r}: unbalanced brace; write {{{{ or }}}} for a literal brace")
            continue
        for placeholder in names:
            if placeholder not in PLACEHOLDERS:
                hint = did_you_mean(placeholder, PLACEHOLDERS)
                found.append(
                    f"= {arg!r}: unknown placeholder {{{placeholder}}}{hint} (allowed: {allowed})"
                )
    if not any("{output}" in arg for arg in argv):
        found.append("the command never names {output}: it must write its shard's rows there")
    return found


def _check_merge(merge_spec: dict[str, Any], path: str, problems: Problems) -> None:
    for key in merge_spec:
        if key not in MERGE_KEYS:
            hint = did_you_mean(str(key), MERGE_KEYS)
            problems.add(f"{path}.{key}", f"unknown key{hint} (allowed: {', '.join(MERGE_KEYS)})")
    fmt = merge_spec.get("format", "parquet")
    if fmt not in FORMATS:
        problems.add(f"{path}.format", f"= {fmt!r}: not one of {', '.join(FORMATS)}")
    sort_by = merge_spec.get("sort_by")
    if sort_by is not None and not (
        isinstance(sort_by, str)
        or (isinstance(sort_by, list) and sort_by and all(isinstance(s, str) for s in sort_by))
    ):
        problems.add(f"{path}.sort_by", f"= {sort_by!r}: expected a column name or a list of them")


# --- ranges and planning -----------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One id range: `low` and `high` are ids of the input, both included."""

    index: int
    low: Any
    high: Any
    rows: int

    @property
    def label(self) -> str:
        return f"{self.low}-{self.high}"


def input_identity(path: str) -> str:
    """What the fingerprints hash of the input: path, size and mtime, never its content."""
    source = Path(path).resolve()
    st = source.stat()
    return f"{source}:{st.st_size}:{st.st_mtime_ns}"


def split(path: Path, id_column: str, num_shards: int) -> list[Shard]:
    """Cut the sorted unique ids into `num_shards` contiguous ranges of near-equal size."""
    import numpy as np
    import pandas as pd

    if path.suffix == ".csv":
        ids = pd.read_csv(path, usecols=[id_column])[id_column]
    else:
        ids = pd.read_parquet(path, columns=[id_column])[id_column]
    if ids.isna().any():
        raise PlanError([f"{path}: {int(ids.isna().sum())} row(s) have no {id_column!r}"])
    try:
        counts = ids.value_counts(sort=False).sort_index()
    except TypeError as exc:
        raise PlanError([f"{path}: the ids in {id_column!r} cannot be ordered: {exc}"]) from None
    chunks = np.array_split(np.arange(len(counts)), min(num_shards, len(counts)))
    return [
        Shard(
            n,
            _plain(counts.index[c[0]]),
            _plain(counts.index[c[-1]]),
            int(counts.iloc[c].sum()),
        )
        for n, c in enumerate(chunks)
        if len(c)
    ]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _recorded(ledger: Ledger | None, name: str, spec: ShardStage, source: str) -> list[Shard]:
    """The ranges an earlier run of this stage recorded for the same input file, if complete:
    a resume then plans from the ledger without reading the data."""
    if ledger is None:
        return []
    found: dict[int, Shard] = {}
    total = None
    for row in ledger.rows(name):
        p = row.input
        if (
            isinstance(p, dict)
            and p.get("input") == source
            and p.get("id_column") == spec.id_column
            and p.get("num_shards") == spec.num_shards
        ):
            found[p["index"]] = Shard(p["index"], p["low"], p["high"], p["rows"])
            total = p.get("count")
    if not found or set(found) != set(range(len(found))) or total != len(found):
        return []
    return [found[n] for n in range(len(found))]


def plan(name: str, spec: StageSpec, raw: dict[str, Any], ctx: PlanContext) -> StagePlan:
    """One unit per id range; a claim of CPUs and GPUs per shard; a GPU check against the
    cluster (and NVML, on a local cluster)."""
    assert isinstance(spec, ShardStage)
    config = result_config(spec, raw)
    source = input_identity(spec.input)
    own, fp = fingerprint_of(config, [ctx.upstream[n].fingerprint for n in spec.needs])
    fp = digest(fp, source)
    shards = _recorded(ctx.ledger, name, spec, source) or split(
        Path(spec.input), spec.id_column, spec.num_shards
    )
    decide = decider(name, config, ctx)
    base = {"input": source, "id_column": spec.id_column, "num_shards": spec.num_shards}
    units = [
        decide(
            Unit(
                s.label,
                digest(own, json.dumps([s.low, s.high, s.rows], default=str), source),
                {
                    **base,
                    "index": s.index,
                    "low": s.low,
                    "high": s.high,
                    "rows": s.rows,
                    "count": len(shards),
                },
            )
        )
        for s in shards
    ]
    notes = _gpu_notes(name, spec, ctx)
    if len(shards) < spec.num_shards:
        notes.append(f"{name}: {len(shards)} shard(s): the input has only {len(shards)} ids")
    resources = Resources(cpus=spec.cpus_per_shard, gpus=spec.gpus_per_shard)
    shard_claim = claim("shard", resources, len(shards), ctx.cluster)
    if spec.max_parallel is not None and shard_claim.fit > spec.max_parallel:
        notes.append(f"{name}: max_parallel {spec.max_parallel} of {shard_claim.fit} that fit")
    return StagePlan(name, "shard", spec, fp, config, units, [shard_claim], notes)


def _gpu_notes(name: str, spec: ShardStage, ctx: PlanContext) -> list[str]:
    """Stop at plan time when the cluster cannot hold one shard's GPUs; say what was found."""
    need = spec.gpus_per_shard
    if need <= 0:
        return []
    key = f"pipeline.stages.{name}.gpus_per_shard"
    group_size = max(1, int(need))
    local = ctx.cluster.where.startswith("local")
    found = gpus.inventory() if local else []
    if found:
        ok = gpus.eligible(found, spec.min_gpu_memory_gb)
        if len(ok) < group_size:
            listed = ", ".join(g.describe() for g in found)
            raise PlanError(
                [
                    f"{key}: each shard needs {need:g} GPU(s) with at least "
                    f"{spec.min_gpu_memory_gb:g} GB free; NVML found {len(ok)} such GPU(s) "
                    f"of {len(found)}: {listed}"
                ]
            )
        made = gpus.groups(ok, group_size, gpus.topology())
        shown = " ".join("[" + ",".join(str(g.index) for g in grp) + "]" for grp in made)
        return [f"{name}: {len(ok)} of {len(found)} GPU(s) eligible; groups by topology: {shown}"]
    have = ctx.cluster.largest.gpus
    if have >= need:
        return []
    if ctx.cluster.total.gpus == 0:
        raise PlanError(
            [
                f"{key}: each shard needs {need:g} GPU(s) but none were found: NVML reports no "
                "GPU on this machine and the cluster declares 0 GPUs (run on CPU with "
                "gpus_per_shard: 0, or declare logical GPUs with cluster.num_gpus)"
            ]
        )
    raise PlanError(
        [f"{key}: each shard needs {need:g} GPU(s); the largest node has {have:g} GPU(s)"]
    )


# --- one shard's files -------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """A shard's files; `part` is the temporary output the command writes."""

    root: Path
    stem: str
    fmt: str
    input_suffix: str

    def _at(self, suffix: str) -> Path:
        return self.root / f"{self.stem}{suffix}"

    @property
    def output(self) -> Path:
        return self._at(f".{self.fmt}")

    @property
    def part(self) -> Path:
        return self._at(f".part.{self.fmt}")

    @property
    def part_owner(self) -> Path:
        return self._at(".part.fingerprint")

    @property
    def manifest(self) -> Path:
        return self._at(".manifest.json")

    @property
    def input(self) -> Path:
        return self._at(f".input{self.input_suffix}")

    @property
    def log(self) -> Path:
        return self._at(".log")

    @property
    def done(self) -> Path:
        return self._at(".done.txt")

    @property
    def pid(self) -> Path:
        return self._at(".pid")


# --- the Ray task ------------------------------------------------------------------------


def run_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a Ray task on the node that owns the shard's GPUs: check their free memory,
    then run the command (or the function) with its output written to the temporary name."""
    started = time.time()
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "") if job["gpus"] > 0 else ""
    reply: dict[str, Any] = {
        "ok": False,
        "error": None,
        "cuda_visible_devices": cuda,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "started": started,
    }
    before = os.times()
    with open(job["log"], "a", buffering=1, errors="replace") as logf:
        logf.write(
            f"--- runner: attempt {job['attempt']} of shard {job['label']} "
            f"on {reply['worker']}, CUDA_VISIBLE_DEVICES={cuda!r}\n"
        )
        short = gpus.short_of_memory(cuda, job["min_gpu_memory_gb"]) if cuda else []
        if short:
            reply["error"] = (
                f"assigned GPU(s) have less than {job['min_gpu_memory_gb']:g} GB free: "
                + ", ".join(g.describe() for g in short)
            )
        else:
            try:
                reply["error"] = (
                    _run_command(job, cuda, logf) if job["command"] else _run_fn(job, logf)
                )
            except Exception as exc:  # the shard's own failure: reported, never a crash
                reply["error"] = f"{type(exc).__name__}: {exc}"
        if reply["error"]:
            logf.write(f"--- runner: {reply['error']}\n")
    after = os.times()
    reply["cpu"] = sum(after[:4]) - sum(before[:4])
    reply["ok"] = reply["error"] is None
    reply["ended"] = time.time()
    return reply


def _run_command(job: dict[str, Any], cuda: str, logf: Any) -> str | None:
    """Run the argv in its own process group; its output goes to the shard's log."""
    import subprocess

    values = {**job["values"], "gpus": cuda}
    argv = [arg.format(**values) for arg in job["command"]]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the interpreter (and environment) running the runner
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": cuda,
        "RUNNER_SHARD_RANGE": job["label"],
        "RUNNER_SHARD_INDEX": str(job["values"]["shard"]),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        argv,
        cwd=job["cwd"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    pid_file = Path(job["pid"])
    pid_file.write_text(json.dumps([socket.gethostname(), proc.pid, _start_time(proc.pid)]))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
        code = proc.wait()
    finally:
        # cancelled (KeyboardInterrupt from ray.cancel) or done: leave nothing of the command
        procs.kill_group(proc.pid)
        proc.wait()
        pid_file.unlink(missing_ok=True)
    if code < 0:
        return f"command killed by signal {signal.Signals(-code).name}"
    return f"command exited with code {code}" if code else None


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the Ray worker that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_fn(job: dict[str, Any], logf: Any) -> str | None:
    from hydra.utils import get_method

    spec = dict(job["fn"])
    fn = get_method(spec.pop("_target_"))
    frame = read_table(Path(job["values"]["input"]))
    result = fn(frame, **spec)
    write_table(result, Path(job["values"]["output"]))
    logf.write(f"--- runner: {job['fn']['_target_']}: {len(frame)} rows in, {len(result)} out\n")
    return None


_remote_task: Any = None


def _task() -> Any:
    global _remote_task
    if _remote_task is None:
        import ray

        _remote_task = ray.remote(run_shard)
    return _remote_task


# --- the driver --------------------------------------------------------------------------


@dataclass
class _Job:
    unit: Unit
    shard: Shard
    files: Files
    attempts: int = 0
    grant: Any = None
    # bytes of the log already shown on the terminal
    shown: int = 0
    cancelled: bool = False


@dataclass
class ShardRun:
    """Drives one shard stage: admission, Ray tasks, commits, retries, output, merge."""

    stage: StagePlan
    ctx: RunContext
    spec: ShardStage = field(init=False)
    root: Path = field(init=False)
    queue: deque[_Job] = field(default_factory=deque, init=False)
    inflight: dict[Any, _Job] = field(default_factory=dict, init=False)
    rows: list[UnitRow] = field(default_factory=list, init=False)
    counts: dict[str, int] = field(init=False)
    failures: list[str] = field(default_factory=list, init=False)
    cpu: float = 0.0

    def __post_init__(self) -> None:
        assert isinstance(self.stage.spec, ShardStage)
        self.spec = self.stage.spec
        self.root = self.ctx.stage_dir(self.stage.name) / "shards"
        self.root.mkdir(exist_ok=True)
        self.counts = {"done": 0, "failed": 0, "cancelled": 0}

    @property
    def fmt(self) -> str:
        return str(self.spec.merge.get("format", "parquet"))

    def files(self, shard: Shard, count: int) -> Files:
        width = max(4, len(str(count - 1)))
        stem = f"shard-{shard.index:0{width}d}"
        return Files(self.root, stem, self.fmt, Path(self.spec.input).suffix)

    def run(self) -> StageOutcome:
        t0 = time.monotonic()
        units = self.stage.units or []
        jobs = [self._job(u, len(units)) for u in units]
        adopted = self._adopt_committed(jobs)
        self.queue.extend(j for j in jobs if j.unit.run)
        outcome = StageOutcome(self.stage.name, "shard", total=len(units))
        outcome.skipped = len(units) - len(self.queue) - adopted
        outcome.done = adopted
        self.ctx.progress.start(self.stage.name, len(self.queue))
        try:
            if self.queue:
                self._prepare()
                self._loop()
        finally:
            self._cancel_inflight()
            self._flush()
            self.ctx.progress.finish(self.stage.name)
        outcome.done += self.counts["done"]
        outcome.failed, outcome.cancelled = self.counts["failed"], self.counts["cancelled"]
        outcome.cpu_seconds = self.cpu
        outcome.wall = time.monotonic() - t0
        outcome.interrupted = self.ctx.stop.is_set()
        return self._conclude(outcome, jobs)

    def _job(self, unit: Unit, count: int) -> _Job:
        p = unit.payload
        shard = Shard(p["index"], p["low"], p["high"], p["rows"])
        return _Job(unit, shard, self.files(shard, count))

    def _adopt_committed(self, jobs: list[_Job]) -> int:
        """A done shard whose output vanished runs again; a shard committed by a run that died
        before its ledger write is recorded done without running (not on a fresh run)."""
        adopted = 0
        for job in jobs:
            committed = manifest_of(self._committed(job)) is not None
            if not job.unit.run and not committed:
                job.unit.run, job.unit.reason = True, "output missing"
            elif job.unit.run and committed and job.unit.reason != "fresh run":
                job.unit.run, job.unit.reason = False, "committed"
                self._row(job, UnitState.done, result={"adopted": True})
                adopted += 1
        return adopted

    def _committed(self, job: _Job) -> Committed:
        f = job.files
        return Committed(job.shard.label, job.unit.fingerprint, f.output, f.manifest)

    def _prepare(self) -> None:
        """Write each queued shard's slice of the input; record every queued shard as pending
        (the ranges then live in the ledger, so a resume plans without reading the input)."""
        frame = read_table(Path(self.spec.input))
        ids = frame[self.spec.id_column]
        for job in self.queue:
            part = frame[(ids >= job.shard.low) & (ids <= job.shard.high)]
            part = part.sort_values(self.spec.id_column, kind="stable")
            write_table(part, job.files.input)
            owner = job.files.part_owner
            stale = owner.is_file() and owner.read_text() != job.unit.fingerprint
            if stale or job.unit.reason == "fresh run":
                job.files.part.unlink(missing_ok=True)  # not this config's partial output
            _reap(job.files.pid)
            self._row(job, UnitState.pending)
        self._flush()

    # the loop

    def _loop(self) -> None:
        import ray

        while (self.queue or self.inflight) and not self.ctx.stop.is_set():
            self._admit()
            if not self.inflight:
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=POLL_SECONDS)
            self._show_output()
            for ref in ready:
                self._collect(ref)
            self._flush()

    def _admit(self) -> None:
        """Start queued shards while resources (and max_parallel) allow: no batch barrier."""
        cap = self.spec.max_parallel or len(self.queue) + len(self.inflight)
        resources = Resources(cpus=self.spec.cpus_per_shard, gpus=self.spec.gpus_per_shard)
        while self.queue and len(self.inflight) < cap and not self.ctx.stop.is_set():
            grant = self.ctx.scheduler.acquire(
                f"{self.stage.name}/shard",
                resources,
                self.spec.priority,
                timeout=0 if self.inflight else None,
                cancelled=self.ctx.stop.is_set,
            )
            if grant is None:
                return
            job = self.queue.popleft()
            job.grant = grant
            self._launch(job)

    def _launch(self, job: _Job) -> None:
        job.attempts += 1
        f = job.files
        f.part_owner.write_text(job.unit.fingerprint)
        _write_done_ids(f.part, f.done, self.spec.id_column)
        job.shown = f.log.stat().st_size if f.log.exists() else 0
        values = {
            "input": str(f.input.resolve()),
            "output": str(f.part.resolve()),
            "low": str(job.shard.low),
            "high": str(job.shard.high),
            "shard": job.shard.index,
            "done": str(f.done.resolve()),
        }
        spec = {
            "label": job.shard.label,
            "attempt": job.attempts,
            "command": self.spec.command,
            "fn": self.spec.fn,
            "values": values,
            "gpus": self.spec.gpus_per_shard,
            "min_gpu_memory_gb": self.spec.min_gpu_memory_gb,
            "cwd": os.getcwd(),
            "log": str(f.log.resolve()),
            "pid": str(f.pid.resolve()),
        }
        ref = (
            _task()
            .options(
                num_cpus=self.spec.cpus_per_shard,
                num_gpus=self.spec.gpus_per_shard,
                max_retries=0,
                name=f"shard {job.shard.label}",
            )
            .remote(spec)
        )
        self.inflight[ref] = job
        self._row(job, UnitState.running, started=time.time())

    def _collect(self, ref: Any) -> None:
        import ray

        job = self.inflight.pop(ref)
        self.ctx.scheduler.release(job.grant)
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the task's worker died (OOM kill, node loss)
            reply = {"ok": False, "error": f"its Ray task died: {_first_line(exc)}"}
        self._show(job)
        self.cpu += reply.get("cpu", 0.0)
        error = reply["error"] if not reply["ok"] else self._commit(job)
        if error is None:
            result = {
                "rows": job.shard.rows,
                "output": str(job.files.output),
                "cuda_visible_devices": reply["cuda_visible_devices"],
                "started": reply["started"],
                "ended": reply["ended"],
            }
            self._row(job, UnitState.done, reply, result=result)
            self.ctx.progress.advance(self.stage.name, done=1)
        elif job.attempts <= self.spec.retries:
            log.warning(
                "%s: shard %s failed (%s); retrying", self.stage.name, job.shard.label, error
            )
            self.queue.append(job)
        else:
            tail = _tail(job.files.log)
            message = (
                f"shard {job.shard.label} failed after {job.attempts} attempt(s): {error}; "
                f"last lines of {job.files.log}:\n" + "\n".join(f"    {ln}" for ln in tail)
            )
            self.failures.append(message)
            self._row(job, UnitState.failed, reply, error=message)
            self.ctx.progress.advance(self.stage.name, failed=1)

    def _commit(self, job: _Job) -> str | None:
        """Check the temporary output (readable, id column, one row per input row), then
        rename it into place and write the manifest; why not, when it cannot be committed."""
        f = job.files
        if not f.part.is_file():
            return f"finished but did not write its output {f.part}"
        try:
            rows, columns = _shape(f.part)
        except Exception as exc:  # any reader error means an unusable output
            f.part.unlink(missing_ok=True)
            return f"its output {f.part} is not readable: {exc}"
        if self.spec.id_column not in columns:
            return (
                f"its output has no {self.spec.id_column!r} column (columns: {', '.join(columns)})"
            )
        if rows != job.shard.rows:
            f.part.unlink(missing_ok=True)  # a partial output that cannot be resumed
            return f"its output has {rows} row(s); its input range has {job.shard.rows}"
        with open(f.part, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f.part, f.output)
        manifest = {
            "shard": job.shard.label,
            "index": job.shard.index,
            "low": job.shard.low,
            "high": job.shard.high,
            "rows": rows,
            "input": job.unit.payload["input"],
            "fingerprint": job.unit.fingerprint,
            "output": f.output.name,
            "committed": time.time(),
        }
        write_json(f.manifest, manifest)
        for leftover in (f.part_owner, f.done, f.input):
            leftover.unlink(missing_ok=True)
        return None

    # terminal output

    def _show_output(self) -> None:
        for job in self.inflight.values():
            self._show(job)

    def _show(self, job: _Job) -> None:
        """Print the complete new lines of a shard's log, prefixed with its range."""
        if not self.spec.show_output or not job.files.log.exists():
            return
        with open(job.files.log, "rb") as fh:
            fh.seek(job.shown)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        if not end:
            return
        job.shown += end
        prefix = f"[shard {job.shard.label}] "
        text = data[:end].decode(errors="replace").splitlines()
        sys.stdout.write("".join(f"{prefix}{line}\n" for line in text))
        sys.stdout.flush()

    # ending

    def _cancel_inflight(self) -> None:
        """Cancel running shards: Ray interrupts each task, which kills its command's process
        group; recorded pids are killed here too, in case the task cannot run its cleanup."""
        import ray

        if not self.inflight:
            return
        for ref, job in self.inflight.items():
            ray.cancel(ref)
            _reap(job.files.pid)
        _, stuck = ray.wait(
            list(self.inflight), num_returns=len(self.inflight), timeout=CANCEL_GRACE
        )
        for ref in stuck:
            ray.cancel(ref, force=True)
        for job in self.inflight.values():
            self.ctx.scheduler.release(job.grant)
            self._row(job, UnitState.cancelled, error="cancelled")
        self.inflight.clear()

    def _conclude(self, outcome: StageOutcome, jobs: list[_Job]) -> StageOutcome:
        if outcome.interrupted:
            outcome.ok = False
            return outcome
        sort_by = self.spec.merge.get("sort_by") or self.spec.id_column
        keys = [sort_by] if isinstance(sort_by, str) else list(sort_by)
        target = self.ctx.stage_dir(self.stage.name) / f"merged.{self.fmt}"
        summary = merge([self._committed(j) for j in jobs], self.spec.id_column, keys, target)
        outcome.outputs += [summary["output"], str(target.parent / "merge_summary.json")]
        outcome.extra = {
            "merged_rows": summary["total_rows"],
            "missing_ranges": summary["missing_ranges"],
            "duplicate_ids": summary["duplicate_ids"],
        }
        if self.failures:
            outcome.ok = False
            outcome.message = f"{len(self.failures)} shard(s) failed:\n" + "\n".join(self.failures)
        elif summary["missing_ranges"]:
            outcome.ok = False
            outcome.message = f"missing ranges: {', '.join(summary['missing_ranges'])}"
        return outcome

    # ledger

    def _row(
        self,
        job: _Job,
        state: UnitState,
        reply: dict[str, Any] | None = None,
        result: Any = None,
        error: str | None = None,
        started: float | None = None,
    ) -> None:
        reply = reply or {}
        begun = reply.get("started", started)
        ended = reply.get("ended")
        self.rows.append(
            UnitRow(
                self.stage.name,
                job.unit.id,
                job.unit.fingerprint,
                state,
                job.attempts,
                begun,
                ended,
                None if begun is None or ended is None else ended - begun,
                reply.get("worker"),
                error,
                job.unit.payload,
                result,
            )
        )
        if state in (UnitState.done, UnitState.failed, UnitState.cancelled) and "adopted" not in (
            result or {}
        ):
            self.counts[state.value] += 1

    def _flush(self) -> None:
        if self.rows:
            self.ctx.ledger.write(self.rows)
            self.rows = []


# --- helpers -----------------------------------------------------------------------------


def _shape(path: Path) -> tuple[int, list[str]]:
    """(rows, columns) of an output file; parquet from its footer alone."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.read_metadata(path)
        return meta.num_rows, [str(n) for n in meta.schema.names]
    frame = read_table(path)
    return len(frame), [str(c) for c in frame.columns]


def _write_done_ids(part: Path, done: Path, id_column: str) -> None:
    """`{done}`: the ids a previous attempt already wrote to a CSV `{output}`, one per line.

    A cut-off last line is dropped from the partial output first, so a command may append
    the rest of its rows to `{output}` and skip these ids. Other formats resume from empty."""
    ids: Iterable[Any] = []
    if part.suffix == ".csv" and part.is_file():
        data = part.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            part.write_bytes(complete)
        try:
            ids = read_table(part)[id_column].tolist() if complete else []
        except Exception:  # unreadable or without the id column: start again
            part.unlink()
            ids = []
    else:
        part.unlink(missing_ok=True)
    done.write_text("".join(f"{i}\n" for i in ids))


def _reap(pid_file: Path) -> None:
    """Kill the process group of a shard command recorded in `pid_file` if it still runs here
    (a command orphaned by a killed runner, or one whose task could not clean up)."""
    try:
        host, pid, started = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return
    if host == socket.gethostname() and _start_time(pid) == started:
        procs.kill_group(pid)
    pid_file.unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks (so a reused pid is never taken for ours)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    except OSError:
        return []


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return ShardRun(stage, ctx).run()


KIND = StageKind(ShardStage, check, plan, run)
