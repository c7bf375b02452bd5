"""A jobs stage on the simulated cluster: each job holds its own ask (`job_ask`, as in a real
run), at most `max_concurrent` at once, for its time: measured, else
`cluster.sim_unit_seconds`."""

from __future__ import annotations

from runner.plan import StagePlan
from runner.schema import JobsStage
from runner.sim import Simulation, SimUnits
from runner.stages.jobs.kind import job_ask


def simulate(stage: StagePlan, sim: Simulation) -> SimUnits:
    spec = stage.spec
    assert isinstance(spec, JobsStage)
    cap = spec.max_concurrent
    return SimUnits(sim, stage, ask=lambda unit: job_ask(unit.payload), label="job", cap=cap)
