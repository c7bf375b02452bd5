"""The spec check and the plan of a `sleep` stage: one unit per index, one claim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runner.identity import digest
from runner.plan import (
    PlanContext,
    StagePlan,
    Unit,
    claim,
    decider,
    kept_keys,
    stage_config,
    stage_fingerprint,
)
from runner.resources import Resources
from runner.schema import StageSpec
from runner.spec import Problems
from tests.kinds.sleep.schema import SleepStage


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """`fail` names units the stage has."""
    assert isinstance(spec, SleepStage)
    for unit in spec.fail:
        if not unit.isdigit() or int(unit) >= spec.units:
            problems.add(
                f"pipeline.stages.{name}.fail.{unit}",
                f"no such unit; the units are 0 to {spec.units - 1}",
            )


def plan(name: str, spec: StageSpec, raw: dict[str, Any], ctx: PlanContext) -> StagePlan:
    """Units `0` .. `units - 1`, each fingerprinted from the stage's config and its index."""
    assert isinstance(spec, SleepStage)
    config = stage_config(spec, raw)
    upstream = [ctx.upstream[n].fingerprint for n in spec.needs]
    _, fingerprint = stage_fingerprint(
        {k: v for k, v in config.items() if k not in kept_keys(spec)}, upstream
    )
    decide = decider(name, config, ctx, kept_keys(spec))
    units = [
        decide(Unit(str(i), digest(fingerprint, str(i)), spec.seconds)) for i in range(spec.units)
    ]
    to_run = sum(1 for u in units if u.run)
    claims = [claim("sleeper", Resources(cpus=spec.cpus), to_run, ctx.cluster)]
    return StagePlan(name, spec.kind, spec, fingerprint, config, units, claims)
