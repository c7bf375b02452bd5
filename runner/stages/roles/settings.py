"""A roles stage's settings, typed: its roles, pool, quota, placement groups and policy.

The planner resolves them once (scaled to the cluster when `autoscale_to_cluster` is on) and
keeps them in the plan; the driver and the simulated cluster read the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.quantities import memory_bytes
from runner.resources import Resources
from runner.scheduler.policy import Policy, aggressiveness_level
from runner.schema import RolesStage


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


@dataclass(frozen=True)
class RolesPlan:
    """The stage's settings, resolved at plan time; the simulator reads the same."""

    pool: str
    quota: Resources | None
    policy: Policy
    reserved: list[tuple[Resources, str | None]]
    max_dynamic_pgs: int
    reuse: bool
    roles: dict[str, RoleSpec]
    scale: float


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
    pre = spec.preemption
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
    for role, data in spec.roles.items():
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
        )
    reserved: list[tuple[Resources, str | None]] = []
    for entry in spec.pg_pool.get("reserved", []):
        role = entry.get("role")
        shape = roles[role].resources if role else _resources(entry["resources"])
        count = int(entry.get("count", roles[role].max if role else 1))
        reserved += [(shape, role)] * count
    quota = spec.pool.get("resources")
    return RolesPlan(
        str(spec.pool.get("name", name)),
        _resources(quota) if quota else None,
        policy,
        reserved,
        int(spec.pg_pool.get("max_dynamic_pgs", 8)),
        bool(spec.pg_pool.get("reuse", True)),
        roles,
        1.0,
    )
