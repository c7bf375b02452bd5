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

import json
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.errors import PlanError
from runner.plan import PlanContext, StagePlan, Unit, claim, decider, digest, result_config
from runner.plan import stage_fingerprint as fingerprint_of
from runner.resources import Resources
from runner.scheduler.core import Grant, Ticket
from runner.scheduler.metrics import REGISTRY
from runner.scheduler.pgpool import PGPool, Reserved
from runner.scheduler.policy import REASONS, THRESHOLDS, Policy
from runner.schema import RolesStage, StageSpec
from runner.spec import Problems, did_you_mean, find_cycle
from runner.stages.base import RunContext, StageKind, StageOutcome
from runner.stages.pool import import_error
from runner.store import Event, UnitRow, UnitState, atomic_path

log = logging.getLogger(__name__)

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
)
RESOURCE_KEYS = ("cpus", "gpus", "memory_gb")
PREEMPTION_KEYS = (
    "label_rules",
    "aggressiveness",
    "cancel_timeout",
    "cross_pool",
    "protected_pools",
)
PG_POOL_KEYS = ("reserved", "max_dynamic_pgs", "reuse")
# seconds a placement group or an actor may take to become ready before the replica fails
READY_TIMEOUT = 60.0
# seconds to wait for a stubborn victim's state() before it is killed anyway
STATE_TIMEOUT = 2.0
EVENTS = "events.jsonl"


