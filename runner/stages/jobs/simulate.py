"""A jobs stage on the simulated cluster: each job holds its own ask (`job_ask`, as in a real
run), at most `max_concurrent` at once, for its time: measured, else
`cluster.sim_unit_seconds`."""

from __future__ import annotations

from runner.plan import StagePlan, Unit
from runner.resources import Resources
from runner.scheduler.request import Request
from runner.schema import JobsStage
from runner.sim import Simulation, SimUnits
from runner.stages.jobs.job import Job
from runner.stages.jobs.kind import job_ask


def simulate(stage: StagePlan, sim: Simulation) -> SimUnits:
    spec = stage.spec
    assert isinstance(spec, JobsStage)
    cap = spec.max_concurrent
    # one ask per kind of job (the key: what `job_ask` reads of a job): an array's tasks ask
    # alike, and a simulated ask carries no unit's work, so 100,000 tasks share a few asks
    asks: dict[tuple[Resources, float, float | None, bool], Request] = {}

    def ask(unit: Unit) -> Request:
        job: Job = unit.payload
        key = (job.resources, job.priority, job.time_limit, job.exclusive)
        shared = asks.get(key)
        if shared is None:
            shared = asks[key] = job_ask(job)
        return shared

    return SimUnits(sim, stage, ask=ask, label="job", cap=cap)
