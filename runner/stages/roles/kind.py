"""How a roles stage runs in the unit loop: a lease per replica (preemptible by policy), a
`RoleHost` actor on it, reserved placement groups kept for the replicas they serve.

A replica arrives (at `start_after`), asks for its lease (or takes a free reserved group, lent
to it as a grant of its own), starts its actor in a placement group pinned to the granted
node, and runs; a victim is asked to stop (`ctx.cancelled`), given `cancel_timeout`, asked for
its `state()` once more when it did not stop, killed, and queued again by the loop, to be
restored when admitted next. The stage's event log (`events.jsonl`) and its summary
(preemptions by reason, requeues, waiting by priority, `pg_pool_stats`) are written from here.
In virtual time (`cluster=sim`) a replica's run takes its steps' time and stops at its next
step when asked (at once when its actor class `drops_step`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from runner import saved_state
from runner.calls import NEW_GROUP, Call, Expect, Remote
from runner.kind import RunContext, StageOutcome, StageRun, Verdicts
from runner.lease import Ask, Lease, Work
from runner.plan import StagePlan
from runner.resources import Resources
from runner.scheduler.policy import Party, preemption_reason
from runner.scheduler.request import Request
from runner.stages.roles.groups import DynamicGroups
from runner.stages.roles.host import RoleHost, drops_step, saves_state
from runner.stages.roles.planning import replica_of
from runner.stages.roles.settings import Reserved, RoleSpec, RolesPlan
from runner.verdicts import (
    Done,
    End,
    Launch,
    Lend,
    RemoveGroup,
    Send,
    SetQuota,
    Stopped,
    Verdict,
    Withdraw,
)

log = logging.getLogger(__name__)

# seconds to wait for a stubborn victim's state() before it is killed anyway
STATE_TIMEOUT = 2.0
# every replica's actor: two threads (`cancel()` and `state()` reach it while `run` works),
# never restarted by Ray (a dead replica is the runner's to start again, with its state)
HOST_OPTIONS: dict[str, object] = {"max_concurrency": 2, "max_restarts": 0}
EVENTS = "events.jsonl"


@dataclass(eq=False)
class ReservedGroup:
    """A reserved placement group: granted and created when the stage starts, kept for the
    replicas it serves (`Reserved.serves`)."""

    spec: Reserved
    ask: Ask
    lease: Lease | None = None
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

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        super().__init__(stage, ctx)
        assert isinstance(stage.settings, RolesPlan)
        self.rp: RolesPlan = stage.settings
        self.grace = self.rp.policy.cancel_timeout
        self.groups = DynamicGroups(stage.name, self.rp.max_dynamic_pgs, self.rp.reuse)
        self.t0 = ctx.clock()
        self.queue.clear()  # a replica is queued when its role arrives
        # each replica's role and index, read from its unit once: they are asked for several
        # times per admission (100,000s of replicas at scale)
        self._replica: dict[Work, tuple[RoleSpec, int]] = {}
        for work in self.works:
            name, index = replica_of(work.unit)
            self._replica[work] = (self.rp.roles[name], index)
        # the order replicas ask in: highest priority first (a sort key, read per queued
        # replica at each turn)
        self._rank = {work: -role.priority for work, (role, _) in self._replica.items()}
        # replicas not arrived yet, by role; roles running (or with nothing to run)
        self.coming: dict[str, list[Work]] = defaultdict(list)
        for work in self.works:
            self.coming[self.role(work).name].append(work)
        self.running_roles = {r for r in self.rp.roles if r not in self.coming}
        # replicas not final yet, by role (which reserved groups are still wanted)
        self.unfinished_of: Counter[str] = Counter(self.role(w).name for w in self.works)
        self.reserved: list[ReservedGroup] = []
        self.to_reserve: deque[Reserved] = deque()
        # reserved groups asked for so far (a preempted replica's group is made again)
        self.reserved_made = 0
        # what a stopping victim's state() said (its stop reply, or its last call)
        self.saved: dict[Lease, object] = {}
        self.asked_at: dict[Work, float] = {}
        # replicas holding or waiting for a dynamic group (at most `max_dynamic_pgs`), and
        # those granted but waiting for a group to come free
        self.dynamic: set[Work] = set()
        self.group_waiters: list[Lease] = []
        self.events: list[dict[str, Any]] = []
        # times each replica was asked to stop as a victim (its result says so): counted, not
        # looked up in `events` at each end (a walk over every event per replica)
        self.preempt_asks: Counter[Work] = Counter()
        self.stats = _Stats()
        targets = {r.name: r.actor.get("_target_", "") for r in self.rp.roles.values()}
        self.saves = {name: saves_state(target) for name, target in targets.items()}
        self.drops = {name: drops_step(target) for name, target in targets.items()}
        # replicas' requests by (role, elastic, reuse tag): a request is a value that tickets
        # share, so a role's replicas ask with one rather than one each per ask
        self._requests: dict[tuple[str, bool, str | None], Request] = {}
        # a role's actor options, when alike for all its replicas (`_actor_options`)
        self._options: dict[str, dict[str, object]] = {}
        # a fresh replica's run in virtual time, by role (`_expect`)
        self._fresh_runs: dict[str, Expect] = {}
        self.step_seconds = self._step_seconds()
        self._restore_from_ledger()

    def _restore_from_ledger(self) -> None:
        """Replicas preempted in an earlier run of this directory start from the state they
        saved then (a runner restart loses no work); `run.fresh` starts every one anew."""
        if self.ctx.fresh or self.ctx.virtual:
            return
        states = saved_state.from_ledger(self.ctx.ledger, self.name, (w.unit for w in self.works))
        for work in self.works:
            if work.id in states:
                work.saved = states[work.id]
                work.result = {saved_state.KEY: work.saved}  # still on disk until it is done
                log.info("%s: %s resumes from the state it saved last time", self.name, work.id)

    def role(self, work: Work) -> RoleSpec:
        return self._replica[work][0]

    def index(self, work: Work) -> int:
        return self._replica[work][1]

    # --- reserved groups: leases of the stage itself, asked for first --------------------

    def prepare(self) -> Verdicts:
        if self.rp.quota is not None:
            yield SetQuota(self.rp.pool, self.rp.quota)
        self.to_reserve.extend(spec for spec in self.rp.reserved if self._wanted(spec))

    def _wanted(self, spec: Reserved) -> bool:
        """Whether any replica still to finish could run in a group of `spec`."""
        return any(n and spec.serves(self.rp.roles[r]) for r, n in self.unfinished_of.items())

    def _let_go(self, group: ReservedGroup) -> Verdicts:
        """A reserved group goes back to the pool: its placement group removed, its grant
        released (or its ask withdrawn, when it was not granted yet)."""
        self.reserved.remove(group)
        if group.lease is None:
            yield Withdraw(group.ask)
        else:
            yield End(group.lease)

    def _release_idle(self) -> Verdicts:
        """Reserved groups that no replica still to run could use are released to the pool:
        a later role that needs what they hold is not kept waiting to the stage's end."""
        idle = [g for g in self.reserved if g.user is None and not self._wanted(g.spec)]
        released = Counter((g.shape.describe(), g.spec.describe()) for g in idle)
        for (shape, spec), n in released.items():  # one line for alike groups (many at scale)
            groups = f"reserved group {shape}" if n == 1 else f"{n} reserved groups ({shape} each)"
            left = "no replica left to use " + ("it" if n == 1 else "them")
            log.info("%s: %s for %s released: %s", self.name, groups, spec, left)
        for group in idle:
            yield from self._let_go(group)

    def ended(self, work: Work) -> None:
        super().ended(work)
        self.unfinished_of[self.role(work).name] -= 1

    def _take_reserved(self, work: Work, free: list[ReservedGroup]) -> ReservedGroup | None:
        """Which of the `free` (ready, unused) reserved groups serves the replica
        (`pick_reserved`)."""
        role = self.role(work)
        return pick_reserved([g for g in free if g.spec.serves(role)], role)

    # --- arrivals and asks -----------------------------------------------------------------

    def _arrive(self) -> None:
        """Roles whose time has come, or whose role to wait for runs, queue their replicas."""
        now = self.ctx.clock()
        for name in list(self.coming):
            after = self.rp.roles[name].start_after
            came = after in self.running_roles if isinstance(after, str) else now - self.t0 >= after
            if came:
                for work in self.coming.pop(name):
                    self.queue.append(work)
                    self._event(work, "arrived")

    def due(self) -> float | None:
        """The next role that arrives at a time of its own."""
        times = [
            self.t0 + float(after)
            for name in self.coming
            if not isinstance(after := self.rp.roles[name].start_after, str)
        ]
        return min(times, default=None)

    def asks(self) -> Iterator[Ask | Lend]:
        while self.to_reserve:
            spec = self.to_reserve.popleft()
            ask = Ask(reserved_request(self.rp, spec.shape))
            ask.tag = group = ReservedGroup(spec, ask)
            self.reserved.append(group)
            self.reserved_made += 1
            yield ask
        self._arrive()
        if not self.queue:
            return
        # the reserved groups free now (looked for once, not per queued replica: tens of
        # thousands queue at once at scale), each taken by at most one replica of this turn
        free = [g for g in self.reserved if g.ready and g.user is None]
        # highest priority first: the first to take a free group, or a dynamic group's turn
        for work in sorted(self.queue, key=self._rank.__getitem__):
            if work.state.final:
                self.queue.remove(work)
                continue
            role = self.role(work)
            self.asked_at.setdefault(work, self.ctx.clock())
            taken = self._take_reserved(work, free) if free else None
            if taken is not None:
                free.remove(taken)
                self.queue.remove(work)
                yield self._lend(taken, work)
            elif role.pg == "dynamic" and self._dynamic_turn(work):
                self.queue.remove(work)
                self.dynamic.add(work)
                reuse = self.groups.tag if self.rp.reuse and self.rp.dynamic_cap else None
                yield Ask(self._request(work, reuse), work)

    def _request(self, work: Work, reuse: str | None = None) -> Request:
        """The replica's request (`replica_request`), one per role, elasticity and tag."""
        role, index = self._replica[work]
        key = (role.name, index >= role.min, reuse)
        request = self._requests.get(key)
        if request is None:
            request = replica_request(self.rp, role, index, self.saves[role.name], reuse)
            self._requests[key] = request
        return request

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

    def _lend(self, group: ReservedGroup, work: Work) -> Lend:
        """The replica runs in a free reserved group, on a grant of its own over the group's
        resources: preemptible by the normal rules like a replica on a dynamic group."""
        group.user = work
        request = self._request(work)
        ask = Ask(dataclasses.replace(request, resources=group.shape), work, group)
        assert group.lease is not None
        return Lend(ask, group.lease)

    def requeue(self, work: Work) -> None:
        self.queue.append(work)

    # --- launching -------------------------------------------------------------------------

    def launch(self, lease: Lease) -> Verdicts:
        lease.start_bound = self.rp.pg_creation_timeout
        lease.deadline = self.ctx.clock() + lease.start_bound
        tag = lease.ask.tag
        if isinstance(tag, ReservedGroup) and lease.ask.work is None:  # a reserved group
            tag.lease = lease
            yield Launch(lease, Remote(None, group=NEW_GROUP))
            return
        if lease.group is None and self.rp.dynamic_cap is not None:
            yield from self.groups.sweep()  # reclaimed groups first: Ray frees what they held
            assert lease.grant is not None
            group, first = self.groups.group_for(lease.grant)
            if group is None:  # max_dynamic_pgs groups in use, none idle: it waits for one
                self.group_waiters.append(lease)
                self._event(
                    lease.work[0],
                    "waiting for a placement group",
                    max_dynamic_pgs=self.rp.max_dynamic_pgs,
                )
                return
            yield from self._in_group(lease, group, first)
            return
        yield self._start_actor(lease, lease.group)

    def _in_group(self, lease: Lease, group: object, first: list[Verdict]) -> Verdicts:
        """Start the replica in its dynamic group: one it took over, or a new one (after what
        must happen first: an idle group removed to stay within `max_dynamic_pgs`)."""
        yield from first
        self._event(lease.work[0], "placement group", reused=group is not NEW_GROUP)
        yield self._start_actor(lease, group)
        if group is NEW_GROUP:  # the backend made it as the actor was launched
            self.groups.made(lease)

    def _start_actor(self, lease: Lease, group: object) -> Launch:
        """The replica's actor, admitted now (how long it waited is counted and logged)."""
        work = lease.work[0]
        role = self.role(work)
        waited = self.ctx.clock() - self.asked_at.pop(work, self.ctx.clock())
        self.stats.waited.setdefault(role.priority, []).append(waited)
        options = self._actor_options(work)
        args = (role.actor, role.name, self.index(work), role.steps)
        self._event(work, "admitted", waited=round(waited, 3))
        return Launch(lease, Remote(RoleHost, args, actor=True, options=options, group=group))

    def _actor_options(self, work: Work) -> dict[str, object]:
        """The replica's actor options: alike for every replica of a role without a `name`
        (made once per role, 100,000s of replicas at scale), else its own (`_ray_options`)."""
        role = self.role(work)
        if "name" in role.ray_options:
            return {**HOST_OPTIONS, **self._ray_options(work)}
        options = self._options.get(role.name)
        if options is None:
            options = self._options[role.name] = {**HOST_OPTIONS, **role.ray_options}
        return options

    def _ray_options(self, work: Work) -> dict[str, object]:
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

    def tick(self) -> Verdicts:
        yield from self.groups.sweep()
        yield from self._release_idle()
        # replicas waiting for a dynamic group, highest priority first, as groups come free
        for lease in sorted(self.group_waiters, key=lambda x: -x.ask.request.priority):
            if lease.closed or lease.stopping is not None or lease.grant is None:
                continue
            group, first = self.groups.group_for(lease.grant)
            if group is None:
                break
            self.group_waiters.remove(lease)
            yield from self._in_group(lease, group, first)

    def lease_ended(self, lease: Lease) -> None:
        super().lease_ended(lease)
        self.saved.pop(lease, None)
        if lease in self.group_waiters:
            self.group_waiters.remove(lease)
        if lease.ask.tag is None:  # a dynamic replica's lease
            self.dynamic.difference_update(lease.work)

    def on_start(self, lease: Lease) -> Verdicts:
        tag = lease.ask.tag
        if isinstance(tag, ReservedGroup) and lease.ask.work is None:  # a group is ready
            tag.ready = True
            return
        work = lease.work[0]
        self.running_roles.add(self.role(work).name)
        self._event(work, "running", restored=work.saved is not None)
        expect = partial(self._expect, work) if self.ctx.virtual else None
        yield Send(lease, Call("run", (work.saved,), tag="run", expect=expect))

    # --- virtual time ------------------------------------------------------------------------

    def _step_seconds(self) -> dict[str, float]:
        """Seconds per step by role, in virtual time: from replicas of a measured run that ran
        unpreempted, else `step_time`, else the actor's `step_seconds`, else
        `cluster.sim_unit_seconds`."""
        if not self.ctx.virtual:
            return {}
        m = self.ctx.measured.stage(self.name) if self.ctx.measured is not None else None
        measured: dict[str, list[float]] = defaultdict(list)
        for unit, seconds in m.durations.items() if m is not None else ():
            role = self.rp.roles.get(unit.rsplit("/", 1)[0])  # replica ids: ROLE/INDEX
            if role is not None and role.steps and m is not None and m.attempts.get(unit) == 1:
                measured[role.name].append(seconds / role.steps)
        out = {}
        for role in self.rp.roles.values():
            declared = role.step_time or float(role.actor.get("step_seconds", 0) or 0) or None
            seen = measured.get(role.name)
            out[role.name] = sum(seen) / len(seen) if seen else declared or self.ctx.unit_seconds
        return out

    def _expect(self, work: Work) -> Expect:
        """A replica's run in virtual time: its steps left times its step time (or its
        `estimated_duration`); asked to stop, it stops at its next step (at once when its actor
        `drops_step`), keeping the steps it finished when its actor has `state()`. One per
        role for replicas that start afresh (the values are only read)."""
        role = self.role(work)
        saved = work.saved
        if isinstance(saved, dict) and "virtual_s" in saved:
            return self._run_in_virtual_time(role, float(saved["virtual_s"]))
        fresh = self._fresh_runs.get(role.name)
        if fresh is None:
            fresh = self._fresh_runs[role.name] = self._run_in_virtual_time(role, 0.0)
        return fresh

    def _run_in_virtual_time(self, role: RoleSpec, done: float) -> Expect:
        """`_expect` for a replica of `role` that has `done` virtual seconds of its run."""
        step = self.step_seconds[role.name]
        total = role.estimated_duration or role.steps * step
        left = max(total - done, min(step, total))
        saves = self.saves[role.name]

        def stopped(ran: float) -> dict[str, object]:
            kept = math.floor(ran / step + 1e-9) * step if saves else 0.0
            state = {"virtual_s": done + kept} if saves else None
            return {"cancelled": True, "state": state, "result": None}

        finished = {"cancelled": False, "state": None, "result": {"steps": role.steps}}
        drops = self.drops[role.name]
        return Expect(left, finished, step=min(step, left), stopped=stopped, drops_step=drops)

    # --- replies -----------------------------------------------------------------------------

    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        if tag == "cancel":  # its cancel() heard: its run's reply says when it stopped
            return
        if tag == "state":  # a stubborn victim's last word before it is killed
            self.saved[lease] = value
            yield Stopped(lease)
            return
        assert isinstance(value, dict)
        reply: dict[str, Any] = value
        work = lease.work[0]
        if lease.stopping is not None or reply["cancelled"]:
            self.saved[lease] = reply["state"]
            lease.stopping = lease.stopping or "preempted: cancelled"
            if lease.preempted:
                self._event(work, "stopped", saved=reply["state"] is not None)
            yield Stopped(lease)
            return
        result = (
            reply["result"] if isinstance(reply["result"], dict) else {"value": reply["result"]}
        )
        self._event(work, "done")
        yield End(lease, kill=True)
        yield Done(work, {**result, "preemptions": self.preempt_asks[work]})

    def on_preempt(self, lease: Lease, reason: str) -> Verdicts:
        for work in lease.work:
            self.preempt_asks[work] += 1
            self._event(work, "preempt requested", reason=reason)
        yield from ()

    def stop(self, lease: Lease) -> Verdicts:
        if lease.ask.work is None:  # a reserved group: nothing runs in it of its own
            yield Stopped(lease)
        elif lease.started is not None:
            yield Send(lease, Call("cancel", tag="cancel", interrupts=True))

    def last_call(self, lease: Lease) -> tuple[Call, float] | None:
        """A victim that did not stop within `cancel_timeout` is asked for its `state()` once
        more (for at most STATE_TIMEOUT) before it is killed."""
        if lease in self.saved or not lease.work:
            return None
        work = lease.work[0]
        expect = partial(self._state_now, work, lease) if self.ctx.virtual else None
        return Call("state", tag="state", expect=expect), STATE_TIMEOUT

    def _state_now(self, work: Work, lease: Lease) -> Expect:
        ran = self.ctx.wall() - lease.started.time if lease.started is not None else 0.0
        reply = self._expect(work).stopped
        assert reply is not None
        state = reply(ran)
        assert isinstance(state, dict)
        return Expect(0.0, state["state"])

    def saved_state(self, lease: Lease) -> object:
        """What the replica's `state()` said: in its stop reply, or its last call's answer
        (none when it did not answer that either: it is killed with what it saved before)."""
        state = self.saved.pop(lease, None)
        if lease.last_asked:
            for work in lease.work:
                self._event(work, "killed after cancel_timeout", saved=state is not None)
        return state

    def release(self, lease: Lease) -> Verdicts:
        tag = lease.ask.tag
        if isinstance(tag, ReservedGroup):
            if lease.ask.work is None:  # the reserved group itself
                if lease.group is not None:
                    yield RemoveGroup(lease.group)
                return
            tag.user = None  # a replica lent the group: its own grant is released
            if lease.preempted:
                # what the victim held is its preemptor's: the group goes back to the pool,
                # and a new one is reserved for the role while it has replicas to run
                yield from self._let_go(tag)
                if self._wanted(tag.spec):
                    self.to_reserve.append(tag.spec)
            return
        yield from self.groups.give_back(lease)

    def close(self) -> Verdicts:
        yield from self.groups.close()

    # --- the end -----------------------------------------------------------------------------

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        s = self.stats
        # preemptions and requeues: counted by the loop (`StageOutcome`), and for the run's
        # summary from its recorded events (`history`), which the report's line reads
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
                "created": self.groups.created + self.reserved_made,
                "reused": self.groups.reused,
            },
            "pg_pool_stats": {self.rp.pool: self._pg_pool_stats()},
        }
        if not self.ctx.virtual:
            # the event log of every attempt, written from the ledger with the run's pictures
            outcome.outputs.append(str(self.ctx.stage_dir(self.name) / EVENTS))
        return super().conclude(outcome)

    def _pg_pool_stats(self) -> dict[str, int]:
        """ScheduleMesh's `scheduler.pg_pool_stats()` for the stage's pool: groups made and
        reused, in use now, and the high-priority (reserved) ones made."""
        dynamic = self.groups.stats()
        in_use = sum(1 for g in self.reserved if g.user is not None)
        return {
            "created": dynamic["created"] + self.reserved_made,
            "reused": dynamic["reused"],
            "in_use": dynamic["in_use"] + in_use,
            "peak_dynamic_in_use": dynamic["peak_in_use"],
            "high_priority": self.reserved_made,
        }

    def _event(self, work: Work, what: str, **details: object) -> None:
        if self.ctx.virtual:
            return
        record = {
            "t": round(self.ctx.wall(), 4),
            "unit": work.id,
            "role": self.role(work).name,
            "event": what,
            **details,
        }
        self.events.append(record)
        self.ctx.ledger.add_log(self.name, record)  # kept across attempts: `events.jsonl`


