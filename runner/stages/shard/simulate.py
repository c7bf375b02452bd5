"""A shard stage on the simulated cluster: each shard holds its own ask (`shard_ask`, as in a
real run), at most `max_parallel` at once, for its time: measured, else
`cluster.sim_unit_seconds`."""

from __future__ import annotations

from runner.plan import StagePlan
from runner.schema import ShardStage
from runner.sim import Simulation, SimUnits
from runner.stages.shard.kind import shard_ask


def simulate(stage: StagePlan, sim: Simulation) -> SimUnits:
    spec = stage.spec
    assert isinstance(spec, ShardStage)
    return SimUnits(sim, stage, ask=lambda _: shard_ask(spec), label="shard", cap=spec.max_parallel)