# --- the spec, typed -----------------------------------------------------------------------


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
    return Resources(
        cpus=float(data.get("cpus", 0)),
        gpus=float(data.get("gpus", 0)),
        memory=float(data.get("memory_gb", 0)) * (1 << 30),
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
        aggressiveness=pre.get("aggressiveness", "medium"),
        cross_pool=bool(pre.get("cross_pool", False)),
        protected_pools=frozenset(pre.get("protected_pools", [])),
        cancel_timeout=float(pre.get("cancel_timeout", 5.0)),
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


# --- spec checks ---------------------------------------------------------------------------


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Every role, the pool, the placement-group pool and the preemption settings."""
    assert isinstance(spec, RolesStage)
    path = f"pipeline.stages.{name}"
    if not isinstance(spec.roles, dict) or not spec.roles:
        problems.add(f"{path}.roles", "a roles stage needs at least one role: NAME: {actor, ...}")
        return
    for role, data in spec.roles.items():
        _check_role(f"{path}.roles.{role}", str(role), data, spec.roles, problems)
    after = {
        str(r): [d["start_after"]]
        for r, d in spec.roles.items()
        if isinstance(d, dict) and isinstance(d.get("start_after"), str)
    }
    if cycle := find_cycle(after):
        problems.add(f"{path}.roles.{cycle[0]}.start_after", f"a cycle: {' -> '.join(cycle)}")
    _check_keys(f"{path}.pool", spec.pool, ("name", "resources"), problems)
    if isinstance(spec.pool.get("resources"), dict):
        _check_resources(f"{path}.pool.resources", spec.pool["resources"], problems)
    _check_keys(f"{path}.pg_pool", spec.pg_pool, PG_POOL_KEYS, problems)
    _check_int(
        f"{path}.pg_pool.max_dynamic_pgs", spec.pg_pool.get("max_dynamic_pgs", 8), 0, problems
    )
    if not isinstance(spec.pg_pool.get("reuse", True), bool):
        problems.add(
            f"{path}.pg_pool.reuse", f"= {spec.pg_pool['reuse']!r}: expected true or false"
        )
    _check_reserved(
        f"{path}.pg_pool.reserved", spec.pg_pool.get("reserved", []), spec.roles, problems
    )
    _check_preemption(f"{path}.preemption", spec.preemption, problems)


def _check_keys(path: str, data: Any, allowed: tuple[str, ...], problems: Problems) -> bool:
    if not isinstance(data, dict):
        problems.add(path, f"= {data!r}: expected a mapping with keys {', '.join(allowed)}")
        return False
    for key in data:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            problems.add(f"{path}.{key}", f"unknown key{hint} (allowed: {', '.join(allowed)})")
    return True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(path: str, value: Any, low: int, problems: Problems) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.add(path, f"= {value!r}: expected an integer >= {low}")


def _check_resources(path: str, data: Any, problems: Problems) -> None:
    if not _check_keys(path, data, RESOURCE_KEYS, problems):
        return
    for key, value in data.items():
        if key in RESOURCE_KEYS and (not _number(value) or value < 0):
            problems.add(f"{path}.{key}", f"= {value!r}: expected a number >= 0")
    if all(_number(v) and v == 0 for v in data.values()):
        problems.add(path, f"= {data!r}: a replica needs some cpus or gpus")


def _check_role(
    path: str, role: str, data: Any, roles: Mapping[str, Any], problems: Problems
) -> None:
    if not _check_keys(path, data, ROLE_KEYS, problems):
        return
    target = data.get("actor", {}).get("_target_") if isinstance(data.get("actor"), dict) else None
    if not isinstance(target, str) or not target:
        problems.add(
            f"{path}.actor._target_", "missing: name the role's actor class, pkg.mod.Class"
        )
    elif (error := import_error(target)) is not None:
        problems.add(f"{path}.actor._target_", f"= {target!r}: cannot import: {error}")
    if "priority" in data and not _number(data["priority"]):
        problems.add(f"{path}.priority", f"= {data['priority']!r}: expected a number")
    _check_replicas(f"{path}.replicas", data.get("replicas", 1), problems)
    _check_resources(f"{path}.resources", data.get("resources", {"cpus": 1}), problems)
    labels = data.get("labels", {})
    if not isinstance(labels, dict):
        problems.add(f"{path}.labels", f"= {labels!r}: expected a mapping of strings")
    if data.get("pg", "dynamic") not in ("reserved", "dynamic"):
        problems.add(f"{path}.pg", f"= {data['pg']!r}: not one of reserved, dynamic")
    after = data.get("start_after", 0)
    if isinstance(after, str):
        if after == role or after not in roles:
            others = ", ".join(r for r in roles if r != role)
            problems.add(f"{path}.start_after", f"= {after!r}: not another role (roles: {others})")
    elif not _number(after) or after < 0:
        problems.add(f"{path}.start_after", f"= {after!r}: expected seconds >= 0 or a role name")
    _check_int(f"{path}.steps", data.get("steps", 1), 1, problems)
    for key in ("step_time", "estimated_duration"):
        value = data.get(key)
        if value is not None and (not _number(value) or value <= 0):
            problems.add(f"{path}.{key}", f"= {value!r}: expected seconds > 0")


def _check_replicas(path: str, value: Any, problems: Problems) -> None:
    if isinstance(value, dict):
        if not _check_keys(path, value, ("min", "max"), problems):
            return
        low, high = value.get("min", 1), value.get("max", value.get("min", 1))
        _check_int(f"{path}.min", low, 0, problems)
        _check_int(f"{path}.max", high, 1, problems)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.add(path, f"= {value!r}: min must not exceed max")
    else:
        _check_int(path, value, 1, problems)


def _check_reserved(path: str, entries: Any, roles: Mapping[str, Any], problems: Problems) -> None:
    if not isinstance(entries, list):
        problems.add(
            path, f"= {entries!r}: expected a list of {{role: NAME}} or {{resources: ...}}"
        )
        return
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not _check_keys(where, entry, ("role", "resources", "count"), problems):
            continue
        if ("role" in entry) == ("resources" in entry):
            problems.add(where, "name either a role (its replicas' shape) or resources")
        elif "role" in entry and entry["role"] not in roles:
            problems.add(
                f"{where}.role", f"= {entry['role']!r}: no such role (roles: {', '.join(roles)})"
            )
        elif "resources" in entry:
            _check_resources(f"{where}.resources", entry["resources"], problems)
        if "count" in entry:
            _check_int(f"{where}.count", entry["count"], 1, problems)
    wanted = {r for r, d in roles.items() if isinstance(d, dict) and d.get("pg") == "reserved"}
    if wanted and not entries:
        problems.add(
            path, f"roles {', '.join(sorted(wanted))} ask for pg: reserved, but none is reserved"
        )


def _check_preemption(path: str, data: Any, problems: Problems) -> None:
    if not _check_keys(path, data, PREEMPTION_KEYS, problems):
        return
    level = data.get("aggressiveness", "medium")
    if level not in THRESHOLDS:
        problems.add(f"{path}.aggressiveness", f"= {level!r}: not one of {', '.join(THRESHOLDS)}")
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


# --- planning ------------------------------------------------------------------------------


def plan(name: str, spec: StageSpec, raw: dict[str, Any], ctx: PlanContext) -> StagePlan:
    """One unit per replica (up to `max`); claims per role and per reserved group."""
    assert isinstance(spec, RolesStage)
    roles_plan = parse(name, spec)
    notes: list[str] = []
    if spec.autoscale_to_cluster:
        roles_plan, note = autoscale(roles_plan, ctx)
        if note:
            notes.append(f"{name}: {note}")
    config = result_config(spec, raw)
    config["roles"] = {
        r: {"actor": d.get("actor"), "steps": d.get("steps", 1)} for r, d in spec.roles.items()
    }
    own, fp = fingerprint_of(config, [ctx.upstream[n].fingerprint for n in spec.needs])
    decide = decider(name, config, ctx)
    units = []
    for role in roles_plan.roles.values():
        role_fp = digest(
            own, role.name, json.dumps(config["roles"][role.name], sort_keys=True, default=str)
        )
        for i in range(role.max):
            payload = {"role": role.name, "replica": i}
            units.append(decide(Unit(f"{role.name}/{i}", digest(role_fp, str(i)), payload)))
    claims = [
        claim(f"{r.name} replica", r.resources, r.max, ctx.cluster)
        for r in roles_plan.roles.values()
    ]
    claims += [
        claim(f"reserved group for {role or 'any role'}", shape, 1, ctx.cluster)
        for shape, role in roles_plan.reserved
    ]
    _check_fit(name, roles_plan, ctx)
    return StagePlan(
        name, "roles", spec, fp, config, units, claims, notes, "", {"roles": roles_plan}
    )


def _check_fit(name: str, rp: RolesPlan, ctx: PlanContext) -> None:
    """Reserved groups must fit together; every replica must fit in the pool's quota."""
    problems = []
    total = Resources()
    for shape, _ in rp.reserved:
        total = total + shape
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
    if problems:
        raise PlanError(problems)


def autoscale(rp: RolesPlan, ctx: PlanContext) -> tuple[RolesPlan, str]:
    """Scale every shape down by one factor so the spec's size fits the cluster (never up).

    The spec's size is the pool quota when it declares one, else every role at its maximum;
    each replica must also fit on the largest node."""
    size = rp.quota
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
        n: RoleSpec(**{**r.__dict__, "resources": _scaled(r.resources, factor)})
        for n, r in rp.roles.items()
    }
    reserved = [(_scaled(s, factor), role) for s, role in rp.reserved]
    quota = _scaled(rp.quota, factor) if rp.quota is not None else None
    scaled = RolesPlan(
        rp.pool, quota, rp.policy, reserved, rp.max_dynamic_pgs, rp.reuse, roles, factor
    )
    note = (
        f"autoscale_to_cluster: resources scaled by {factor:.3g} (the spec asks for "
        f"{size.describe()}, the cluster has {have.describe()})"
    )
    return scaled, note


