"""The simulated cluster (`cluster=sim`): the same plan through the same scheduler core, in
virtual time, so behaviour at hundreds of nodes can be checked on a laptop.

Nothing starts: an event queue advances a virtual clock that the scheduler reads. Units take
the time their spec declares (`steps` × `step_time`, or `estimated_duration`; a pool item or
an undeclared unit takes `cluster.sim_unit_seconds`). A preempted replica stops within one
step (or at `cancel_timeout`), keeps its progress when its actor has `state()`, and queues
again, as in a real run. It prints what a real run would: units admitted, how many ran at
once, preemptions by reason, waiting time by priority, and utilization.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from runner.plan import Plan, StagePlan, StagePlanner, make_plan
from runner.resources import Resources
from runner.scheduler.core import Grant, Scheduler, Ticket
from runner.scheduler.metrics import Metrics
from runner.scheduler.policy import REASONS
from runner.spec import Spec
from runner.stages.roles import RoleSpec, RolesPlan, saves_state


class VirtualClock:
    """The scheduler's clock in a simulation: moved only by the event queue."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StageStats:
    """What the simulation observed of one stage."""

    kind: str
    units: int = 0
    admitted: int = 0
    running: int = 0
    peak: int = 0
    finished: float | None = None
    requeues: int = 0
    preemptions: Counter[str] = field(default_factory=Counter)
    unit_label: str = "unit"
    shape: Resources = field(default_factory=Resources)


@dataclass
class Simulation:
    """Runs a plan's stages in dependency order in virtual time."""

    plan: Plan
    needs: Mapping[str, list[str]]
    unit_seconds: float
    clock: VirtualClock = field(default_factory=VirtualClock)
    scheduler: Scheduler = field(init=False)
    stats: dict[str, StageStats] = field(default_factory=dict)
    _queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _on_grant: dict[Ticket, Callable[[Grant], None]] = field(default_factory=dict)
    _busy: Resources = field(default_factory=Resources)
    _last: float = 0.0
    _pending: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(
            list(self.plan.cluster.nodes), clock=self.clock, metrics=Metrics(collectors=False)
        )

    # the event loop

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def ask(self, ticket: Ticket, then: Callable[[Grant], None]) -> None:
        self._on_grant[ticket] = then

    def forget(self, ticket: Ticket) -> bool:
        """Withdraw a waiting request; False when it was already granted."""
        if self._on_grant.pop(ticket, None) is None:
            return False
        self.scheduler.withdraw(ticket)
        return True

    def run(self) -> None:
        self._pending = set(self.plan.stages)
        self._start_ready()
        self._admit()
        while self._queue:
            now = self._queue[0][0]
            self._account(now)
            while self._queue and self._queue[0][0] <= now:
                heapq.heappop(self._queue)[2]()
            self._admit()

    def _admit(self) -> None:
        """Admit until nothing moves: a grant's follow-up may ask for more (arrivals)."""
        while granted := self.scheduler.admit():
            for ticket in granted:
                assert ticket.grant is not None
                self._on_grant.pop(ticket)(ticket.grant)

    def _account(self, now: float) -> None:
        """Integrate the resources in use over the time that just passed."""
        total = self.plan.cluster.total
        used = total - self.scheduler.free()
        self._busy = self._busy + used.scale(now - self._last)
        self._last = self.clock.now = now

    def stage_done(self, name: str) -> None:
        self.stats[name].finished = self.clock.now
        self._start_ready()

    def _start_ready(self) -> None:
        finished = {n for n, s in self.stats.items() if s.finished is not None}
        for name in sorted(self._pending):
            if set(self.needs.get(name, [])) <= finished:
                self._pending.discard(name)
                stage = self.plan.stages[name]
                driver = {"pool": SimPool, "roles": SimRoles}.get(stage.kind, SimClaims)
                driver(self, stage).start()

    # the numbers

    def utilization(self) -> dict[str, float | None]:
        total, span = self.plan.cluster.total, self._last
        return {
            "cpu": self._busy.cpus / (total.cpus * span) if total.cpus and span else None,
            "gpu": self._busy.gpus / (total.gpus * span) if total.gpus and span else None,
        }


