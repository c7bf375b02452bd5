"""A roles stage's settings, typed: its roles, pool, quota, placement groups and policy.

The planner resolves them once (scaled to the cluster when `autoscale_to_cluster` is on) and
keeps them in the plan; the driver and the simulated cluster read the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypedDict, cast

from runner.quantities import memory_bytes
from runner.resources import Resources
from runner.scheduler.policy import Policy, aggressiveness_level
from runner.stages.roles.schedulemesh import Canonical, canonical
from runner.stages.roles.schema import RolesStage


class ActorConfig(TypedDict, total=False):
    """A role's actor as Hydra instantiates it: its class, and its constructor's keyword
    arguments beside it (`step_seconds` is one the simulated cluster reads)."""

    _target_: str
    step_seconds: float


class ResourcesData(TypedDict, total=False):
    """A replica's (or a quota's, or a reserved group's) resources as the spec gives them."""

    cpus: float
    gpus: float
    # 8G; a plain number is megabytes
    memory: str | float
    memory_gb: float


class ReplicaRange(TypedDict, total=False):
    """`replicas: {min, max}`."""

    min: int
    max: int


class RoleData(TypedDict, total=False):
    """One role as the spec gives it (the keys checks.py allows)."""

    priority: float
    replicas: int | ReplicaRange
    resources: ResourcesData
    labels: dict[str, object]
    pg: str
    start_after: float | str
    actor: ActorConfig
    steps: int
    step_time: float | None
    estimated_duration: float | None
    ray_options: dict[str, object]


class ReservedData(TypedDict, total=False):
    """One `pg_pool.reserved` entry: a role's shape, or resources (of some minimum priority)."""

    role: str
    resources: ResourcesData
    count: int
    min_priority: float


class PgPoolData(TypedDict, total=False):
    """The stage's `pg_pool`."""

    reserved: list[ReservedData]
    max_dynamic_pgs: int
    reuse: bool
    enable: bool
    enable_dynamic_pgs: bool
    pg_creation_timeout: float


class PreemptionData(TypedDict, total=False):
    """The stage's `preemption`."""

    label_rules: dict[str, dict[str, list[str]]]
    aggressiveness: str
    cancel_timeout: float
    cross_pool: bool
    protected_pools: list[str]
    enable_label_preemption: bool


class PoolData(TypedDict, total=False):
    """The stage's `pool`: the quota its roles share."""

    name: str
    resources: ResourcesData


@dataclass(frozen=True)
class Checked:
    """A roles stage's free-form sections once checks.py found no problem in them: the
    shapes it checked, typed."""

    pool: PoolData
    pg_pool: PgPoolData
    preemption: PreemptionData
    roles: dict[str, RoleData]

    @classmethod
    def of(cls, read: Canonical) -> Checked:
        """The sections read as checks.py checked them: parse runs only on a checked spec."""
        return cls(
            cast(PoolData, read.pool),
            cast(PgPoolData, read.pg_pool),
            cast(PreemptionData, read.preemption),
            cast(dict[str, RoleData], read.roles),
        )


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
    actor: ActorConfig
    steps: int
    # for the simulated cluster: seconds per step, or the whole run
    step_time: float | None
    estimated_duration: float | None
    # more options for the replica's actor (ScheduleMesh's `ray_options`: a name, ...)
    ray_options: dict[str, object] = field(default_factory=dict)


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


def _resources(data: ResourcesData) -> Resources:
    """`memory` reads like a job's (`8G`; a plain number is megabytes, as ScheduleMesh's
    `ensure_pool` takes it); `memory_gb` is the older spelling. checks.py allows one of them."""
    memory = float(data.get("memory_gb", 0)) * (1 << 30)
    if "memory" in data:
        memory = float(memory_bytes(data["memory"]) or 0)
    return Resources(
        cpus=float(data.get("cpus", 0)), gpus=float(data.get("gpus", 0)), memory=memory
    )


def _quota(data: ResourcesData) -> Resources:
    """A pool's quota limits what it names: a resource it leaves out (`{cpus: 8}` says
    nothing of memory) is not limited, infinite here until the plan bounds it by the cluster
    (`planning.plan`)."""
    given = _resources(data)
    return Resources(
        given.cpus if "cpus" in data else math.inf,
        given.gpus if "gpus" in data else math.inf,
        given.memory if "memory" in data or "memory_gb" in data else math.inf,
    )


def _replicas(value: int | ReplicaRange) -> tuple[int, int]:
    if isinstance(value, dict):
        low = int(value.get("min", 1))
        return low, int(value["max"]) if "max" in value else low
    return int(value), int(value)


def parse(name: str, spec: RolesStage) -> RolesPlan:
    """The typed settings of a checked spec, before any scaling."""
    read = canonical(spec)
    checked = Checked.of(read)
    pre, pg = checked.preemption, checked.pg_pool
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
    for role, data in checked.roles.items():
        low, high = _replicas(data.get("replicas", 1))
        roles[role] = RoleSpec(
            role,
            float(data.get("priority", spec.priority)),
            low,
            high,
            _resources(data.get("resources", ResourcesData(cpus=1))),
            {**spec.labels, **{str(k): str(v) for k, v in data.get("labels", {}).items()}},
            str(data.get("pg", "dynamic")),
            data.get("start_after", 0.0),
            ActorConfig(**data.get("actor", {})),
            int(data.get("steps", 1)),
            data.get("step_time"),
            data.get("estimated_duration"),
            dict(data.get("ray_options", {})),
        )
    quota = checked.pool.get("resources")
    return RolesPlan(
        str(checked.pool.get("name", name)),
        _quota(quota) if quota else None,
        policy,
        _reserved(pg.get("reserved", []), roles),
        int(pg.get("max_dynamic_pgs", 8)),
        bool(pg.get("reuse", True)),
        roles,
        1.0,
        bool(pg.get("enable", True)),
        bool(pg.get("enable_dynamic_pgs", True)),
        float(pg.get("pg_creation_timeout", 60.0)),
        tuple(read.said),
    )


def _reserved(entries: list[ReservedData], roles: dict[str, RoleSpec]) -> list[Reserved]:
    """The reserved groups, each entry `count` times (a role's entry: once per replica)."""
    reserved: list[Reserved] = []
    for entry in entries:
        role = entry.get("role")
        shape = roles[role].resources if role else _resources(entry["resources"])
        count = int(entry.get("count", roles[role].max if role else 1))
        low = entry.get("min_priority")
        reserved += [Reserved(shape, role, None if low is None else float(low))] * count
    return reserved
