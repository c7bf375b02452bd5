"""The `roles` stage: long-running role replicas (train / reward / rollout) with priorities,
placement-group pools and preemption.

Each replica is a unit. It asks the run's one scheduler for its resources at its role's
priority; a replica of a role with preemption rights may take the resources of lower ones, as
`runner.scheduler.policy` decides. A victim is asked to stop (`ctx.cancelled`), given
`cancel_timeout` seconds, then killed; its `state()` is saved and it goes back to pending, to
be restored with `restore(state)` when it is admitted again. ScheduleMesh's faults are designed
out: the timeout is honoured, several victims may be taken, label preemptions are counted as
`label`, placement groups are reused by best fit, and every group's readiness is waited for
with a bound.
"""

from __future__ import annotations

from runner.kind import StageKind
from runner.schema import RolesStage
from runner.stages.roles.checks import check
from runner.stages.roles.host import saves_state
from runner.stages.roles.kind import RolesRun, open_run
from runner.stages.roles.planning import autoscale, plan
from runner.stages.roles.settings import RoleSpec, RolesPlan, parse
from runner.stages.roles.simulate import simulate

__all__ = [
    "KIND",
    "RoleSpec",
    "RolesPlan",
    "RolesRun",
    "autoscale",
    "check",
    "parse",
    "plan",
    "saves_state",
]

KIND = StageKind(RolesStage, check, plan, open_run, simulate)