@dataclass
class _Driver:
    sim: Simulation
    stage: StagePlan

    def start(self) -> None:
        raise NotImplementedError

    @property
    def st(self) -> StageStats:
        return self.sim.stats[self.stage.name]

    def granted(self) -> None:
        st = self.st
        st.admitted += 1
        st.running += 1
        st.peak = max(st.peak, st.running)

    def ended(self, grant: Grant) -> None:
        self.st.running -= 1
        self.sim.scheduler.release(grant)


class SimPool(_Driver):
    """Worker claims, as many as there are items (at most `num_workers`); items shared."""

    def start(self) -> None:
        items = len(self.stage.to_run) if self.stage.units is not None else self._upstream_items()
        workers = min(int(getattr(self.stage.spec, "num_workers", 1)), items)
        shape = Resources(cpus=self.stage.settings["cpus_per_worker"])
        self.sim.stats[self.stage.name] = StageStats(
            "pool", workers, unit_label="worker", shape=shape
        )
        self.left = items
        if not workers:
            self.sim.stage_done(self.stage.name)
            return
        self.live = workers
        self.tickets = []
        for i in range(workers):
            ticket = self.sim.scheduler.submit(
                f"{self.stage.name}/worker-{i}", shape, self.stage.spec.priority
            )
            self.sim.ask(ticket, self._work)
            self.tickets.append(ticket)

    def _upstream_items(self) -> int:
        source = self.stage.spec.items.get("from") if hasattr(self.stage.spec, "items") else None
        upstream = self.sim.plan.stages.get(str(source))
        return len(upstream.units or []) if upstream is not None else 0

    def _work(self, grant: Grant) -> None:
        self.granted()
        self._next(grant)

    def _next(self, grant: Grant) -> None:
        if self.left <= 0:
            self._stop_growing()
            self.ended(grant)
            self.live -= 1
            if self.live == 0:
                self.sim.stage_done(self.stage.name)
            return
        self.left -= 1
        self.sim.at(self.sim.clock.now + self.sim.unit_seconds, lambda: self._next(grant))

    def _stop_growing(self) -> None:
        """No items left: workers not started yet are not started (as a real pool does)."""
        for ticket in self.tickets:
            if ticket.grant is None and self.sim.forget(ticket):
                self.live -= 1
        self.tickets = []


class SimClaims(_Driver):
    """Any other stage kind: each claimed unit holds its resources for one unit of time."""

    def start(self) -> None:
        claims = [c for c in self.stage.claims if c.count]
        count = sum(c.count for c in claims)
        shape = claims[0].resources if claims else Resources()
        self.sim.stats[self.stage.name] = StageStats(self.stage.kind, count, shape=shape)
        self.live = count
        if not count:
            self.sim.stage_done(self.stage.name)
        for c in claims:
            for i in range(c.count):
                ticket = self.sim.scheduler.submit(
                    f"{self.stage.name}/{c.label}-{i}", c.resources, self.stage.spec.priority
                )
                self.sim.ask(ticket, self._hold)

    def _hold(self, grant: Grant) -> None:
        self.granted()
        self.sim.at(self.sim.clock.now + self.sim.unit_seconds, lambda: self._end(grant))

    def _end(self, grant: Grant) -> None:
        self.ended(grant)
        self.live -= 1
        if self.live == 0:
            self.sim.stage_done(self.stage.name)


@dataclass(eq=False)
class _SimReplica:
    role: RoleSpec
    index: int
    left: float
    step: float
    grant: Grant | None = None
    began: float = 0.0
    run_event: int = 0
    arrived: bool = False


