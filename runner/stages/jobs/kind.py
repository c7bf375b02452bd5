"""How a jobs stage runs under the executor: one lease per job with the job's own resources,
one Ray task on the granted node, its outcome read from the task's reply."""

from __future__ import annotations

from collections import deque
from typing import Any

from runner.executor import Ask, Executor, Lease, StageRun, Work
from runner.kind import RunContext, StageOutcome
from runner.lifecycle import UnitState
from runner.plan import StagePlan
from runner.remote import remote
from runner.schema import JobsStage
from runner.stages.jobs.job import Job
from runner.stages.jobs.task import run_job

# seconds a cancelled job's task gets, beyond its cancel_grace, before Ray kills the task
CANCEL_WAIT = 2.0


class JobsRun(StageRun):
    """Jobs in order, as far as the cluster (and `max_concurrent`) allows; a job's own failure
    is final, a dead Ray worker starts it again up to `retries`."""

    noun = "job"

    def __init__(self, stage: StagePlan, ctx: RunContext, ex: Executor) -> None:
        super().__init__(stage, ctx, ex)
        assert isinstance(stage.spec, JobsStage)
        self.spec = stage.spec
        self.retries = self.spec.retries
        self.grace = self.spec.cancel_grace + CANCEL_WAIT
        self.cap = self.spec.max_concurrent
        self.logs = ctx.stage_dir(stage.name).resolve()
        self.cpu = 0.0
        # highest priority first also where `max_concurrent` holds asks back
        self.queue = deque(sorted(self.works, key=lambda w: -_job(w).priority))
        for work in self.works:
            work.record = _job(work).record()
            work.result = self._paths(work)

    def prepare(self) -> None:
        for work in self.works:  # every queued job shows as PENDING from the start
            self.ex.record(work)

    def ask_for(self, work: Work) -> Ask:
        """Its own resources at its own priority; a job that does not fit reserves its node,
        and jobs behind it backfill only when their time limit ends them before it starts."""
        job = _job(work)
        return Ask(job.resources, job.priority, work, duration=job.time_limit, reserve=True)

    def launch(self, lease: Lease) -> None:
        assert lease.placement is not None
        work = lease.work[0]
        paths = self._paths(work)
        options = lease.placement.options(
            max_retries=0, name=f"job {work.id}", num_returns="streaming"
        )
        lease.task = (
            remote(run_job)
            .options(**options)
            .remote(
                {**_job(work).task_spec(), "grace": self.spec.cancel_grace},
                paths["stdout"],
                paths["stderr"],
            )
        )
        lease.watch(lease.task)

    def on_reply(self, lease: Lease, tag: Any, value: Any) -> None:
        reply: dict[str, Any] = value
        work = lease.work[0]
        self.ex.end_lease(lease)
        self.cpu += reply.get("cpu", 0.0)
        details = {k: reply.get(k) for k in ("exit_code", "signal", "pid")}
        details |= {k: reply[k] for k in ("memory_limit", "peak_rss") if k in reply}
        self.ex.finish(
            work,
            UnitState(reply["state"]),
            {**details, **self._paths(work)},
            reply.get("error"),
            reply.get("started"),
            reply.get("ended"),
        )

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        outcome.cpu_seconds = self.cpu
        outcome.outputs.append(str(self.ctx.stage_dir(self.name)))
        problem = self.failure_budget()
        if problem:
            outcome.ok, outcome.message = False, problem
        return outcome

    def _paths(self, work: Work) -> dict[str, str]:
        return {
            "stdout": str(self.logs / f"{work.id}.out"),
            "stderr": str(self.logs / f"{work.id}.err"),
        }


def _job(work: Work) -> Job:
    job: Job = work.unit.payload
    return job


def open_run(stage: StagePlan, ctx: RunContext, ex: Executor) -> JobsRun:
    return JobsRun(stage, ctx, ex)
