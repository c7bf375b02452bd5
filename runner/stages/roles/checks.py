"""The spec checks of a roles stage: every role, the pool, the placement-group pool and the
preemption settings, each problem named by its key path.

Roles, pools and preemption are free-form mappings in the schema (their keys depend on the
user's role names), so their keys are checked here by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeGuard

from runner.quantities import MEMORY_HELP, memory_bytes
from runner.scheduler.policy import ALIASES, THRESHOLDS, aggressiveness_level
from runner.schema import StageSpec
from runner.spec import Problems, check_target, find_cycle, unknown_key
from runner.stages.roles.schedulemesh import (
    ENV_PREFIX,
    PG_POOL_NAMES,
    PREEMPTION_NAMES,
    RESOURCE_NAMES,
    canonical,
)
from runner.stages.roles.schema import RolesStage

ROLE_KEYS = (
    "priority",
    "replicas",
    "resources",
    "labels",
    "pg",
    "start_after",
    "actor",
    "steps",
    "step_time",
    "estimated_duration",
    "ray_options",
)
# actor options the runner sets itself (the grant's resources and placement, its restarts)
OWNED_RAY_OPTIONS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "scheduling_strategy",
    "placement_group",
    "placement_group_bundle_index",
    "placement_group_capture_child_tasks",
    "max_restarts",
    "max_concurrency",
)
RESOURCE_KEYS = ("cpus", "gpus", "memory", "memory_gb")
PREEMPTION_KEYS = (
    "label_rules",
    "aggressiveness",
    "cancel_timeout",
    "cross_pool",
    "protected_pools",
    "enable_label_preemption",
)
PG_POOL_KEYS = (
    "reserved",
    "max_dynamic_pgs",
    "reuse",
    "enable",
    "enable_dynamic_pgs",
    "pg_creation_timeout",
)

# the keys of the stage's free-form mappings, ScheduleMesh's spellings too (the registry's
# `mapping_keys`): a documented key the YAML leaves out is overridden as KEY=VALUE
MAPPING_KEYS = {
    ("roles", "*"): ROLE_KEYS,
    ("roles", "*", "resources"): (*RESOURCE_KEYS, *RESOURCE_NAMES),
    ("pool",): ("name", "resources"),
    ("pool", "resources"): (*RESOURCE_KEYS, *RESOURCE_NAMES),
    ("pg_pool",): (*PG_POOL_KEYS, *PG_POOL_NAMES, "high_priority_pg_specs"),
    ("pg_pool_config",): (*PG_POOL_KEYS, *PG_POOL_NAMES, "high_priority_pg_specs"),
    ("preemption",): (*PREEMPTION_KEYS, *PREEMPTION_NAMES),
}


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Every role, the pool, the placement-group pool and the preemption settings."""
    assert isinstance(spec, RolesStage)
    path = f"pipeline.stages.{name}"
    if not isinstance(spec.roles, dict) or not spec.roles:
        problems.add(f"{path}.roles", "a roles stage needs at least one role: NAME: {actor, ...}")
        return
    read = canonical(spec)  # ScheduleMesh's spellings as the runner's
    for role, data in read.roles.items():
        _check_role(f"{path}.roles.{role}", str(role), data, read.roles, problems)
    after = {
        str(r): [d["start_after"]]
        for r, d in read.roles.items()
        if isinstance(d, dict) and isinstance(d.get("start_after"), str)
    }
    if cycle := find_cycle(after):
        problems.add(f"{path}.roles.{cycle[0]}.start_after", f"a cycle: {' -> '.join(cycle)}")
    _is_keyed(read.pool, f"{path}.pool", ("name", "resources"), problems)
    if isinstance(read.pool.get("resources"), dict):
        _check_resources(
            f"{path}.pool.resources", read.pool["resources"], problems, "the pool's quota"
        )
    _check_pg_pool(f"{path}.pg_pool", read.pg_pool, read.roles, problems)
    _check_preemption(f"{path}.preemption", read.preemption, problems)