def _scaled(r: Resources, factor: float) -> Resources:
    """`r` times `factor`, floored to hundredths; GPUs above one stay whole (Ray's rule)."""
    cpus = max(0.01, math.floor(r.cpus * factor * 100) / 100) if r.cpus else 0.0
    gpus = r.gpus * factor
    gpus = float(math.floor(gpus)) if gpus >= 1 else math.floor(gpus * 100) / 100 if gpus else 0.0
    if r.gpus and not gpus:
        gpus = 0.01
    return Resources(cpus, gpus, math.floor(r.memory * factor), r.custom)


# --- the actor host ------------------------------------------------------------------------


class RoleContext:
    """What a role actor's `run(ctx)` sees: who it is, its steps, and whether to stop."""

    def __init__(self, role: str, replica: int, steps: int, flag: threading.Event) -> None:
        self.role, self.replica, self.steps = role, replica, steps
        self._flag = flag

    @property
    def cancelled(self) -> bool:
        """True once the runner asks the replica to stop (preemption or Ctrl-C)."""
        return self._flag.is_set()


class RoleHost:
    """Runs inside a Ray actor (two threads: `run` and `cancel` / `state` beside it)."""

    def __init__(self, actor: dict[str, Any], role: str, replica: int, steps: int) -> None:
        from hydra.utils import instantiate

        self._flag = threading.Event()
        self.obj = instantiate(actor, _convert_="all")
        self.ctx = RoleContext(role, replica, steps, self._flag)

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, saved: Any) -> dict[str, Any]:
        if saved is not None and hasattr(self.obj, "restore"):
            self.obj.restore(saved)
        result = self.obj.run(self.ctx)
        return {"cancelled": self._flag.is_set(), "state": self.state(), "result": result}

    def cancel(self) -> None:
        self._flag.set()

    def state(self) -> Any:
        return self.obj.state() if hasattr(self.obj, "state") else None


