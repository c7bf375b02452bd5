"""The driver of a jobs stage: admission in order (with backfill), one Ray task per job with
the job's own resources, outcomes, retries after a dead worker, cancellation, the ledger."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.plan import StagePlan, Unit
from runner.remote import error_line, remote
from runner.resources import Resources
from runner.schema import JobsStage
from runner.stages.base import RunContext, StageOutcome
from runner.stages.jobs.job import Job
from runner.stages.jobs.task import KILL_GRACE, run_job
from runner.store import UnitRow, UnitState

log = logging.getLogger(__name__)

# seconds the driver waits for cancelled tasks to stop their jobs before force-killing them
CANCEL_WAIT = KILL_GRACE + 2.0


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
        outcome.outputs.append(str(self.ctx.stage_dir(self.stage.name)))  # as the user named it
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
            try:
                self._launch(entry, grant)
            except BaseException:  # the scheduler is the run's: never keep what we cannot use
                self.ctx.scheduler.release(grant)
                self.pending.appendleft(entry)
                raise

    def _launch(self, entry: _Entry, grant: Any) -> None:
        job = entry.job
        entry.grant, entry.attempts, entry.submitted = grant, entry.attempts + 1, time.time()
        out, err = self._log_paths(job.id)
        ref = (
            remote(run_job)
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
            self._finish(entry, {"state": "failed", "error": error_line(exc)})
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
        unit, record = entry.unit, entry.job.record()
        return unit.row(
            self.stage.name, state, entry.attempts, started, ended, node, error, result, record
        )

    def _write(self, rows: list[UnitRow]) -> None:
        self.ctx.ledger.write(rows)


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return JobsRun(stage, ctx).run()
