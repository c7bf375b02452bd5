"""How a roles stage plans: one unit per replica, claims per role and per reserved group, the
fit of reserved groups and quota, and the optional scaling of every shape to the cluster."""

from __future__ import annotations

import dataclasses
import json
import math

from runner.errors import PlanError
from runner.identity import digest
from runner.plan import (
    PlanContext,
    StagePlan,
    StageSizing,
    Unit,
    claim,
    decider,
    result_config,
)
from runner.plan import stage_fingerprint as fingerprint_of
from runner.resources import Resources
from runner.scheduler.policy import Party, preemption_reason
from runner.schema import StageSpec
from runner.stages.roles.schema import RolesStage
from runner.stages.roles.settings import Reserved, RolesPlan, parse


def plan(name: str, spec: StageSpec, raw: dict[str, object], ctx: PlanContext) -> StagePlan:
    """One unit per replica (up to `max`); claims per role and per reserved group."""
    assert isinstance(spec, RolesStage)
    roles_plan = parse(name, spec)
    notes: list[str] = []
    if spec.autoscale_to_cluster:
        roles_plan, note = autoscale(roles_plan, ctx)
        if note:
            notes.append(f"{name}: {note}")
    if roles_plan.quota is not None:
        quota = _bounded(roles_plan.quota, ctx.cluster.total)
        roles_plan = dataclasses.replace(roles_plan, quota=quota)
    config = result_config(spec, raw)
    config["roles"] = roles_config = {
        r: {"actor": d.get("actor"), "steps": d.get("steps", 1)}
        for r, d in spec.roles.items()
        if isinstance(d, dict)  # `parse` has refused any other
    }
    own, fp = fingerprint_of(config, [ctx.upstream[n].fingerprint for n in spec.needs])
    decide = decider(name, config, ctx)
    units = []
    for role in roles_plan.roles.values():
        role_fp = digest(
            own, role.name, json.dumps(roles_config[role.name], sort_keys=True, default=str)
        )
        for i in range(role.max):
            payload = {"role": role.name, "replica": i}
            units.append(decide(Unit(f"{role.name}/{i}", digest(role_fp, str(i)), payload)))
    claims = [
        claim(f"{r.name} replica", r.resources, r.max, ctx.cluster)
        for r in roles_plan.roles.values()
    ]
    claims += [
        claim(f"reserved group for {g.describe()}", g.shape, 1, ctx.cluster)
        for g in roles_plan.reserved
    ]
    _check_fit(name, roles_plan, ctx)
    notes += _beside_reserved(name, roles_plan, ctx)
    notes += _groups_said(name, roles_plan)
    sizing = StageSizing.by_unit(
        {u.id: roles_plan.roles[replica_of(u)[0]].resources for u in units}
    )
    return StagePlan(name, "roles", spec, fp, config, units, claims, notes, "", roles_plan, sizing)


def replica_of(unit: Unit) -> tuple[str, int]:
    """The role and replica index of a unit this planner made (its payload)."""
    payload = unit.payload
    assert isinstance(payload, dict)
    return str(payload["role"]), int(payload["replica"])


def _check_fit(name: str, rp: RolesPlan, ctx: PlanContext) -> None:
    """Reserved groups must fit together; every replica must fit in the pool's quota."""
    problems = []
    total = _held(rp.reserved)
    if rp.reserved and not total.fits_in(ctx.cluster.total):
        problems.append(
            f"pipeline.stages.{name}.pg_pool.reserved: the reserved groups need "
            f"{total.describe()} together: {total.shortfall(ctx.cluster.total)} in the cluster"
        )
    for role in rp.roles.values():
        if rp.quota is not None and not role.resources.fits_in(rp.quota):
            problems.append(
                f"pipeline.stages.{name}.roles.{role.name}: one replica needs "
                f"{role.resources.describe()}, more than the pool quota: "
                f"{role.resources.shortfall(rp.quota)}"
            )
    problems += _deadlocks(name, rp, ctx)
    problems += _no_dynamic_groups(name, rp)
    if problems:
        raise PlanError(problems)


