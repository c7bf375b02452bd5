"""ScheduleMesh's own spellings of a roles stage's keys, read as the runner's.

ScheduleMesh users bring `ensure_pool(...)`'s `resources` and `pg_pool_config`, a submit's
`ray_options` and an aggressiveness read from the environment (`"env:VAR"`) as they wrote them
(its RLHF guide, `shared/seeds/003_*.txt`). Each is mapped here onto the one schema, before
the checks, and the plan says what each became (`said`), so there is one set of rules and
one set of messages for both spellings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runner.stages.roles.schema import RolesStage

# ScheduleMesh: a task of at least this priority takes one of `high_priority_pg_specs`
HIGH_PRIORITY = 8.0
# `pg_pool_config` keys renamed in the runner's `pg_pool`
PG_POOL_NAMES = {"enable_pg_reuse": "reuse"}
# resource keys as ScheduleMesh writes them (`{"cpu": 2.0, "memory": 2048.0}`, memory in MB)
RESOURCE_NAMES = {"cpu": "cpus", "gpu": "gpus"}
# `configure_preemption(...)`'s keyword arguments, as the runner's `preemption` keys
PREEMPTION_NAMES = {
    "label_preemption_rules": "label_rules",
    "preemption_aggressiveness": "aggressiveness",
    "enable_cross_pool_preemption": "cross_pool",
}
# an aggressiveness read from the environment: `"env:VAR"`
ENV_PREFIX = "env:"


def resources(data: object, path: str, said: list[str]) -> object:
    """`{cpu, gpu, memory}` as `{cpus, gpus, memory}` (memory is megabytes in both)."""
    if not isinstance(data, Mapping):
        return data
    out = {RESOURCE_NAMES.get(str(k), str(k)): v for k, v in data.items()}
    if out.keys() != data.keys():
        said.append(f"{path}: {_keys(data)} → {_keys(out)}")
    return out


def _keys(data: Iterable[object]) -> str:
    return "{" + ", ".join(map(str, data)) + "}"


def renamed(
    data: Mapping[str, object], names: Mapping[str, str], path: str, said: list[str]
) -> dict[str, object]:
    """`data` with ScheduleMesh's key names as the runner's (the runner's own, when both are
    given, is kept and the other left for the checks to name as unknown)."""
    out = dict(data)
    for theirs, ours in names.items():
        if theirs in out and ours not in out:
            out[ours] = out.pop(theirs)
            said.append(f"{path}.{theirs} → {ours}")
    return out


def pg_pool(data: Mapping[str, object], path: str, said: list[str]) -> dict[str, object]:
    """`pg_pool_config` as `pg_pool`: `enable_pg_reuse` is `reuse`, and each of
    `high_priority_pg_specs` a reserved group for any role of priority >= 8."""
    out = renamed(data, PG_POOL_NAMES, path, said)
    specs = out.pop("high_priority_pg_specs", None)
    given = out.get("reserved", [])
    if isinstance(specs, list) and isinstance(given, list):
        reserved = list(given)
        for i, spec in enumerate(specs):
            where = f"{path}.high_priority_pg_specs[{i}]"
            shape = resources(spec, where, [])
            reserved.append({"resources": shape, "min_priority": HIGH_PRIORITY})
            said.append(
                f"{where} → pg_pool.reserved: a group for any role of priority >= {HIGH_PRIORITY:g}"
            )
        out["reserved"] = reserved
    elif specs is not None:
        out["high_priority_pg_specs"] = specs  # it or `reserved` not a list: the checks say so
    return out


def aggressiveness(value: object) -> tuple[object, str | None]:
    """`"env:VAR"` read from the environment (its value, and what the plan says of it); any
    other value as it is. An unset variable stays as written: the checks name it."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        var = value[len(ENV_PREFIX) :]
        found = os.environ.get(var)
        if found is not None:
            return found, f"aggressiveness {value!r} → {found!r} (from ${var})"
    return value, None


@dataclass(frozen=True)
class Canonical:
    """A roles stage's free-form sections in the runner's spelling, and what was mapped."""

    pool: dict[str, object]
    pg_pool: dict[str, object]
    preemption: dict[str, object]
    roles: dict[str, object]
    # one line per key mapped, for the plan
    said: list[str]


def canonical(spec: RolesStage) -> Canonical:
    """The stage's `pool`, `pg_pool`, `preemption` and roles' resources in the runner's
    spelling (only mappings are mapped: anything else is left for the checks to name); what
    was mapped is said with key paths within the stage."""
    said: list[str] = []
    pool = dict(spec.pool)
    if "resources" in pool:
        pool["resources"] = resources(pool["resources"], "pool.resources", said)
    pg = pg_pool(spec.pg_pool, "pg_pool", said)
    preemption = renamed(spec.preemption, PREEMPTION_NAMES, "preemption", said)
    level, note = aggressiveness(preemption.get("aggressiveness"))
    if note is not None:
        preemption["aggressiveness"] = level
        said.append(f"preemption.{note}")
    roles: dict[str, object] = {}
    for name, data in spec.roles.items():
        if isinstance(data, Mapping) and "resources" in data:
            where = f"roles.{name}.resources"
            data = {**data, "resources": resources(data["resources"], where, said)}
        roles[str(name)] = data
    return Canonical(pool, pg, preemption, roles, said)