def _check_pg_pool(
    path: str, pg: Mapping[str, object], roles: Mapping[str, object], problems: Problems
) -> None:
    _is_keyed(pg, path, PG_POOL_KEYS, problems)
    _check_int(f"{path}.max_dynamic_pgs", pg.get("max_dynamic_pgs", 8), 0, problems)
    for key in ("reuse", "enable", "enable_dynamic_pgs"):
        if not isinstance(pg.get(key, True), bool):
            problems.add(f"{path}.{key}", f"= {pg[key]!r}: expected true or false")
    timeout = pg.get("pg_creation_timeout", 60.0)
    if not _number(timeout) or timeout <= 0:
        problems.add(f"{path}.pg_creation_timeout", f"= {timeout!r}: expected seconds > 0")
    _check_reserved(f"{path}.reserved", pg.get("reserved", []), roles, problems)
    if pg.get("enable", True) is False and pg.get("reserved"):
        problems.add(
            f"{path}.enable", "= False: no placement groups, but some are reserved (reserved)"
        )


def _is_keyed(
    data: object, path: str, allowed: tuple[str, ...], problems: Problems
) -> TypeGuard[Mapping[object, object]]:
    """Whether `data` (at `path`) is a mapping; each key not in `allowed` is named."""
    if not isinstance(data, dict):
        problems.add(path, f"= {data!r}: expected a mapping with keys {', '.join(allowed)}")
        return False
    for key in data:
        if key not in allowed:
            problems.add(f"{path}.{key}", unknown_key(str(key), allowed))
    return True