def replica_request(
    rp: RolesPlan, role: RoleSpec, index: int, saves: bool, reuse: str | None = None
) -> Request:
    """A replica's lease: its role's resources, priority and labels in the stage's pool;
    preemptible; replicas beyond the role's `min` are elastic and preempt nobody."""
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


def reserved_request(rp: RolesPlan, shape: Resources) -> Request:
    """A reserved group's lease, asked for when the stage starts: at the top role priority,
    in the stage's pool, never preempted."""
    return Request(shape, max(r.priority for r in rp.roles.values()), pool=rp.pool)


class _Reserved(Protocol):
    @property
    def shape(self) -> Resources: ...

    @property
    def role(self) -> str | None: ...


_G = TypeVar("_G", bound=_Reserved)


def pick_reserved(free: list[_G], role: RoleSpec) -> _G | None:
    """Which free reserved group a replica takes: its role's own, else one kept for no role;
    the smallest that holds it."""
    fits = [g for g in free if role.resources.fits_in(g.shape)]
    mine = [g for g in fits if g.role == role.name] or [g for g in fits if g.role is None]
    if not mine:
        return None
    return min(mine, key=lambda g: (g.shape.cpus + 8 * g.shape.gpus, g.shape.memory))


def open_run(stage: StagePlan, ctx: RunContext) -> RolesRun:
    return RolesRun(stage, ctx)