class SimRoles(_Driver):
    """Role replicas with arrivals, reserved groups, preemption and requeue."""

    def start(self) -> None:
        self.rp: RolesPlan = self.stage.settings["roles"]
        units = self.stage.to_run
        self.sim.stats[self.stage.name] = StageStats("roles", len(units), unit_label="replica")
        if self.rp.quota is not None:
            self.sim.scheduler.set_quota(self.rp.pool, self.rp.quota)
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        self.replicas = [
            self._replica(self.rp.roles[u.payload["role"]], u.payload["replica"]) for u in units
        ]
        self.live = len(self.replicas)
        self.running_roles: set[str] = {
            r for r in self.rp.roles if not any(x.role.name == r for x in self.replicas)
        }
        self.free_reserved: list[Resources] = []
        self.waiting_reserved: list[_SimReplica] = []
        if not self.replicas:
            self.sim.stage_done(self.stage.name)
            return
        top = max(r.priority for r in self.rp.roles.values())
        for i, (shape, _) in enumerate(self.rp.reserved):
            t = self.sim.scheduler.submit(
                f"{self.stage.name}/reserved-{i}", shape, top, pool=self.rp.pool
            )
            self.sim.ask(t, self._reserved_ready)
        now = self.sim.clock.now
        for r in self.replicas:
            if not isinstance(r.role.start_after, str):
                self.sim.at(now + float(r.role.start_after), partial(self._arrive, r))

    def _replica(self, role: RoleSpec, index: int) -> _SimReplica:
        step = role.step_time or float(role.actor.get("step_seconds", 0) or self.sim.unit_seconds)
        total = role.estimated_duration or role.steps * step
        step = min(step, total)
        return _SimReplica(role, index, total, step)

    def _reserved_ready(self, grant: Grant) -> None:
        self.free_reserved.append(grant.resources)
        self._place_reserved()

    def _arrive(self, r: _SimReplica) -> None:
        r.arrived = True
        self._request(r)

    def _request(self, r: _SimReplica) -> None:
        if r.role.pg == "reserved":
            self.waiting_reserved.append(r)
            self._place_reserved()
            return
        elastic = r.index >= r.role.min
        ticket = self.sim.scheduler.submit(
            f"{self.stage.name}/{r.role.name}/{r.index}",
            r.role.resources,
            r.role.priority,
            pool=self.rp.pool,
            labels=r.role.labels,
            policy=None if elastic else self.rp.policy,
            on_preempt=partial(self._preempted, r),
            saves_state=self.saves[r.role.name],
            elastic=elastic,
        )
        self.sim.ask(ticket, partial(self._run, r))

    def _place_reserved(self) -> None:
        for r in list(self.waiting_reserved):
            fits = [s for s in self.free_reserved if r.role.resources.fits_in(s)]
            if fits:
                shape = min(fits, key=lambda s: (s.cpus + 8 * s.gpus, s.memory))
                self.free_reserved.remove(shape)
                self.waiting_reserved.remove(r)
                self._begin(r, None, shape)

    def _run(self, r: _SimReplica, grant: Grant) -> None:
        self._begin(r, grant, grant.resources)

    def _begin(self, r: _SimReplica, grant: Grant | None, shape: Resources) -> None:
        self.granted()
        r.grant, r.began = grant, self.sim.clock.now
        r.run_event += 1
        token = r.run_event
        if r.role.name not in self.running_roles:
            self.running_roles.add(r.role.name)
            for other in self.replicas:
                if other.role.start_after == r.role.name and not other.arrived:
                    self._arrive(other)
        self.sim.at(self.sim.clock.now + r.left, lambda: self._finish(r, token, shape))

    def _finish(self, r: _SimReplica, token: int, shape: Resources) -> None:
        if token != r.run_event:
            return  # this run was preempted
        r.run_event += 1
        self.st.running -= 1
        if r.grant is not None:
            self.sim.scheduler.release(r.grant)
        else:
            self.free_reserved.append(shape)
            self._place_reserved()
        self.live -= 1
        if self.live == 0:
            self._close()

    def _preempted(self, r: _SimReplica, grant: Grant, reason: str) -> None:
        """Told under the scheduler's lock: schedule the stop; a step at most, or the timeout."""
        self.st.preemptions[reason] += 1
        delay = min(r.step, self.rp.policy.cancel_timeout)
        token = r.run_event
        self.sim.at(self.sim.clock.now + delay, lambda: self._stop(r, token))

    def _stop(self, r: _SimReplica, token: int) -> None:
        if token != r.run_event or r.grant is None:
            return
        r.run_event += 1
        ran = self.sim.clock.now - r.began
        if self.saves[r.role.name]:
            r.left = max(r.left - math.floor(ran / r.step + 1e-9) * r.step, r.step)
        self.ended(r.grant)
        r.grant = None
        self.st.requeues += 1
        self._request(r)

    def _close(self) -> None:
        top = self.sim.scheduler
        for g in top.running():
            if g.owner.startswith(f"{self.stage.name}/reserved-"):
                top.release(g)
        self.sim.stage_done(self.stage.name)


