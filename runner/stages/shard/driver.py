"""The driver of a shard stage: admission, one Ray task per shard, commits, retries, the
shards' output on the terminal, cancellation and the merge."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import procs
from runner.merge import Committed, manifest_of, merge, read_table, write_table
from runner.plan import StagePlan, Unit
from runner.remote import error_line, remote
from runner.resources import Resources
from runner.schema import ShardStage
from runner.stages.base import RunContext, StageOutcome
from runner.stages.shard.files import Files, commit, launch_values, tail
from runner.stages.shard.ranges import Shard
from runner.stages.shard.task import run_shard
from runner.store import UnitRow, UnitState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# how long a cancelled shard's task gets to kill its command before Ray kills the task
CANCEL_GRACE = 3.0


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
            procs.reap_group(job.files.pid)
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
            try:
                self._launch(job)
            except BaseException:  # the scheduler is the run's: never keep what we cannot use
                self.ctx.scheduler.release(grant)
                raise

    def _launch(self, job: _Job) -> None:
        job.attempts += 1
        f = job.files
        f.part_owner.write_text(job.unit.fingerprint)
        job.shown = f.log.stat().st_size if f.log.exists() else 0
        values = launch_values(job.unit, f, self.spec.id_column, job.attempts)
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
            remote(run_shard)
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
            reply = {"ok": False, "error": f"its Ray task died: {error_line(exc)}"}
        self._show(job)
        self.cpu += reply.get("cpu", 0.0)
        error = (
            reply["error"]
            if not reply["ok"]
            else commit(job.files, job.shard, job.unit, self.spec.id_column)
        )
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
            last = tail(job.files.log)
            message = (
                f"shard {job.shard.label} failed after {job.attempts} attempt(s): {error}; "
                f"last lines of {job.files.log}:\n" + "\n".join(f"    {ln}" for ln in last)
            )
            self.failures.append(message)
            self._row(job, UnitState.failed, reply, error=message)
            self.ctx.progress.advance(self.stage.name, failed=1)

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
            procs.reap_group(job.files.pid)
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
        worker = reply.get("worker")
        self.rows.append(
            job.unit.row(self.stage.name, state, job.attempts, begun, ended, worker, error, result)
        )
        if state in (UnitState.done, UnitState.failed, UnitState.cancelled) and "adopted" not in (
            result or {}
        ):
            self.counts[state.value] += 1

    def _flush(self) -> None:
        if self.rows:
            self.ctx.ledger.write(self.rows)
            self.rows = []


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return ShardRun(stage, ctx).run()
