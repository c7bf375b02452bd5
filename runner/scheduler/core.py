"""Admission by priority against per-node capacity, shared by every stage of a run.

Ray has no priorities: whoever asks first gets the CPUs. Here every resource claim (a pool
worker, a job, a shard, a role replica) waits in one queue ordered by priority plus an ageing
bonus, so low priority cannot starve forever. Requests that do not fit are passed over for
smaller ones behind them (backfill), except past a request that asked for a reservation (a
job): the first of those that does not fit reserves the node where it could start soonest, by
the `duration` (time limit) of the grants there, and a request behind it lands on that node
only when its own duration ends it before then, as Slurm's backfill does; one without a
duration never does. Pools may have quotas. A request that carries a
preemption `Policy` may take the resources of preemptible grants (`on_preempt`): the victims
are told, the request holds its node until they give their resources back. A grant may also be
parked (an idle placement group kept for reuse): any request may reclaim it, and requests with
the same `reuse` tag take it over whole, best fit first.

The core is pure Python and never blocks except in `acquire`: a simulated cluster drives it in
virtual time through `clock`, `submit`, `admit` and `release`.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from runner.resources import Resources
from runner.scheduler import policy as pol
from runner.scheduler.metrics import REGISTRY, Metrics

# priority points a waiting request gains per second of waiting
AGEING_PER_SECOND = 0.01

# called under the scheduler's lock: must only record, never block or call the scheduler
Notify = Callable[["Grant", str], None]


@dataclass(eq=False)
class Grant:
    """Resources handed to one claimant on one node, until released (or parked)."""

    owner: str
    resources: Resources
    priority: float
    node: int
    waited: float
    pool: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # set when the grant may be preempted: told (victim, reason) when it is chosen
    on_preempt: Notify | None = None
    saves_state: bool = False
    elastic: bool = False
    since: float = 0.0
    # the reason once it was chosen as a victim, and when
    preempted: str | None = None
    preempted_at: float | None = None
    # the parked grant (an idle placement group) this one took over, if any
    reused: Grant | None = None
    # when it will have ended at the latest (its time limit), if it has one
    ends: float | None = None
    # how long it is expected to run in all (a role's `estimated_duration`), if estimated
    estimated: float | None = None
    # for parked grants: who reuses them, and whom to tell when they are reclaimed
    tag: str | None = None
    on_reclaim: Notify | None = None
    released: bool = False


@dataclass(eq=False)
class Ticket:
    """A waiting request; `grant` is set once it is admitted."""

    owner: str
    resources: Resources
    priority: float
    since: float
    seq: int
    pool: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    policy: pol.Policy | None = None
    on_preempt: Notify | None = None
    saves_state: bool = False
    elastic: bool = False
    reuse: str | None = None
    # the longest it will hold its grant (a job's time limit), if known
    duration: float | None = None
    # when it does not fit, hold back requests behind it that would delay it (backfill rule)
    reserve: bool = False
    # how long it is expected to run in all, for victim choice (work left), if estimated
    estimated: float | None = None
    # the only nodes it may run on (a job's partition); None: any node
    nodes: frozenset[int] | None = None
    grant: Grant | None = None
    # victims told to make room for this request, and the node it holds meanwhile
    victims: list[Grant] = field(default_factory=list)
    hold_node: int | None = None

    @property
    def order(self) -> tuple[float, int]:
        """Queue order; ageing adds the same bonus per second to all, so this never changes."""
        return (-(self.priority - AGEING_PER_SECOND * self.since), self.seq)

    def waiting_on_victims(self) -> bool:
        return any(not v.released and v.tag is None for v in self.victims)


# kept for callers of the first version
_Request = Ticket


@dataclass
class Scheduler:
    """Grants resource claims by priority; thread-safe; time comes from `clock`."""

    nodes: list[Resources]
    clock: Callable[[], float] = time.monotonic
    metrics: Metrics = field(default_factory=lambda: REGISTRY)
    _free: list[Resources] = field(init=False)
    _waiting: list[Ticket] = field(default_factory=list, init=False)
    _running: set[Grant] = field(default_factory=set, init=False)
    _parked: list[Grant] = field(default_factory=list, init=False)
    _quota: dict[str, Resources] = field(default_factory=dict, init=False)
    _used: dict[str, Resources] = field(default_factory=dict, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.nodes)
        self._free = list(self.nodes)

    # --- asking and giving back -----------------------------------------------------------

    def acquire(
        self,
        owner: str,
        resources: Resources,
        priority: float = 0.0,
        timeout: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        **claim: object,
    ) -> Grant | None:
        """Wait for a grant; None on timeout (0 = try once) or when `cancelled()` turns true.
        `claim` takes `submit`'s keywords (pool, labels, policy, on_preempt, ...)."""
        ticket = self.submit(owner, resources, priority, **claim)  # type: ignore[arg-type]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._admit()
                if ticket.grant is not None:
                    return ticket.grant
                left = None if deadline is None else deadline - time.monotonic()
                if cancelled() or (left is not None and left <= 0):
                    self._drop(ticket)
                    return None
                self._cond.wait(0.2 if left is None else min(left, 0.2))

    def submit(
        self,
        owner: str,
        resources: Resources,
        priority: float = 0.0,
        *,
        pool: str = "",
        labels: Mapping[str, str] | None = None,
        policy: pol.Policy | None = None,
        on_preempt: Notify | None = None,
        saves_state: bool = False,
        elastic: bool = False,
        reuse: str | None = None,
        duration: float | None = None,
        reserve: bool = False,
        estimated: float | None = None,
        nodes: frozenset[int] | None = None,
    ) -> Ticket:
        """Queue a request without waiting; `admit()` (or any `acquire`) grants it later."""
        with self._cond:
            ticket = Ticket(
                owner,
                resources,
                priority,
                self.clock(),
                next(self._seq),
                pool,
                dict(labels or {}),
                policy,
                on_preempt,
                saves_state,
                elastic,
                reuse,
                duration,
                reserve,
                estimated,
                nodes,
            )
            bisect.insort(self._waiting, ticket, key=lambda t: t.order)
            return ticket

    def admit(self) -> list[Ticket]:
        """Grant what can be granted now; the tickets admitted by this call."""
        with self._cond:
            return self._admit()

    def withdraw(self, ticket: Ticket) -> None:
        """Stop waiting (or give back what the ticket was granted)."""
        with self._cond:
            if ticket.grant is not None:
                self._release(ticket.grant)
            else:
                self._drop(ticket)

    def release(self, grant: Grant) -> None:
        """Give a grant's resources back and wake the waiters; a second release is a no-op."""
        with self._cond:
            self._release(grant)

    def park(self, grant: Grant, tag: str, on_reclaim: Notify) -> None:
        """Keep a grant's resources as an idle placement group: requests with `reuse=tag`
        take it over, any other request may reclaim it (then `on_reclaim` is told)."""
        with self._cond:
            if grant.released:
                return
            self._running.discard(grant)
            self._victim_done(grant)
            grant.tag, grant.on_reclaim = tag, on_reclaim
            self._parked.append(grant)
            self._cond.notify_all()

    def set_quota(self, pool: str, resources: Resources) -> None:
        """At most `resources` may be granted to requests of `pool` at once."""
        with self._cond:
            self._quota[pool] = resources

    def set_capacity(self, node: int, capacity: Resources) -> None:
        """A node's capacity changed (zero: it left the cluster); grants on it stay until
        released, so its free resources may be negative meanwhile."""
        with self._cond:
            self._free[node] = self._free[node] + (capacity - self.nodes[node])
            self.nodes[node] = capacity
            self._cond.notify_all()

    def add_node(self, capacity: Resources) -> int:
        """A node joined; its index."""
        with self._cond:
            self.nodes.append(capacity)
            self._free.append(capacity)
            self._cond.notify_all()
            return len(self.nodes) - 1

    # --- looking --------------------------------------------------------------------------

    def free(self) -> Resources:
        """What is not granted now, summed over nodes (parked groups count as granted)."""
        with self._cond:
            total = Resources()
            for node in self._free:
                total = total + node
            return total

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def running(self) -> list[Grant]:
        with self._cond:
            return list(self._running)

    # --- admission ------------------------------------------------------------------------

    def _admit(self) -> list[Ticket]:
        now = self.clock()
        # what a preemptor holds while its victims stop is kept from everyone else, so the
        # resources a victim frees go to the request that evicted it and to nobody else
        view = list(self._free)
        for t in self._waiting:
            if t.hold_node is not None:
                view[t.hold_node] = view[t.hold_node] - t.resources
        granted: list[Ticket] = []
        failed: set[tuple[Resources, str, str | None, bool, frozenset[int] | None]] = set()
        hopeless: set[tuple[object, ...]] = set()
        # (node, earliest start) held for the first reserving request that did not fit
        reserved: tuple[int, float] | None = None
        for ticket in list(self._waiting):
            held = ticket.hold_node
            if held is not None:
                view[held] = view[held] + ticket.resources
            barred = None if held is not None else _barred(ticket, reserved, now)
            shape = (ticket.resources, ticket.pool, ticket.reuse, barred is not None, ticket.nodes)
            if shape not in failed or held is not None:
                grant = self._place_outside(ticket, view, now, barred)
                if grant is not None:
                    if grant.reused is None:
                        view[grant.node] = view[grant.node] - grant.resources
                    self._grant(ticket, grant, now)
                    granted.append(ticket)
                    continue
                if held is None:
                    failed.add(shape)
            if reserved is None and held is None and ticket.reserve:
                reserved = self._reservation(ticket, view, now)
            if held is not None:
                view[held] = view[held] - ticket.resources
                if ticket.waiting_on_victims():
                    continue
            if ticket.policy is None:
                continue
            key = (ticket.resources, ticket.pool, ticket.priority, tuple(ticket.labels.items()))
            if key in hopeless or not self._preempt(ticket, view, now):
                hopeless.add(key)
            elif ticket.hold_node is not None and ticket.hold_node != held:
                if held is not None:
                    view[held] = view[held] + ticket.resources
                view[ticket.hold_node] = view[ticket.hold_node] - ticket.resources
        if granted:
            self._cond.notify_all()
        return granted

    def _place_outside(
        self, ticket: Ticket, view: list[Resources], now: float, barred: int | None
    ) -> Grant | None:
        """`_place`, with node `barred` (reserved for a request ahead) and the nodes outside
        the ticket's `nodes` shown as full."""
        shut = {barred} if barred is not None else set()
        if ticket.nodes is not None:
            shut |= set(range(len(view))) - ticket.nodes
        if not shut:
            return self._place(ticket, view, now)
        kept = {n: view[n] for n in shut}
        for n in shut:
            view[n] = Resources()
        try:
            return self._place(ticket, view, now)
        finally:  # what a reclaim freed there meanwhile is added back
            for n, free in kept.items():
                view[n] = free + view[n]

    def _reservation(
        self, ticket: Ticket, view: list[Resources], now: float
    ) -> tuple[int, float] | None:
        """The node where `ticket` could start soonest, and when: running grants end at their
        `ends` (one without is taken to end any moment, so nothing backfills before it)."""
        best: tuple[float, int] | None = None
        for node, capacity in enumerate(self.nodes):
            if not ticket.resources.fits_in(capacity) or not _may_use(ticket, node):
                continue
            here = [g for g in self._running if g.node == node]
            avail, start = view[node], now
            for g in sorted(here, key=lambda g: now if g.ends is None else g.ends):
                if ticket.resources.fits_in(avail):
                    break
                avail, start = avail + g.resources, max(start, g.ends or now)
            if ticket.resources.fits_in(avail) and (best is None or (start, node) < best):
                best = (start, node)
        return None if best is None else (best[1], best[0])

    def _place(self, ticket: Ticket, view: list[Resources], now: float) -> Grant | None:
        need = ticket.resources
        room = self._quota_room(ticket.pool)
        if ticket.reuse is not None and (taken := self._reuse(ticket, view, room)) is not None:
            return taken
        if room is None or need.fits_in(room):
            node = self._roomiest(need, view)
            if node is not None:
                return self._new_grant(ticket, node, need, now)
        return self._reclaim_for(ticket, view, room, now)

    def _reuse(self, ticket: Ticket, view: list[Resources], room: Resources | None) -> Grant | None:
        """Best fit among parked groups of the same tag: the exact shape, else fresh resources
        when they are free, else the smallest parked group that holds the request."""
        fitting = [
            g
            for g in self._parked
            if g.tag == ticket.reuse and ticket.resources.fits_in(g.resources)
        ]
        if not fitting:
            return None
        best = min(fitting, key=lambda g: _size(g.resources))
        fresh_ok = room is None or ticket.resources.fits_in(room)
        if (
            best.resources != ticket.resources
            and fresh_ok
            and self._roomiest(ticket.resources, view) is not None
        ):
            return None
        self._parked.remove(best)
        best.released = True  # taken over whole: its resources stay granted
        grant = self._new_grant(ticket, best.node, best.resources, self.clock(), take=False)
        grant.reused = best
        return grant

    def _reclaim_for(
        self, ticket: Ticket, view: list[Resources], room: Resources | None, now: float
    ) -> Grant | None:
        """Free parked groups (on one node, and of the same pool when the quota is short)."""
        need = ticket.resources
        if not self._parked:
            return None
        pool_parked = [g for g in self._parked if g.pool == ticket.pool]
        if room is not None and not need.fits_in(_sum([room, *(g.resources for g in pool_parked)])):
            return None
        for node in range(len(self.nodes)):
            here = [g for g in self._parked if g.node == node]
            if (
                not here
                or not _may_use(ticket, node)
                or not need.fits_in(_sum([view[node], *(g.resources for g in here)]))
            ):
                continue
            taken: list[Grant] = []
            for g in sorted(here, key=lambda g: -_size(g.resources)):
                quota_ok = room is None or need.fits_in(
                    _sum([room, *(t.resources for t in taken if t.pool == ticket.pool)])
                )
                if need.fits_in(_sum([view[node], *(t.resources for t in taken)])) and quota_ok:
                    break
                taken.append(g)
            for g in taken:
                self._parked.remove(g)
                self._release(g)
                view[node] = view[node] + g.resources
                if g.on_reclaim is not None:
                    g.on_reclaim(g, "reclaimed")
            room = self._quota_room(ticket.pool)
            if need.fits_in(view[node]) and (room is None or need.fits_in(room)):
                return self._new_grant(ticket, node, need, now)
        return None

    def _preempt(self, ticket: Ticket, view: list[Resources], now: float) -> bool:
        """Choose victims by the ticket's policy and tell them; False when none would do."""
        assert ticket.policy is not None
        me = pol.Party(ticket.priority, ticket.pool, ticket.labels)
        reasons: dict[Grant, str] = {}
        for g in self._running:
            if g.on_preempt is None or g.preempted is not None:
                continue
            reason = pol.preemption_reason(
                me, pol.Party(g.priority, g.pool, g.labels), ticket.policy
            )
            if reason is not None:
                reasons[g] = reason
        if not reasons:
            return False
        room = self._quota_room(ticket.pool)
        pool_mates = room is not None and not ticket.resources.fits_in(room)
        nodes = range(len(self.nodes)) if pool_mates else sorted({g.node for g in reasons})
        best: tuple[tuple[object, ...], int, list[pol.Candidate]] | None = None
        for node in nodes:
            cands = [
                _candidate(g, now)
                for g in reasons
                if g.node == node or (pool_mates and g.pool == ticket.pool)
            ]
            base = _sum([view[node], *(g.resources for g in self._parked if g.node == node)])
            enough = _enough(ticket.resources, node, base, room, ticket.pool)
            chosen = pol.choose_victims(cands, enough)
            if chosen is not None:
                rank = (len(chosen), *pol.set_cost(chosen))
                if best is None or rank < best[0]:
                    best = (rank, node, chosen)
        if best is None:
            return False
        _, node, chosen = best
        victims = [c.key for c in chosen if isinstance(c.key, Grant)]
        for g in victims:
            g.preempted, g.preempted_at = reasons[g], now
            self.metrics.preempted(g.pool, reasons[g])
            assert g.on_preempt is not None
            g.on_preempt(g, reasons[g])
        ticket.victims = victims
        ticket.hold_node = node
        return True

    # --- bookkeeping ----------------------------------------------------------------------

    def _new_grant(
        self, ticket: Ticket, node: int, resources: Resources, now: float, take: bool = True
    ) -> Grant:
        if take:
            self._free[node] = self._free[node] - resources
            self._used[ticket.pool] = self._used.get(ticket.pool, Resources()) + resources
        grant = Grant(
            ticket.owner,
            resources,
            ticket.priority,
            node,
            now - ticket.since,
            ticket.pool,
            ticket.labels,
            ticket.on_preempt,
            ticket.saves_state,
            ticket.elastic,
            now,
        )
        grant.ends = None if ticket.duration is None else now + ticket.duration
        grant.estimated = ticket.estimated
        return grant

    def _grant(self, ticket: Ticket, grant: Grant, now: float) -> None:
        ticket.grant = grant
        ticket.victims, ticket.hold_node = [], None
        self._drop(ticket)
        self._running.add(grant)
        self.metrics.admitted(ticket.priority, grant.waited)

    def _drop(self, ticket: Ticket) -> None:
        i = bisect.bisect_left(self._waiting, ticket.order, key=lambda t: t.order)
        if i < len(self._waiting) and self._waiting[i] is ticket:
            del self._waiting[i]

    def _release(self, grant: Grant) -> None:
        if grant.released:
            return
        grant.released = True
        self._running.discard(grant)
        if grant in self._parked:
            self._parked.remove(grant)
        self._free[grant.node] = self._free[grant.node] + grant.resources
        self._used[grant.pool] = self._used.get(grant.pool, Resources()) - grant.resources
        self._victim_done(grant)
        self._cond.notify_all()

    def _victim_done(self, grant: Grant) -> None:
        if grant.preempted_at is not None:
            self.metrics.preempt_done(self.clock() - grant.preempted_at)
            grant.preempted_at = None

    def _quota_room(self, pool: str) -> Resources | None:
        quota = self._quota.get(pool)
        if quota is None:
            return None
        return quota - self._used.get(pool, Resources())

    def _roomiest(self, resources: Resources, view: list[Resources]) -> int | None:
        """The node with the most free CPUs that holds `resources` (spreads load), or None."""
        best = None
        for i, free in enumerate(view):
            if resources.fits_in(free) and (best is None or free.cpus > view[best].cpus):
                best = i
        return best