_remote_host: Any = None


def _host_class() -> Any:
    global _remote_host
    if _remote_host is None:
        import ray

        _remote_host = ray.remote(RoleHost)
    return _remote_host


def saves_state(target: str) -> bool:
    """Whether the actor class has `state()` (its preemption then loses no work)."""
    import importlib

    module, _, attr = target.rpartition(".")
    try:
        return hasattr(getattr(importlib.import_module(module), attr), "state")
    except (ImportError, AttributeError):
        return False


# --- the driver ----------------------------------------------------------------------------

FINAL = ("done", "failed", "cancelled")


@dataclass(eq=False)
class Replica:
    """One replica's life: waiting → pending → starting → running (→ stopping → pending)..."""

    unit: Unit
    role: RoleSpec
    index: int
    elastic: bool
    state: str = "waiting"
    ticket: Ticket | None = None
    grant: Grant | None = None
    reserved: Reserved | None = None
    handle: Any = None
    ref: Any = None
    deadline: float = 0.0
    saved: Any = None
    pending_since: float = 0.0
    attempts: int = 0
    preemptions: int = 0
    started: float | None = None
    # when the current attempt began running (a preempted attempt is drawn as its own bar)
    attempt_started: float | None = None
    worker: str | None = None
    result: Any = None
    error: str | None = None


