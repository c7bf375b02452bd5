"""The stage kinds by name: what each kind is made of, in one place the CLI reads.

Driver-side only; the packages themselves import nothing, so that worker processes stay light.
A new kind is a package of its own and one line here.
"""

from __future__ import annotations

from runner.kind import StageKind
from runner.schema import JobsStage, PoolStage, RolesStage, ShardStage
from runner.stages import pool
from runner.stages.jobs import kind as jobs_kind
from runner.stages.jobs import planning as jobs_planning
from runner.stages.roles import checks as roles_checks
from runner.stages.roles import kind as roles_kind
from runner.stages.roles import planning as roles_planning
from runner.stages.shard import checks as shard_checks
from runner.stages.shard import kind as shard_kind
from runner.stages.shard import planning as shard_planning

KINDS: dict[str, StageKind] = {
    "pool": StageKind(
        PoolStage,
        pool.check,
        pool.plan,
        pool.open_run,
        path_keys=(("items", "file"), ("items", "glob")),
        noun="worker",
        shared_leases=True,
    ),
    "roles": StageKind(
        RolesStage,
        roles_checks.check,
        roles_planning.plan,
        roles_kind.open_run,
        noun="replica",
        unit_tracks=True,
    ),
    "shard": StageKind(
        ShardStage,
        shard_checks.check,
        shard_planning.plan,
        shard_kind.open_run,
        path_keys=(("input",),),
        noun="shard",
    ),
    "jobs": StageKind(
        JobsStage,
        jobs_planning.check,
        jobs_planning.plan,
        jobs_kind.open_run,
        path_keys=(("jobs_file",), ("cwd",), ("jobs", "*", "cwd")),
        noun="job",
    ),
}