def _deadlocks(name: str, rp: RolesPlan, ctx: PlanContext) -> list[str]:
    """Specs that can never finish: a role that cannot run beside the reserved groups of roles
    that wait for it (`start_after`, directly or through other roles). A reserved group is
    released only once no replica that may use it is left to run, and those replicas arrive
    only after this role runs; idle groups are no one's to preempt. (Roles waiting on each
    other in a cycle are a spec error: checks.py.)"""
    problems = []
    chains = {r: _waits_for(r, rp) for r in rp.roles}
    for first in rp.roles.values():
        if first.pg == "reserved" or not first.resources.fits_in(ctx.cluster.largest):
            continue  # no node holds it at all: the plan's fit check says so
        held = [
            (group, waiter)
            for group in rp.reserved
            if (waiter := _waiter(group, first.name, rp, chains)) is not None
        ]
        if not held:
            continue
        reserved = _held([g for g, _ in held])
        room = ctx.cluster.total - reserved
        if rp.quota is not None:
            room = _least(room, rp.quota - reserved)
        if first.resources.fits_in(room):
            continue
        role = held[0][1]
        path = " → ".join([role, *chains[role][: chains[role].index(first.name) + 1]])
        holders = sorted({g.describe() for g, _ in held})
        problems.append(
            f"pipeline.stages.{name}.roles.{role}.start_after: {role} waits for {first.name} to "
            f"run, but the reserved groups (for {', '.join(holders)}) hold "
            f"{reserved.describe()} from the start and {first.name} needs "
            f"{first.resources.describe()}: {first.resources.shortfall(room)}; the stage "
            f"could never finish (cycle: {path} → reserved groups → {role})"
        )
    return problems


def _no_dynamic_groups(name: str, rp: RolesPlan) -> list[str]:
    """`max_dynamic_pgs: 0` with dynamic groups on: a dynamic role that no reserved group
    serves would wait for a group for ever (a run that hangs, with nothing said), where
    `enable_dynamic_pgs: false` is what runs such roles without groups."""
    if not (rp.groups and rp.dynamic_groups) or rp.max_dynamic_pgs > 0:
        return []
    stranded = [
        r.name
        for r in rp.roles.values()
        if r.pg == "dynamic" and not any(g.serves(r) for g in rp.reserved)
    ]
    if not stranded:
        return []
    return [
        f"pipeline.stages.{name}.pg_pool.max_dynamic_pgs: = 0: no reserved group serves "
        f"{', '.join(stranded)} (pg: dynamic), whose replicas would wait for a placement group "
        "for ever; give max_dynamic_pgs >= 1, or enable_dynamic_pgs: false to run them without "
        "groups"
    ]


def _beside_reserved(name: str, rp: RolesPlan, ctx: PlanContext) -> list[str]:
    """What holds what: a role that does not fit beside the reserved groups runs once the
    groups' roles have no replica left to run, or sooner by preempting their replicas where
    the policy allows it."""
    if not rp.reserved:
        return []
    reserved = _held(rp.reserved)
    room = ctx.cluster.total - reserved
    notes = []
    for role in rp.roles.values():
        if role.pg == "reserved" or role.resources.fits_in(room):
            continue
        holders = sorted({r.name for g in rp.reserved for r in rp.roles.values() if g.serves(r)})
        me = Party(role.priority, rp.pool, role.labels)
        rules = {
            h: preemption_reason(
                me, Party(rp.roles[h].priority, rp.pool, rp.roles[h].labels), rp.policy
            )
            for h in holders
        }
        may = [f"{h} ({why} rule)" for h, why in rules.items() if why is not None]
        then = (
            f"or sooner by preempting {', '.join(may)}" if may else "(no rule lets it preempt them)"
        )
        notes.append(
            f"{name}: {role.name} ({role.resources.describe()}) does not fit beside the reserved "
            f"groups ({reserved.describe()} for {', '.join(holders) or 'any role'}): it runs once "
            f"their roles have no replica left to run {then}"
        )
    return notes


def _waits_for(role: str, rp: RolesPlan) -> list[str]:
    """The roles `role` waits to see running, nearest first (`start_after` followed)."""
    chain: list[str] = []
    after = rp.roles[role].start_after
    while isinstance(after, str) and after in rp.roles and after not in chain:
        chain.append(after)
        after = rp.roles[after].start_after
    return chain


def _waiter(group: Reserved, first: str, rp: RolesPlan, chains: dict[str, list[str]]) -> str | None:
    """A role whose replicas may use `group` and that waits for `first` to run: the group is
    held until after `first` runs."""
    for role in rp.roles.values():
        if group.serves(role) and first in chains[role.name]:
            return role.name
    return None