@dataclass
class RolesRun:
    """Drives one roles stage on one thread: admission, placement, preemption, ledger."""

    stage: StagePlan
    ctx: RunContext
    rp: RolesPlan = field(init=False)
    replicas: list[Replica] = field(default_factory=list)
    pgs: PGPool = field(init=False)
    events: list[dict[str, Any]] = field(default_factory=list)
    rows: list[UnitRow] = field(default_factory=list)
    # preemptions and preempted attempts, for the timeline picture
    marks: list[Event] = field(default_factory=list)
    flagged: list[tuple[Grant, str]] = field(default_factory=list)
    flag_lock: threading.Lock = field(default_factory=threading.Lock)
    preempted: Counter[str] = field(default_factory=Counter)
    requeues: int = 0
    waited: dict[float, list[float]] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    running_roles: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rp = self.stage.settings["roles"]
        self.pgs = PGPool(
            self.stage.name, self.ctx.scheduler, self.rp.max_dynamic_pgs, self.rp.reuse
        )
        for unit in self.stage.to_run:
            role = self.rp.roles[unit.payload["role"]]
            i = unit.payload["replica"]
            self.replicas.append(Replica(unit, role, i, elastic=i >= role.min))
        done_roles = {r for r in self.rp.roles if not any(x.role.name == r for x in self.replicas)}
        self.running_roles |= done_roles
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        if self.rp.quota is not None:
            self.ctx.scheduler.set_quota(self.rp.pool, self.rp.quota)

    # lifecycle

    def run(self) -> StageOutcome:
        name = self.stage.name
        total = len(self.stage.units or [])
        outcome = StageOutcome(name, "roles", total=total, skipped=total - len(self.replicas))
        self.ctx.progress.start(name, len(self.replicas))
        try:
            if self.replicas:
                self._reserve()
                self._loop()
        finally:
            self._teardown()
            self.ctx.progress.finish(name)
        return self._conclude(outcome)

    def _reserve(self) -> None:
        top = max(r.priority for r in self.rp.roles.values())
        self.pgs.reserve(self.rp.reserved, top, self.rp.pool, self.ctx.stop.is_set)
        for r in self.pgs.reserved:
            self._wait_ready(r.pg.ready(), f"reserved group {r.shape.describe()}")

    def _wait_ready(self, ref: Any, what: str) -> None:
        import ray

        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ctx.stop.is_set():
            ready, _ = ray.wait([ref], timeout=0.2)
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:g}s")

    def _loop(self) -> None:
        while not self.ctx.stop.is_set() and not all(r.state in FINAL for r in self.replicas):
            self.pgs.sweep()
            self._arrivals()
            self.ctx.scheduler.admit()
            self._start_admitted()
            self._preemptions()
            self._poll(0.05)
            self._overdue()
            self._flush()

    def _conclude(self, outcome: StageOutcome) -> StageOutcome:
        counts = Counter(r.state for r in self.replicas)
        outcome.done, outcome.failed = counts["done"], counts["failed"]
        outcome.cancelled = counts["cancelled"] + sum(r.state not in FINAL for r in self.replicas)
        outcome.wall = time.monotonic() - self.t0
        outcome.interrupted = self.ctx.stop.is_set()
        outcome.extra = {
            "preemptions": {k: self.preempted[k] for k in REASONS},
            "requeues": self.requeues,
            "waiting_s_by_priority": {
                f"{p:g}": {
                    "units": len(w),
                    "mean_s": round(sum(w) / len(w), 3),
                    "max_s": round(max(w), 3),
                }
                for p, w in sorted(self.waited.items())
            },
            "placement_groups": {"created": self.pgs.created, "reused": self.pgs.reused},
        }
        path = self.ctx.stage_dir(self.stage.name) / EVENTS
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        outcome.outputs.append(str(path))
        pre = ", ".join(f"{k} {self.preempted[k]}" for k in REASONS)
        waits = ", ".join(
            f"{p:g}: {sum(w) / len(w):.2f}s" for p, w in sorted(self.waited.items(), reverse=True)
        )
        outcome.message = (
            f"preemptions: {pre}; requeues {self.requeues}; mean wait by priority {waits}"
        )
        if outcome.failed:
            outcome.ok = False
            bad = [f"{r.unit.id}: {r.error}" for r in self.replicas if r.state == "failed"]
            outcome.message += "; failed: " + "; ".join(bad[:3])
        if outcome.interrupted:
            outcome.ok = False
        return outcome

    # arrivals and admission

    def _arrived(self, role: RoleSpec) -> bool:
        after = role.start_after
        if isinstance(after, str):
            return after in self.running_roles
        return time.monotonic() - self.t0 >= float(after)

    def _arrivals(self) -> None:
        for r in self.replicas:
            if r.state == "waiting" and self._arrived(r.role):
                r.state = "pending"
                self._event(r, "arrived")
            if r.state == "pending" and r.ticket is None and r.reserved is None:
                if r.pending_since == 0.0:
                    r.pending_since = time.monotonic()
                self._request(r)

    def _request(self, r: Replica) -> None:
        if r.role.pg == "reserved":
            r.reserved = self.pgs.take_reserved(r.role.name, r.role.resources)
            if r.reserved is not None:
                waited = time.monotonic() - r.pending_since
                self.waited.setdefault(r.role.priority, []).append(waited)
                self._start(r)
            return
        r.ticket = self.ctx.scheduler.submit(
            f"{self.stage.name}/{r.unit.id}",
            r.role.resources,
            r.role.priority,
            pool=self.rp.pool,
            labels=r.role.labels,
            policy=None if r.elastic else self.rp.policy,
            on_preempt=self._flag,
            saves_state=self.saves[r.role.name],
            elastic=r.elastic,
            reuse=self.pgs.tag if self.rp.reuse else None,
        )

    def _flag(self, grant: Grant, reason: str) -> None:
        """Called by the scheduler under its lock: only note it; the loop acts on it."""
        with self.flag_lock:
            self.flagged.append((grant, reason))

    def _start_admitted(self) -> None:
        for r in self.replicas:
            if r.state == "pending" and r.ticket is not None and r.ticket.grant is not None:
                r.grant = r.ticket.grant
                self.waited.setdefault(r.role.priority, []).append(r.grant.waited)
                self._start(r)

    def _start(self, r: Replica) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {**r.role.resources.ray_options(), "max_concurrency": 2}
        options["max_restarts"] = 0
        group = None
        if r.reserved is not None:
            group = r.reserved.pg
        elif r.grant is not None and (found := self.pgs.group_for(r.grant)) is not None:
            group, reused = found
            self._event(r, "placement group", reused=reused)
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
        r.handle = (
            _host_class()
            .options(**options)
            .remote(r.role.actor, r.role.name, r.index, r.role.steps)
        )
        r.ref = r.handle.ready.remote()
        r.deadline = time.monotonic() + READY_TIMEOUT
        r.state, r.attempts = "starting", r.attempts + 1
        r.pending_since = 0.0
        self._event(r, "admitted", waited=round(r.grant.waited, 3) if r.grant else 0.0)

    # running, stopping

    def _poll(self, timeout: float) -> None:
        import ray

        refs = {r.ref: r for r in self.replicas if r.ref is not None}
        if not refs:
            time.sleep(timeout)
            return
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            r = refs[ref]
            r.ref = None
            self._on_reply(r, ref)
        now = time.monotonic()
        for r in self.replicas:
            if r.state == "starting" and r.ref is not None and now > r.deadline:
                self._fail(r, f"not ready after {READY_TIMEOUT:g}s (its placement group never fit)")

    def _on_reply(self, r: Replica, ref: Any) -> None:
        import ray

        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if r.state == "stopping":
                self._stopped(r, killed=False)
            else:
                self._fail(r, _first_line(exc))
            return
        if r.state == "starting":
            r.worker, r.state = reply, "running"
            r.attempt_started = time.time()
            r.started = r.started or r.attempt_started
            self.running_roles.add(r.role.name)
            self._event(r, "running", restored=r.saved is not None)
            r.ref = r.handle.run.remote(r.saved)
            self._row(r, UnitState.running)
            return
        if r.state == "stopping" or reply["cancelled"]:
            r.saved = reply["state"] if reply["state"] is not None else r.saved
            self._stopped(r, killed=False)
            return
        r.result = {
            **(
                reply["result"] if isinstance(reply["result"], dict) else {"value": reply["result"]}
            ),
            "preemptions": r.preemptions,
        }
        r.state = "done"
        self._event(r, "done")
        self._release(r)
        self._row(r, UnitState.done)
        self.ctx.progress.advance(self.stage.name, done=1)

    def _preemptions(self) -> None:
        # a grant made by another stage's admission pass may be flagged before we saw it
        self._start_admitted()
        with self.flag_lock:
            flagged, self.flagged = self.flagged, []
        for grant, reason in flagged:
            r = next((x for x in self.replicas if x.grant is grant), None)
            if r is None or r.state not in ("starting", "running"):
                continue
            r.preemptions += 1
            self.preempted[reason] += 1
            self._event(r, "preempt requested", reason=reason)
            self.marks.append(
                Event(self.stage.name, r.unit.id, "preempted", time.time(), detail=reason)
            )
            if r.state == "starting":
                self._stopped(r, killed=True)
                continue
            r.handle.cancel.remote()
            r.state = "stopping"
            r.deadline = time.monotonic() + self.rp.policy.cancel_timeout

    def _overdue(self) -> None:
        import ray

        now = time.monotonic()
        for r in self.replicas:
            if r.state != "stopping" or now <= r.deadline:
                continue
            try:
                state = ray.get(r.handle.state.remote(), timeout=STATE_TIMEOUT)
                r.saved = state if state is not None else r.saved
            except Exception as exc:  # stuck or dead: kill it with what was saved before
                log.debug("%s: state() failed: %s", r.unit.id, exc)
            self._stopped(r, killed=True)

    def _stopped(self, r: Replica, killed: bool) -> None:
        """A victim is out: kill its process, give its resources back, queue it again."""
        self._event(
            r,
            "killed after cancel_timeout" if killed and r.state == "stopping" else "stopped",
            saved=r.saved is not None,
        )
        if r.attempt_started is not None:
            self.marks.append(
                Event(
                    self.stage.name,
                    r.unit.id,
                    "attempt",
                    time.time(),
                    detail="preempted",
                    started=r.attempt_started,
                )
            )
        self._release(r)
        r.state, r.ref, r.pending_since = "pending", None, 0.0
        r.attempt_started = None
        self.requeues += 1
        self._row(r, UnitState.pending)

    def _fail(self, r: Replica, error: str) -> None:
        r.error, r.state, r.ref = error, "failed", None
        self._event(r, "failed", error=error)
        self._release(r)
        self._row(r, UnitState.failed)
        self.ctx.progress.advance(self.stage.name, failed=1)

    def _release(self, r: Replica) -> None:
        import ray

        if r.handle is not None:
            ray.kill(r.handle, no_restart=True)
            r.handle = None
        if r.reserved is not None:
            r.reserved.busy, r.reserved = False, None
        if r.grant is not None:
            self.pgs.give_back(r.grant)
            r.grant = None
        elif r.ticket is not None:
            self.ctx.scheduler.withdraw(r.ticket)
        r.ticket = None

    def _teardown(self) -> None:
        for r in self.replicas:
            if r.state not in FINAL:
                was = r.state
                self._release(r)
                r.state, r.error = "cancelled", "cancelled"
                if was != "waiting":
                    self._event(r, "cancelled")
                self._row(r, UnitState.cancelled)
        self.pgs.close()
        self._flush()

    # records

    def _event(self, r: Replica, what: str, **details: Any) -> None:
        self.events.append(
            {
                "t": round(time.time(), 4),
                "unit": r.unit.id,
                "role": r.role.name,
                "event": what,
                **details,
            }
        )
        log.debug("%s %s %s %s", self.stage.name, r.unit.id, what, details or "")

    def _row(self, r: Replica, state: UnitState) -> None:
        now = time.time()
        # the row spans the last attempt; earlier, preempted attempts are events
        started = r.attempt_started or r.started
        ended = now if state in (UnitState.done, UnitState.failed, UnitState.cancelled) else None
        self.rows.append(
            UnitRow(
                self.stage.name,
                r.unit.id,
                r.unit.fingerprint,
                state,
                r.attempts,
                started,
                ended,
                None if ended is None or started is None else ended - started,
                r.worker,
                r.error,
                r.unit.payload,
                r.result,
            )
        )

    def _flush(self) -> None:
        if self.rows:
            self.ctx.ledger.write(self.rows)
            self.rows = []
        if self.marks:
            self.ctx.ledger.add_events(self.marks)
            self.marks = []
        REGISTRY.set_units(self.stage.name, Counter(r.state for r in self.replicas))


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:300]


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return RolesRun(stage, ctx).run()


KIND = StageKind(RolesStage, check, plan, run)
