"""The stage kinds by name: what each kind is made of, in one place the CLI reads.

Driver-side only; the packages themselves import nothing, so that worker processes stay light.
A new kind is a package of its own and one line here; a kind kept outside `runner/` (a
user's, or the tests' `sleep` kind) is one `register(NAME, KIND)` call, or one entry
`NAME=package.module:ATTRIBUTE` in the environment variable `RUNNER_KINDS` (comma-separated),
read when this module is first imported, so a runner started as a subprocess has it too.
"""

from __future__ import annotations

import importlib
import os
import sys

from runner.kind import StageKind
from runner.stages.jobs import kind as jobs_kind
from runner.stages.jobs import planning as jobs_planning
from runner.stages.jobs.schema import JobsStage
from runner.stages.pool import kind as pool
from runner.stages.pool.schema import PoolStage
from runner.stages.roles import checks as roles_checks
from runner.stages.roles import kind as roles_kind
from runner.stages.roles import planning as roles_planning
from runner.stages.roles.schema import RolesStage
from runner.stages.shard import checks as shard_checks
from runner.stages.shard import kind as shard_kind
from runner.stages.shard import planning as shard_planning
from runner.stages.shard.schema import ShardStage

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
        mapping_keys=roles_checks.MAPPING_KEYS,
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
        # a job's cwd under either name (SCNS's `current_working_directory`), flat or in
        # SCNS's nested body `{job: {...}, script}`
        path_keys=(
            ("jobs_file",),
            ("cwd",),
            ("jobs", "*", "cwd"),
            ("jobs", "*", "current_working_directory"),
            ("jobs", "*", "job", "cwd"),
            ("jobs", "*", "job", "current_working_directory"),
        ),
        noun="job",
        job_table=True,
    ),
}


# where kinds from outside `runner/` are named for a runner process: NAME=module:ATTRIBUTE,...
ENV = "RUNNER_KINDS"


def register(name: str, kind: StageKind) -> None:
    """Add a stage kind, which specs then name as `kind: NAME`: its schema joins the spec's
    (the CLI hands `KINDS` to the validator, composition and completion)."""
    KINDS[name] = kind


def register_entries(value: str) -> None:
    """Register each `NAME=module:ATTRIBUTE` of `value`; a bad entry exits 2 with one message."""
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, _, where = entry.partition("=")
        module, _, attribute = where.partition(":")
        try:
            kind = getattr(importlib.import_module(module), attribute) if attribute else None
        except (ImportError, AttributeError) as exc:
            kind, problem = None, f"{type(exc).__name__}: {exc}"
        else:
            problem = "not a StageKind"
        if not name or not isinstance(kind, StageKind):
            print(
                f"runner: error: {ENV}: {entry!r}: {problem}; "
                "allowed: NAME=package.module:ATTRIBUTE naming a runner.kind.StageKind",
                file=sys.stderr,
            )
            raise SystemExit(2)
        register(name, kind)


register_entries(os.environ.get(ENV, ""))
