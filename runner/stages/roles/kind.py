"""How a roles stage runs under the executor: a lease per replica (preemptible by policy), a
`RoleHost` actor on it, reserved placement groups kept for their roles.

A replica arrives (at `start_after`), asks for its lease (or takes a free reserved group),
starts its actor in a placement group pinned to the granted node, and runs; a victim is asked
to stop (`ctx.cancelled`), given `cancel_timeout`, its `state()` kept, killed, and queued
again by the executor, to be restored when admitted next. The stage's event log goes to the
ledger as it happens (`events.jsonl`, every attempt's, is written from there with the run's
pictures); its waiting time by priority and placement groups are summed up here, its
preemptions and requeues counted from the run's recorded events (`history`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from runner import saved_state
from runner.executor import Executor, Lease, StageRun, Work
from runner.kind import RunContext, StageOutcome
from runner.lifecycle import UnitState
from runner.placement import Placement
from runner.plan import StagePlan
from runner.remote import remote
from runner.resources import Resources
from runner.scheduler.pgpool import PGPool, remove
from runner.scheduler.policy import Party, preemption_reason
from runner.scheduler.request import Request
from runner.stages.roles.host import RoleHost, saves_state
from runner.stages.roles.settings import Reserved, RoleSpec, RolesPlan

log = logging.getLogger(__name__)

# seconds to wait for a stubborn victim's state() before it is killed anyway
STATE_TIMEOUT = 2.0
EVENTS = "events.jsonl"


@dataclass(eq=False)
class ReservedGroup:
    """A reserved placement group: granted and created when the stage starts, kept for the
    replicas it serves (`Reserved.serves`)."""

    spec: Reserved
    lease: Lease
    pg: Any = None
    ready: bool = False
    # the replica running in it
    user: Work | None = None

    @property
    def shape(self) -> Resources:
        return self.spec.shape

    @property
    def role(self) -> str | None:
        return self.spec.role


@dataclass
class _Stats:
    waited: dict[float, list[float]] = field(default_factory=dict)


class RolesRun(StageRun):
    """Replicas of roles with priorities, placement groups and preemption."""

    noun = "replica"

    def __init__(self, stage: StagePlan, ctx: RunContext, ex: Executor) -> None:
        super().__init__(stage, ctx, ex)
        self.rp: RolesPlan = stage.settings["roles"]
        self.grace = self.rp.policy.cancel_timeout
        self.pgs = PGPool(stage.name, ctx.scheduler, self.rp.max_dynamic_pgs, self.rp.reuse)
        self.t0 = time.monotonic()
        self.arrived: set[Work] = set()
        self.queue.clear()  # a replica is queued when its role arrives
        self.reserved: list[ReservedGroup] = []
        # reserved groups asked for so far (a preempted replica's group is made again)
        self.reserved_made = 0
        self.saved: dict[Lease, Any] = {}
        # victims past their cancel_timeout asked for their state, and until when to wait
        self.asking: dict[Lease, tuple[Any, float]] = {}
        self.asked_at: dict[Work, float] = {}
        # replicas holding or waiting for a dynamic group (at most `max_dynamic_pgs`), and
        # those granted but waiting for a group to come free
        self.dynamic: set[Work] = set()
        self.group_waiters: list[Lease] = []
        self.events: list[dict[str, Any]] = []
        self.stats = _Stats()
        mine = {w.unit.payload["role"] for w in self.works}
        self.running_roles = {r for r in self.rp.roles if r not in mine}
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        if self.rp.quota is not None:
            ctx.scheduler.set_quota(self.rp.pool, self.rp.quota)
        self._restore_from_ledger()

    def _restore_from_ledger(self) -> None:
        """Replicas preempted in an earlier run of this directory start from the state they
        saved then (a runner restart loses no work); `run.fresh` starts every one anew."""
        if self.ex.fresh:
            return
        states = saved_state.from_ledger(self.ctx.ledger, self.name, (w.unit for w in self.works))
        for work in self.works:
            if work.id in states:
                work.saved = states[work.id]
                work.result = {saved_state.KEY: work.saved}  # still on disk until it is done
                log.info("%s: %s resumes from the state it saved last time", self.name, work.id)

    def role(self, work: Work) -> RoleSpec:
        return self.rp.roles[work.unit.payload["role"]]

    def index(self, work: Work) -> int:
        return int(work.unit.payload["replica"])

    # reserved groups: leases of the stage itself, asked for first, never preempted

    def prepare(self) -> None:
        for spec in self.rp.reserved:
            if self._wanted(spec):
                self._reserve(spec)

    def _reserve(self, spec: Reserved) -> None:
        lease = self.ex.submit(Lease(self, reserved_ask(self.rp, spec.shape), tag="reserved"))
        lease.start_bound = self.rp.pg_creation_timeout
        self.reserved.append(ReservedGroup(spec, lease))
        self.reserved_made += 1

    def _wanted(self, spec: Reserved) -> bool:
        """Whether any replica still to finish could run in a group of `spec`."""
        return any(not w.state.final and spec.serves(self.role(w)) for w in self.works)

    def _let_go(self, group: ReservedGroup) -> None:
        """A reserved group goes back to the pool: its placement group removed, its grant
        released (or its ask withdrawn, when it was not granted yet)."""
        if group.lease.grant is None:
            self.ex.withdraw(group.lease)
            self.lease_ended(group.lease)
        else:
            self.ex.end_lease(group.lease)
        self.reserved.remove(group)

    def _release_idle(self) -> None:
        """Reserved groups that no replica still to run could use are released to the pool:
        a later role that needs what they hold is not kept waiting to the stage's end."""
        for group in list(self.reserved):
            if group.user is None and not self._wanted(group.spec):
                log.info(
                    "%s: reserved group %s for %s released: no replica left to use it",
                    self.name,
                    group.shape.describe(),
                    group.spec.describe(),
                )
                self._let_go(group)

    def ended(self, work: Work) -> None:
        super().ended(work)
        self._release_idle()

    def _reserved_of(self, lease: Lease) -> ReservedGroup | None:
        return next((g for g in self.reserved if g.lease is lease), None)

    def _take_reserved(self, work: Work) -> ReservedGroup | None:
        """A free, ready reserved group that serves the replica (`pick_reserved`)."""
        role = self.role(work)
        free = [g for g in self.reserved if g.ready and g.user is None and g.spec.serves(role)]
        return pick_reserved(free, role)

    # arrivals and asks

    def _has_arrived(self, role: RoleSpec) -> bool:
        after = role.start_after
        if isinstance(after, str):
            return after in self.running_roles
        return time.monotonic() - self.t0 >= float(after)

    def asks(self) -> Iterator[Lease]:
        for work in self.works:
            if work not in self.arrived and self._has_arrived(self.role(work)):
                self.arrived.add(work)
                self.queue.append(work)
                self._event(work, "arrived")
        # highest priority first: the first to take a free group, or a dynamic group's turn
        for work in sorted(self.queue, key=lambda w: -self.role(w).priority):
            if work.state.final:
                self.queue.remove(work)
                continue
            role = self.role(work)
            self.asked_at.setdefault(work, time.monotonic())
            group = self._take_reserved(work)
            if group is not None:
                self.queue.remove(work)
                self._start_in(group, work)
            elif role.pg == "dynamic" and self._dynamic_turn(work):
                self.queue.remove(work)
                self.dynamic.add(work)
                reuse = self.pgs.tag if self.rp.reuse and self.rp.dynamic_cap else None
                ask = replica_ask(self.rp, role, self.index(work), self.saves[role.name], reuse)
                yield Lease(self, ask, work)

    def _dynamic_turn(self, work: Work) -> bool:
        """Whether a replica of a dynamic role may ask now: while fewer than
        `max_dynamic_pgs` replicas hold or wait for a dynamic group, or when it may preempt
        one of them (its victim's group is then its own; an elastic replica preempts nobody)."""
        cap = self.rp.dynamic_cap
        if cap is None or len(self.dynamic) < cap:
            return True
        role = self.role(work)
        if self.index(work) >= role.min:
            return False
        me = Party(role.priority, self.rp.pool, role.labels)
        return any(
            preemption_reason(me, self._party(other), self.rp.policy) is not None
            for other in self.dynamic
        )

    def _party(self, work: Work) -> Party:
        role = self.role(work)
        return Party(role.priority, self.rp.pool, role.labels)

    def _start_in(self, group: ReservedGroup, work: Work) -> None:
        """The replica runs in a free reserved group, on a grant of its own over the group's
        resources: preemptible by the normal rules like a replica on a dynamic group."""
        group.user = work
        role = self.role(work)
        ask = replica_ask(self.rp, role, self.index(work), self.saves[role.name])
        lease = Lease(self, dataclasses.replace(ask, resources=group.shape), work, tag=group)
        assert group.lease.grant is not None
        self.ex.lend(lease, group.lease.grant, group.pg)

    def requeue(self, work: Work) -> None:
        self.queue.append(work)

    # launching

    def launch(self, lease: Lease) -> None:
        assert lease.placement is not None
        lease.start_bound = self.rp.pg_creation_timeout
        lease.deadline = time.monotonic() + lease.start_bound
        if lease.tag == "reserved":
            group = self._reserved_of(lease)
            assert group is not None
            group.pg = lease.placement.new_group()
            lease.watch(group.pg.ready(), "group ready")
            return
        if lease.placement.group is None and self.rp.dynamic_cap is not None:
            self.pgs.sweep()  # groups reclaimed for this grant go first: Ray frees what they held
            if not self._in_group(lease):
                self.group_waiters.append(lease)
                self._event(
                    lease.work[0],
                    "waiting for a placement group",
                    max_dynamic_pgs=self.rp.max_dynamic_pgs,
                )
            return
        self._start_actor(lease, lease.placement)

    def _in_group(self, lease: Lease) -> bool:
        """Start the replica in a dynamic group (one it took over, an idle one, or a new
        one); False when `max_dynamic_pgs` groups are in use and none is idle."""
        assert lease.grant is not None and lease.placement is not None
        found = self.pgs.group_for(lease.grant, lease.placement.new_group)
        if found is None:
            return False
        self._event(lease.work[0], "placement group", reused=found[1])
        self._start_actor(lease, dataclasses.replace(lease.placement, group=found[0]))
        return True

    def _start_actor(self, lease: Lease, placement: Placement) -> None:
        work = lease.work[0]
        role = self.role(work)
        waited = time.monotonic() - self.asked_at.pop(work, time.monotonic())
        self.stats.waited.setdefault(role.priority, []).append(waited)
        options = placement.options(max_concurrency=2, max_restarts=0, **self._ray_options(work))
        lease.actor = (
            remote(RoleHost)
            .options(**options)
            .remote(role.actor, role.name, self.index(work), role.steps)
        )
        self.ex.watch(lease, lease.actor.ready.remote(), "ready")
        self._event(work, "admitted", waited=round(waited, 3))

    def _ray_options(self, work: Work) -> dict[str, Any]:
        """The role's own actor options; a `name` told apart by replica (when there are
        several) and by attempt (the last one's actor may still be going)."""
        role = self.role(work)
        options = dict(role.ray_options)
        if "name" in options:
            name = str(options["name"])
            if role.max > 1:
                name += f"-{self.index(work)}"
            if work.attempts:
                name += f"-attempt{work.attempts + 1}"
            options["name"] = name
        return options

    def tick(self) -> None:
        self.pgs.sweep()
        # replicas waiting for a dynamic group, highest priority first, as groups come free
        for lease in sorted(self.group_waiters, key=lambda x: -x.request.priority):
            if lease.closed or lease.stopping is not None:
                continue
            if not self._in_group(lease):
                break
            self.group_waiters.remove(lease)

    def lease_ended(self, lease: Lease) -> None:
        super().lease_ended(lease)
        if lease in self.group_waiters:
            self.group_waiters.remove(lease)
        if lease.tag is None:  # a dynamic replica's lease
            self.dynamic.difference_update(lease.work)

    def on_start(self, lease: Lease) -> None:
        work = lease.work[0]
        self.running_roles.add(self.role(work).name)
        self._event(work, "running", restored=work.saved is not None)
        self.ex.watch(lease, lease.actor.run.remote(work.saved), "run")

    # replies

    def on_reply(self, lease: Lease, tag: Any, value: Any) -> None:
        if tag == "group ready":
            group = self._reserved_of(lease)
            assert group is not None
            group.ready, lease.deadline = True, None
            return
        reply: dict[str, Any] = value
        work = lease.work[0]
        if lease.stopping is not None or reply["cancelled"]:
            self.saved[lease] = reply["state"]
            lease.stopping = lease.stopping or "preempted: cancelled"
            self.ex.stopped(lease)
            return
        result = (
            reply["result"] if isinstance(reply["result"], dict) else {"value": reply["result"]}
        )
        preemptions = sum(
            1 for e in self.events if e["unit"] == work.id and e["event"] == "preempt requested"
        )
        self._event(work, "done")
        self.ex.end_lease(lease, kill=True)
        self.ex.finish(work, UnitState.done, {**result, "preemptions": preemptions})

    def on_preempt(self, lease: Lease, reason: str) -> None:
        for work in lease.work:
            self._event(work, "preempt requested", reason=reason)

    def stop(self, lease: Lease) -> None:
        if lease.actor is not None and lease.started is not None:
            lease.actor.cancel.remote()

    def saved_state(self, lease: Lease) -> Any:
        """What the replica's `state()` says: from its reply when it stopped in time, else
        asked once more (bounded) before it is killed."""
        import ray

        in_time = lease in self.saved
        state = self.saved.pop(lease, None)
        if not in_time and lease.actor is not None and lease.started is not None:
            self._ask_states(lease)
            ref, until = self.asking.pop(lease)
            try:
                state = ray.get(ref, timeout=max(0.0, until - time.monotonic()))
            except Exception as exc:  # stuck or dead: killed with what was saved before
                log.debug("state(): %s", exc)
        what = "stopped" if in_time else "killed after cancel_timeout"
        for work in lease.work:
            self._event(work, what, saved=state is not None)
        return state

    def _ask_states(self, lease: Lease) -> None:
        """Ask `lease` and every other victim past its cancel_timeout for its state at once,
        so stubborn victims cost one STATE_TIMEOUT together, not one each in turn."""
        now = time.monotonic()
        late = [
            x
            for x in self.leases
            if x.stopping is not None
            and x.deadline is not None
            and x.deadline <= now
            and x not in self.saved
            and x.actor is not None
            and x.started is not None
        ]
        for victim in [lease, *late]:
            if victim not in self.asking:
                self.asking[victim] = (victim.actor.state.remote(), now + STATE_TIMEOUT)

    def release(self, lease: Lease) -> None:
        self.asking.pop(lease, None)
        group = lease.tag if isinstance(lease.tag, ReservedGroup) else None
        if group is not None:
            if lease.grant is not None:
                self.ctx.scheduler.release(lease.grant)
            group.user = None
            if lease.stopping is not None and lease.stopping.startswith("preempted"):
                # what the victim held is its preemptor's: the group goes back to the pool,
                # and a new one is reserved for the role while it has replicas to run
                self._let_go(group)
                if self._wanted(group.spec):
                    self._reserve(group.spec)
        elif lease.tag == "reserved":
            reserved = self._reserved_of(lease)
            if reserved is not None and reserved.pg is not None:
                remove(reserved.pg)
            if lease.grant is not None:
                self.ctx.scheduler.release(lease.grant)
        elif lease.grant is not None:
            self.pgs.give_back(lease.grant)

    def close(self) -> None:
        self.pgs.close()

    # the end

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        s = self.stats
        # preemptions and requeues are counted from the run's recorded events (`history`)
        outcome.extra = {
            "waiting_s_by_priority": {
                f"{p:g}": {
                    "units": len(w),
                    "mean_s": round(sum(w) / len(w), 3),
                    "max_s": round(max(w), 3),
                }
                for p, w in sorted(s.waited.items())
            },
            "placement_groups": {
                "created": self.pgs.created + self.reserved_made,
                "reused": self.pgs.reused,
            },
            "pg_pool_stats": {self.rp.pool: self._pg_pool_stats()},
        }
        # the event log of every attempt, written from the ledger with the run's pictures
        outcome.outputs.append(str(self.ctx.stage_dir(self.name) / EVENTS))
        problem = self.failure_budget()
        if problem:
            outcome.ok, outcome.message = False, problem
        return outcome

    def _pg_pool_stats(self) -> dict[str, int]:
        """ScheduleMesh's `scheduler.pg_pool_stats()` for the stage's pool: groups made and
        reused, in use now, and the high-priority (reserved) ones made."""
        dynamic = self.pgs.stats()
        in_use = sum(1 for g in self.reserved if g.user is not None)
        return {
            "created": dynamic["created"] + self.reserved_made,
            "reused": dynamic["reused"],
            "in_use": dynamic["in_use"] + in_use,
            "peak_dynamic_in_use": dynamic["peak_in_use"],
            "high_priority": self.reserved_made,
        }

    def _event(self, work: Work, what: str, **details: Any) -> None:
        record = {
            "t": round(time.time(), 4),
            "unit": work.id,
            "role": work.unit.payload["role"],
            "event": what,
            **details,
        }
        self.events.append(record)
        self.ctx.ledger.add_log(self.name, record)  # kept across attempts: `events.jsonl`


