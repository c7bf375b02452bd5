"""A roles stage on the simulated cluster, in virtual time: the same replica asks
(`replica_ask`), the same arrivals (`start_after` a time or a role running), the same choice of
reserved group (`pick_reserved`) and the same preemption rules (the scheduler's) as a real run.

What only the simulation decides is time: a replica starts the measured start-up latency
after its grant (an actor in a placement group starting) and runs `steps` × its step time
(measured from replicas of its role that ran unpreempted, else `step_time`, else
`cluster.sim_unit_seconds`; or `estimated_duration`). A victim stops at its next step (or at
`cancel_timeout`), keeps the steps it finished when its actor has `state()`, and queues again;
one preempted before it started stops at once, as in a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

from runner.plan import StagePlan
from runner.resources import Resources
from runner.scheduler.core import Grant
from runner.sim import SimStage, Simulation, StageStats
from runner.stages.roles.host import saves_state
from runner.stages.roles.kind import pick_reserved, replica_ask, reserved_ask
from runner.stages.roles.settings import RoleSpec, RolesPlan


@dataclass(eq=False)
class _Replica:
    role: RoleSpec
    index: int
    # seconds of work left, and of one step
    left: float
    step: float
    grant: Grant | None = None
    group: _Group | None = None
    # when it starts (or started) running on its grant
    began: float = 0.0
    run_event: int = 0
    arrived: bool = False
    attempts: int = 0


@dataclass(eq=False)
class _Group:
    """A reserved placement group, once granted."""

    shape: Resources
    role: str | None
    user: _Replica | None = None


@dataclass
class SimRoles(SimStage):
    """Role replicas with arrivals, reserved groups, preemption and requeue."""

    rp: RolesPlan = field(init=False)
    replicas: list[_Replica] = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)
    waiting_reserved: list[_Replica] = field(default_factory=list)
    running_roles: set[str] = field(default_factory=set)
    saves: dict[str, bool] = field(default_factory=dict)
    live: int = 0

    def start(self) -> None:
        self.rp = self.stage.settings["roles"]
        units = self.stage.to_run
        self.sim.stats[self.stage.name] = StageStats("roles", len(units), unit_label="replica")
        if self.rp.quota is not None:
            self.sim.scheduler.set_quota(self.rp.pool, self.rp.quota)
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        steps = self._measured_steps()
        self.replicas = [
            self._replica(self.rp.roles[u.payload["role"]], u.payload["replica"], steps)
            for u in units
        ]
        self.live = len(self.replicas)
        self.running_roles = {
            r for r in self.rp.roles if not any(x.role.name == r for x in self.replicas)
        }
        if not self.replicas:
            self.sim.stage_done(self.stage.name)
            return
        for i, spec in enumerate(self.rp.reserved):
            ask = reserved_ask(self.rp, spec.shape)
            group = _Group(spec.shape, spec.role)
            self.sim.submit(f"{self.stage.name}/reserved-{i}", ask, partial(self._ready, group))
        now = self.sim.clock.now
        for r in self.replicas:
            if not isinstance(r.role.start_after, str):
                self.sim.at(now + float(r.role.start_after), partial(self._arrive, r))

    def _measured_steps(self) -> dict[str, float]:
        """Seconds per step by role, from replicas of a measured run that ran unpreempted."""
        m = self.sim.measure_of(self.stage.name)
        if m is None:
            return {}
        per_role: dict[str, list[float]] = {}
        for unit, seconds in m.durations.items():
            role = self.rp.roles.get(unit.rsplit("/", 1)[0])  # replica ids: ROLE/INDEX
            if role is not None and role.steps and m.attempts.get(unit) == 1:
                per_role.setdefault(role.name, []).append(seconds / role.steps)
        return {r: sum(v) / len(v) for r, v in per_role.items()}

    def _replica(self, role: RoleSpec, index: int, measured: dict[str, float]) -> _Replica:
        declared = role.step_time or float(role.actor.get("step_seconds", 0) or 0) or None
        step = measured.get(role.name) or declared or self.sim.unit_seconds
        total = role.estimated_duration or role.steps * step
        return _Replica(role, index, total, min(step, total))

    def _ready(self, group: _Group, grant: Grant) -> None:
        self.groups.append(group)
        self._place_reserved()

    def _arrive(self, r: _Replica) -> None:
        r.arrived = True
        self._request(r)

    def _request(self, r: _Replica) -> None:
        if r.role.pg == "reserved":
            self.waiting_reserved.append(r)
            self._place_reserved()
            return
        ask = replica_ask(self.rp, r.role, r.index, self.saves[r.role.name])
        owner = f"{self.stage.name}/{r.role.name}/{r.index}"
        self.sim.submit(owner, ask, partial(self._begin, r), on_preempt=partial(self._preempted, r))

    def _place_reserved(self) -> None:
        for r in list(self.waiting_reserved):
            group = pick_reserved([g for g in self.groups if g.user is None], r.role)
            if group is not None:
                group.user = r
                self.waiting_reserved.remove(r)
                r.group = group
                self._begin(r, None)

    def _begin(self, r: _Replica, grant: Grant | None) -> None:
        self.granted()
        sim = self.sim
        latency = sim.latency(self.stage.name, f"{r.role.name}/{r.index}", r.attempts)
        r.attempts += 1
        r.grant, r.began = grant, sim.clock.now + latency
        sim.starts(self.stage.name, f"{r.role.name}/{r.index}", r.began)
        r.run_event += 1
        token = r.run_event
        sim.at(r.began, partial(self._running, r, token))
        sim.at(r.began + r.left, partial(self._finish, r, token))

    def _running(self, r: _Replica, token: int) -> None:
        """It really runs: roles that start after it arrive."""
        if token != r.run_event or r.role.name in self.running_roles:
            return
        self.running_roles.add(r.role.name)
        for other in self.replicas:
            if other.role.start_after == r.role.name and not other.arrived:
                self._arrive(other)

    def _finish(self, r: _Replica, token: int) -> None:
        if token != r.run_event:
            return  # this run was preempted
        r.run_event += 1
        self.sim.ran(r.began, self.sim.clock.now)
        self.st.running -= 1
        if r.grant is not None:
            self.sim.scheduler.release(r.grant)
        elif r.group is not None:
            r.group.user, r.group = None, None
            self._place_reserved()
        self.live -= 1
        if self.live == 0:
            self._close()

    def _preempted(self, r: _Replica, grant: Grant, reason: str) -> None:
        """Told under the scheduler's lock: schedule the stop (at once when it has not started
        yet; else at its next step, or at the timeout)."""
        self.st.preemptions[reason] += 1
        now = self.sim.clock.now
        delay = 0.0 if now < r.began else min(r.step, self.rp.policy.cancel_timeout)
        self.sim.at(now + delay, partial(self._stop, r, r.run_event))

    def _stop(self, r: _Replica, token: int) -> None:
        if token != r.run_event or r.grant is None:
            return
        r.run_event += 1
        now = self.sim.clock.now
        ran = max(0.0, now - r.began)
        if ran > 0:
            self.sim.ran(r.began, now)
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


def simulate(stage: StagePlan, sim: Simulation) -> SimRoles:
    return SimRoles(sim, stage)