def _may_use(ticket: Ticket, node: int) -> bool:
    """Whether `node` is one the ticket may run on (its `nodes`, when it names them)."""
    return ticket.nodes is None or node in ticket.nodes


def _barred(ticket: Ticket, reserved: tuple[int, float] | None, now: float) -> int | None:
    """The reserved node `ticket` may not use: it would still run when the reservation starts
    (or it has no duration to tell)."""
    if reserved is None:
        return None
    node, start = reserved
    if ticket.duration is not None and now + ticket.duration <= start:
        return None
    return node


def _candidate(g: Grant, now: float) -> pol.Candidate:
    lost = 0.0 if g.saves_state else now - g.since
    left = pol.remaining(g.estimated, now - g.since)
    return pol.Candidate(g, g.node, g.resources, g.priority, g.pool, lost, g.elastic, left)


def _enough(
    need: Resources, node: int, base: Resources, room: Resources | None, pool: str
) -> Callable[[object], bool]:
    """Whether a victim set frees enough on `node` (and in the pool's quota, when it has one)."""

    def enough(victims: object) -> bool:
        chosen = list(victims)  # type: ignore[call-overload]
        on_node = _sum([base, *(c.resources for c in chosen if c.node == node)])
        if not need.fits_in(on_node):
            return False
        if room is None:
            return True
        return need.fits_in(_sum([room, *(c.resources for c in chosen if c.pool == pool)]))

    return enough


def _sum(parts: list[Resources]) -> Resources:
    total = Resources()
    for p in parts:
        total = total + p
    return total


def _size(r: Resources) -> float:
    """One number to order shapes by (a GPU weighs like 8 CPUs; memory by the GB)."""
    return r.cpus + 8 * r.gpus + r.memory / (1 << 30) / 4