def replica_ask(
    rp: RolesPlan,
    role: RoleSpec,
    index: int,
    saves: bool,
    reuse: str | None = None,
) -> Request:
    """A replica's lease: its role's resources, priority and labels in the stage's pool;
    preemptible; replicas beyond the role's `min` are elastic and preempt nobody. The
    simulated cluster asks the same."""
    elastic = index >= role.min
    return Request(
        role.resources,
        role.priority,
        pool=rp.pool,
        labels=role.labels,
        policy=None if elastic else rp.policy,
        preemptible=True,
        saves_state=saves,
        elastic=elastic,
        reuse=reuse,
        estimated=role.estimated_duration,
    )


def reserved_ask(rp: RolesPlan, shape: Resources) -> Request:
    """A reserved group's lease, asked for when the stage starts: at the top role priority,
    in the stage's pool, never preempted. The simulated cluster asks the same."""
    return Request(shape, max(r.priority for r in rp.roles.values()), pool=rp.pool)


class _Reserved(Protocol):
    @property
    def shape(self) -> Resources: ...

    @property
    def role(self) -> str | None: ...


_G = TypeVar("_G", bound=_Reserved)


def pick_reserved(free: list[_G], role: RoleSpec) -> _G | None:
    """Which free reserved group a replica takes: its role's own, else one kept for no role;
    the smallest that holds it. The simulated cluster picks the same."""
    fits = [g for g in free if role.resources.fits_in(g.shape)]
    mine = [g for g in fits if g.role == role.name] or [g for g in fits if g.role is None]
    if not mine:
        return None
    return min(mine, key=lambda g: (g.shape.cpus + 8 * g.shape.gpus, g.shape.memory))


def open_run(stage: StagePlan, ctx: RunContext, ex: Executor) -> RolesRun:
    return RolesRun(stage, ctx, ex)
