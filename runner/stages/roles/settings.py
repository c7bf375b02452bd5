"""A roles stage's settings, typed: its roles, pool, quota, placement groups and policy.

The planner resolves them once (scaled to the cluster when `autoscale_to_cluster` is on) and
keeps them in the plan; the driver and the simulated cluster read the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.quantities import memory_bytes
from runner.resources import Resources
from runner.scheduler.policy import Policy, aggressiveness_level
from runner.schema import RolesStage
from runner.stages.roles.schedulemesh import canonical


@dataclass(frozen=True)
class RoleSpec:
    """One role as planned (resources already scaled when autoscale_to_cluster is on)."""

    name: str
    priority: float
    min: int
    max: int
    resources: Resources
    labels: dict[str, str]
    pg: str
    # seconds after the stage starts, or the name of a role that must be running first
    start_after: float | str
    actor: dict[str, Any]
    steps: int
    # for the simulated cluster: seconds per step, or the whole run
    step_time: float | None
    estimated_duration: float | None
    # more options for the replica's actor (ScheduleMesh's `ray_options`: a name, ...)
    ray_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reserved:
    """A reserved placement group: made when the stage starts, kept for the replicas that
    may use it (of `role`; of any `pg: reserved` role when None; of any role of at least
    `min_priority` when set: ScheduleMesh's high-priority groups)."""

    shape: Resources
    role: str | None = None
    min_priority: float | None = None

    def serves(self, role: RoleSpec) -> bool:
        """Whether a replica of `role` may run in this group."""
        if self.role is not None and self.role != role.name:
            return False
        if self.min_priority is not None:
            return role.priority >= self.min_priority
        return role.pg == "reserved"

    def describe(self) -> str:
        if self.role is not None:
            return self.role
        if self.min_priority is not None:
            return f"roles of priority >= {self.min_priority:g}"
        return "any role"


@dataclass(frozen=True)
class RolesPlan:
    """The stage's settings, resolved at plan time; the simulator reads the same."""

    pool: str
    quota: Resources | None
    policy: Policy
    reserved: list[Reserved]
    max_dynamic_pgs: int
    reuse: bool
    roles: dict[str, RoleSpec]
    scale: float
    # placement groups at all (`enable`), and dynamic ones (`enable_dynamic_pgs`): without,
    # a replica's actor is pinned to its granted node
    groups: bool = True
    dynamic_groups: bool = True
    # seconds a group may take to be ready (the replica's start, for dynamic groups)
    pg_creation_timeout: float = 60.0
    # ScheduleMesh's spellings read, and what each became
    said: tuple[str, ...] = ()

    @property
    def dynamic_cap(self) -> int | None:
        """How many replicas may hold a dynamic group at once (None: no dynamic groups)."""
        return self.max_dynamic_pgs if self.groups and self.dynamic_groups else None


def _resources(data: Mapping[str, Any]) -> Resources:
    """`memory` reads like a job's (`8G`; a plain number is megabytes, as ScheduleMesh's
    `ensure_pool` takes it); `memory_gb` is the older spelling. checks.py allows one of them."""
    memory = float(data.get("memory_gb", 0)) * (1 << 30)
    if "memory" in data:
        memory = float(memory_bytes(data["memory"]) or 0)
    return Resources(
        cpus=float(data.get("cpus", 0)), gpus=float(data.get("gpus", 0)), memory=memory
    )


def _replicas(value: Any) -> tuple[int, int]:
    if isinstance(value, dict):
        low = int(value.get("min", 1))
        return low, int(value["max"]) if "max" in value else low
    return int(value), int(value)


def parse(name: str, spec: RolesStage) -> RolesPlan:
    """The typed settings of a checked spec, before any scaling."""
    read = canonical(spec)
    pre, pg = read.preemption, read.pg_pool
    policy = Policy(
        label_rules={
            k: {a: list(b) for a, b in v.items()} for k, v in pre.get("label_rules", {}).items()
        },
        aggressiveness=aggressiveness_level(pre.get("aggressiveness", "medium")) or "medium",
        cross_pool=bool(pre.get("cross_pool", False)),
        protected_pools=frozenset(pre.get("protected_pools", [])),
        cancel_timeout=float(pre.get("cancel_timeout", 5.0)),
        label_preemption=bool(pre.get("enable_label_preemption", True)),
    )
    roles = {}
    for role, data in read.roles.items():
        low, high = _replicas(data.get("replicas", 1))
        roles[role] = RoleSpec(
            role,
            float(data.get("priority", spec.priority)),
            low,
            high,
            _resources(data.get("resources", {"cpus": 1})),
            {**spec.labels, **{str(k): str(v) for k, v in data.get("labels", {}).items()}},
            str(data.get("pg", "dynamic")),
            data.get("start_after", 0.0),
            dict(data.get("actor", {})),
            int(data.get("steps", 1)),
            data.get("step_time"),
            data.get("estimated_duration"),
            dict(data.get("ray_options", {})),
        )
    reserved: list[Reserved] = []
    for entry in pg.get("reserved", []):
        role = entry.get("role")
        shape = roles[role].resources if role else _resources(entry["resources"])
        count = int(entry.get("count", roles[role].max if role else 1))
        low = entry.get("min_priority")
        reserved += [Reserved(shape, role, None if low is None else float(low))] * count
    quota = read.pool.get("resources")
    return RolesPlan(
        str(read.pool.get("name", name)),
        _resources(quota) if quota else None,
        policy,
        reserved,
        int(pg.get("max_dynamic_pgs", 8)),
        bool(pg.get("reuse", True)),
        roles,
        1.0,
        bool(pg.get("enable", True)),
        bool(pg.get("enable_dynamic_pgs", True)),
        float(pg.get("pg_creation_timeout", 60.0)),
        tuple(read.said),
    )