# --- running and reporting -----------------------------------------------------------------


def simulate(spec: Spec, planners: Mapping[str, StagePlanner], cluster: Any) -> dict[str, Any]:
    """Plan for the simulated cluster (every unit runs: no ledger) and run it in virtual time."""
    started = time.perf_counter()
    plan = make_plan(spec.pipeline, planners, cluster, None, True)
    needs = {n: list(s.needs) for n, s in spec.pipeline.stages.items()}
    sim = Simulation(plan, needs, spec.cluster.sim_unit_seconds)
    sim.run()
    return summarize(sim, time.perf_counter() - started)


def summarize(sim: Simulation, wall: float) -> dict[str, Any]:
    """The totals a real run's summary carries, for the simulated run."""
    waited = {
        f"{p:g}": {"units": int(n), "mean_s": round(total / n, 3) if n else 0.0}
        for p, (n, total) in sorted(sim.scheduler.metrics.waited_by_priority.items())
    }
    return {
        "pipeline": sim.plan.pipeline,
        "cluster": sim.plan.cluster.where,
        "virtual_s": round(sim._last, 3),
        "wall_s": round(wall, 3),
        "utilization": sim.utilization(),
        "waiting_s_by_priority": waited,
        "stages": {
            name: {
                "kind": st.kind,
                "units": st.units,
                "admitted": st.admitted,
                "peak_at_once": st.peak,
                "unit": st.unit_label,
                "shape": st.shape.describe(),
                "preemptions": {k: st.preemptions[k] for k in REASONS},
                "requeues": st.requeues,
                "finished_at_s": st.finished,
            }
            for name, st in sim.stats.items()
        },
    }


def format_report(summary: dict[str, Any]) -> str:
    """What the simulated run did, in the words of a real run's summary."""
    lines = [f"simulated run of '{summary['pipeline']}' on {summary['cluster']}", ""]
    for name, s in summary["stages"].items():
        pre = ", ".join(f"{k} {v}" for k, v in s["preemptions"].items())
        at_once = f"{s['peak_at_once']} ran at once"
        if s["kind"] == "pool":
            at_once += f" ({s['shape']} each)"
        lines.append(
            f"stage {name} ({s['kind']}): {s['units']} {s['unit']}(s), {s['admitted']} admitted, "
            f"{at_once}; preemptions: {pre}; requeues {s['requeues']}"
        )
    waits = "; ".join(
        f"priority {p}: {w['units']} admitted, mean wait {w['mean_s']:g}s"
        for p, w in summary["waiting_s_by_priority"].items()
    )
    lines.append(f"waiting time by priority: {waits}")
    util = summary["utilization"]
    parts = [f"{k.upper()} {100 * v:.0f}%" for k, v in util.items() if v is not None]
    lines.append(f"utilization: {', '.join(parts)} over {summary['virtual_s']:g} virtual seconds")
    lines.append(f"simulated in {summary['wall_s']:.2f}s")
    return "\n".join(lines)