def _number(value: object) -> TypeGuard[float]:
    """An int or a float, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(path: str, value: object, low: int, problems: Problems) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.add(path, f"= {value!r}: expected an integer >= {low}")


def _check_resources(path: str, data: object, problems: Problems, what: str = "a replica") -> None:
    if not _is_keyed(data, path, RESOURCE_KEYS, problems):
        return
    for key, value in data.items():
        if key == "memory":
            if not isinstance(value, str | int | float) or memory_bytes(value) is None:
                problems.add(f"{path}.memory", f"= {value!r}: {MEMORY_HELP}")
        elif key in RESOURCE_KEYS and (not _number(value) or value < 0):
            problems.add(f"{path}.{key}", f"= {value!r}: expected a number >= 0")
    if "memory" in data and "memory_gb" in data:
        problems.add(f"{path}.memory_gb", "give memory (8G; a plain number is MB) or memory_gb")
    if all(_number(v) and v == 0 for v in data.values()):
        problems.add(path, f"= {data!r}: {what} needs some cpus or gpus")


def _check_role(
    path: str, role: str, data: object, roles: Mapping[str, object], problems: Problems
) -> None:
    if not _is_keyed(data, path, ROLE_KEYS, problems):
        return
    _check_actor(path, data, problems)
    if "priority" in data and not _number(data["priority"]):
        problems.add(f"{path}.priority", f"= {data['priority']!r}: expected a number")
    _check_replicas(f"{path}.replicas", data.get("replicas", 1), problems)
    _check_resources(f"{path}.resources", data.get("resources", {"cpus": 1}), problems)
    labels = data.get("labels", {})
    if not isinstance(labels, dict):
        problems.add(f"{path}.labels", f"= {labels!r}: expected a mapping of strings")
    if data.get("pg", "dynamic") not in ("reserved", "dynamic"):
        problems.add(f"{path}.pg", f"= {data['pg']!r}: not one of reserved, dynamic")
    _check_start_after(path, role, data.get("start_after", 0), roles, problems)
    _check_int(f"{path}.steps", data.get("steps", 1), 1, problems)
    for key in ("step_time", "estimated_duration"):
        value = data.get(key)
        if value is not None and (not _number(value) or value <= 0):
            problems.add(f"{path}.{key}", f"= {value!r}: expected seconds > 0")
    _check_ray_options(f"{path}.ray_options", data.get("ray_options", {}), problems)


def _check_actor(path: str, data: Mapping[object, object], problems: Problems) -> None:
    """The role's actor class is named, can be imported and takes the keys given beside it
    (the host builds it with those alone)."""
    actor = data.get("actor")
    check_target(
        problems,
        f"{path}.actor",
        actor if isinstance(actor, Mapping) else {},
        "name the role's actor class, pkg.mod.Class",
    )


def _check_start_after(
    path: str, role: str, after: object, roles: Mapping[str, object], problems: Problems
) -> None:
    """Seconds after the stage starts, or another role whose start this one waits for."""
    if isinstance(after, str):
        if after == role or after not in roles:
            others = ", ".join(r for r in roles if r != role)
            problems.add(f"{path}.start_after", f"= {after!r}: not another role (roles: {others})")
    elif not _number(after) or after < 0:
        problems.add(f"{path}.start_after", f"= {after!r}: expected seconds >= 0 or a role name")


def _check_ray_options(path: str, options: object, problems: Problems) -> None:
    """More actor options (ScheduleMesh's `ray_options`), but not those the runner sets."""
    if not isinstance(options, dict):
        problems.add(path, f"= {options!r}: expected a mapping of Ray actor options")
        return
    for key in options:
        if key in OWNED_RAY_OPTIONS:
            problems.add(
                f"{path}.{key}",
                "set by the runner (the grant's resources and placement): give the role's "
                "resources instead",
            )


def _check_replicas(path: str, value: object, problems: Problems) -> None:
    if isinstance(value, dict):
        if not _is_keyed(value, path, ("min", "max"), problems):
            return
        low, high = value.get("min", 1), value.get("max", value.get("min", 1))
        _check_int(f"{path}.min", low, 0, problems)
        _check_int(f"{path}.max", high, 1, problems)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.add(path, f"= {value!r}: min must not exceed max")
    else:
        _check_int(path, value, 1, problems)


def _check_reserved(
    path: str, entries: object, roles: Mapping[str, object], problems: Problems
) -> None:
    if not isinstance(entries, list):
        problems.add(
            path, f"= {entries!r}: expected a list of {{role: NAME}} or {{resources: ...}}"
        )
        return
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not _is_keyed(entry, where, ("role", "resources", "count", "min_priority"), problems):
            continue
        low = entry.get("min_priority")
        if low is not None and not _number(low):
            problems.add(f"{where}.min_priority", f"= {low!r}: expected a number")
        if ("role" in entry) == ("resources" in entry):
            problems.add(where, "name either a role (its replicas' shape) or resources")
        elif "role" in entry and entry["role"] not in roles:
            problems.add(
                f"{where}.role", f"= {entry['role']!r}: no such role (roles: {', '.join(roles)})"
            )
        elif "resources" in entry:
            _check_resources(f"{where}.resources", entry["resources"], problems, "a reserved group")
        if "count" in entry:
            _check_int(f"{where}.count", entry["count"], 1, problems)
    wanted = {r for r, d in roles.items() if isinstance(d, dict) and d.get("pg") == "reserved"}
    if wanted and not any(isinstance(e, dict) and "min_priority" not in e for e in entries):
        problems.add(
            path, f"roles {', '.join(sorted(wanted))} ask for pg: reserved, but none is reserved"
        )


def _check_preemption(path: str, data: object, problems: Problems) -> None:
    if not _is_keyed(data, path, PREEMPTION_KEYS, problems):
        return
    level = data.get("aggressiveness", "medium")
    if isinstance(level, str) and level.startswith(ENV_PREFIX):
        var = level[len(ENV_PREFIX) :]
        problems.add(f"{path}.aggressiveness", f"= {level!r}: ${var} is not set")
    elif aggressiveness_level(level) is None:
        problems.add(
            f"{path}.aggressiveness",
            f"= {level!r}: not one of {', '.join(THRESHOLDS)} "
            f"(or ScheduleMesh's aliases: {', '.join(ALIASES)})",
        )
    switch = data.get("enable_label_preemption", True)
    if not isinstance(switch, bool):
        problems.add(f"{path}.enable_label_preemption", f"= {switch!r}: expected true or false")
    timeout = data.get("cancel_timeout", 5.0)
    if not _number(timeout) or timeout < 0:
        problems.add(f"{path}.cancel_timeout", f"= {timeout!r}: expected seconds >= 0")
    if not isinstance(data.get("cross_pool", False), bool):
        problems.add(f"{path}.cross_pool", f"= {data['cross_pool']!r}: expected true or false")
    pools = data.get("protected_pools", [])
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        problems.add(f"{path}.protected_pools", f"= {pools!r}: expected a list of pool names")
    rules = data.get("label_rules", {})
    ok = isinstance(rules, dict) and all(
        isinstance(v, dict) and all(isinstance(t, list) for t in v.values()) for v in rules.values()
    )
    if not ok:
        problems.add(
            f"{path}.label_rules",
            f"= {rules!r}: expected {{LABEL: {{VALUE: [VALUES it may preempt]}}}}, "
            "e.g. {role: {train: [reward, rollout]}}",
        )