def _held(groups: list[Reserved]) -> Resources:
    total = Resources()
    for group in groups:
        total = total + group.shape
    return total


def _groups_said(name: str, rp: RolesPlan) -> list[str]:
    """What the plan says of the stage's placement groups: ScheduleMesh's keys as read, and
    how many replicas may hold a dynamic group at once."""
    notes = [f"{name}: ScheduleMesh's {line}" for line in rp.said]
    dynamic = sum(r.max for r in rp.roles.values() if r.pg == "dynamic")
    if not rp.groups:
        notes.append(f"{name}: pg_pool.enable is false: replicas run without placement groups")
    elif not rp.dynamic_groups and dynamic:
        notes.append(
            f"{name}: enable_dynamic_pgs is false: replicas of dynamic roles run without "
            "placement groups, pinned to their node"
        )
    elif dynamic > rp.max_dynamic_pgs:
        notes.append(
            f"{name}: max_dynamic_pgs {rp.max_dynamic_pgs}: at most {rp.max_dynamic_pgs} of the "
            f"{dynamic} replicas of dynamic roles hold a placement group at once; the others "
            "wait for one"
        )
    return notes


def _bounded(quota: Resources, total: Resources) -> Resources:
    """The quota with what it leaves unlimited (infinite) at `total` (the cluster's; zero:
    the quota as the spec names it)."""
    return Resources(
        total.cpus if math.isinf(quota.cpus) else quota.cpus,
        total.gpus if math.isinf(quota.gpus) else quota.gpus,
        total.memory if math.isinf(quota.memory) else quota.memory,
        quota.custom,
    )


def _least(a: Resources, b: Resources) -> Resources:
    return Resources(min(a.cpus, b.cpus), min(a.gpus, b.gpus), min(a.memory, b.memory))


def autoscale(rp: RolesPlan, ctx: PlanContext) -> tuple[RolesPlan, str]:
    """Scale every shape down by one factor so the spec's size fits the cluster (never up).

    The spec's size is the pool quota when it declares one, else every role at its maximum;
    each replica must also fit on the largest node."""
    size = None if rp.quota is None else _bounded(rp.quota, Resources())
    if size is None:
        size = Resources()
        for role in rp.roles.values():
            size = size + role.resources.scale(role.max)
    have, largest = ctx.cluster.total, ctx.cluster.largest
    ratios = [1.0]
    for need, got in ((size.cpus, have.cpus), (size.gpus, have.gpus), (size.memory, have.memory)):
        if need > 0 and got > 0:
            ratios.append(got / need)
    for role in rp.roles.values():
        r = role.resources
        for need, got in (
            (r.cpus, largest.cpus),
            (r.gpus, largest.gpus),
            (r.memory, largest.memory),
        ):
            if need > 0 and got > 0:
                ratios.append(got / need)
    factor = min(ratios)
    if factor >= 1.0:
        return rp, ""
    roles = {
        n: dataclasses.replace(r, resources=_scaled(r.resources, factor))
        for n, r in rp.roles.items()
    }
    reserved = [dataclasses.replace(g, shape=_scaled(g.shape, factor)) for g in rp.reserved]
    quota = _scaled(rp.quota, factor) if rp.quota is not None else None
    scaled = dataclasses.replace(rp, quota=quota, reserved=reserved, roles=roles, scale=factor)
    note = (
        f"autoscale_to_cluster: resources scaled by {factor:.3g} (the spec asks for "
        f"{size.describe()}, the cluster has {have.describe()})"
    )
    return scaled, note


def _scaled(r: Resources, factor: float) -> Resources:
    """`r` times `factor`, floored to hundredths; GPUs above one stay whole (Ray's rule); what
    a quota leaves unlimited (infinite) stays so."""
    cpus = max(0.01, math.floor(r.cpus * factor * 100) / 100) if 0 < r.cpus < math.inf else r.cpus
    gpus = r.gpus * factor
    if gpus < math.inf:
        gpus = float(math.floor(gpus)) if gpus >= 1 else math.floor(gpus * 100) / 100
        if r.gpus and not gpus:
            gpus = 0.01
    memory = math.floor(r.memory * factor) if r.memory < math.inf else r.memory
    return Resources(cpus, gpus, memory, r.custom)
