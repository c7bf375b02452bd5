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
import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from runner.resources import Resources
from runner.scheduler import policy as pol
from runner.scheduler.capacity import FreeIndex
from runner.scheduler.metrics import REGISTRY, Metrics

# priority points a waiting request gains per second of waiting
AGEING_PER_SECOND = 0.01

# called under the scheduler's lock: must only record, never block or call the scheduler
Notify = Callable[["Grant", str], None]


@dataclass(eq=False, slots=True)
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
    # when it will have ended at the latest (its time limit), if it has one
    ends: float | None = None
    # how long it is expected to run in all (a role's `estimated_duration`), if estimated
    estimated: float | None = None
    # the reason once it was chosen as a victim, and when
    preempted: str | None = None
    preempted_at: float | None = None
    # the parked grant (an idle placement group) this one took over, if any
    reused: Grant | None = None
    # for parked grants: who reuses them, and whom to tell when they are reclaimed
    tag: str | None = None
    on_reclaim: Notify | None = None
    released: bool = False
    # for a grant lent to a unit (`Scheduler.lend`): the grant that holds its resources
    lender: Grant | None = None


@dataclass(eq=False, slots=True)
class Ticket:
    """A waiting request; `grant` is set once it is admitted."""

    owner: str
    resources: Resources
    priority: float
    since: float
    seq: int
    # queue order: ageing adds the same bonus per second to all, so this never changes
    # (`Scheduler.submit_all` gives it: a `__post_init__` would be one call more per request)
    order: tuple[float, int]
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
    lane: _Lane | None = field(default=None, repr=False)

    def waiting_on_victims(self) -> bool:
        return any(not v.released and v.tag is None for v in self.victims)


# kept for callers of the first version
_Request = Ticket


@dataclass(eq=False, slots=True)
class _Lane:
    """Waiting tickets that ask alike (shape, pool, labels, policy, priority...), in queue order.

    Within a pass every ticket of a lane meets the same answer until one is granted, so a pass
    walks the lanes merged by queue order and leaves a lane at its first refusal that nothing
    further can come of (no preemption, no reservation), instead of walking every ticket."""

    key: tuple[object, ...]
    # what decides whether a ticket fits (resources, pool, reuse, nodes), as a small number:
    # a pass remembers the shapes refused so far, and tells them apart on every ticket
    shape: int
    priority: float
    # no reuse tag and no node list: placed by `_admit` itself, without `_place`
    simple: bool
    tickets: list[Ticket] = field(default_factory=list)


@dataclass
class Scheduler:
    """Grants resource claims by priority; thread-safe; time comes from `clock`."""

    nodes: list[Resources]
    clock: Callable[[], float] = time.monotonic
    metrics: Metrics = field(default_factory=lambda: REGISTRY)
    # free resources by node, less what waiting preemptors hold while their victims stop
    _avail: FreeIndex = field(init=False)
    # waiting tickets by what they ask (see `_Lane`), and those holding a node for victims
    _lanes: dict[tuple[object, ...], _Lane] = field(default_factory=dict, init=False)
    # every shape a lane has had (`_Lane.shape`), numbered
    _shapes: dict[tuple[object, ...], int] = field(default_factory=dict, init=False)
    _held: set[Ticket] = field(default_factory=set, init=False)
    _count: int = field(default=0, init=False)
    # running grants by node (all of them: `running()`)
    _on_node: dict[int, set[Grant]] = field(default_factory=dict, init=False)
    # preemptible running grants not yet chosen as victims: by node, and how many of each
    # kind (`_victim_kind`) each node has, and of each party (priority, pool, labels)
    _node_victims: dict[int, dict[Grant, None]] = field(default_factory=dict, init=False)
    _node_kinds: dict[int, Counter[tuple[object, ...]]] = field(default_factory=dict, init=False)
    _parties: Counter[tuple[object, ...]] = field(default_factory=Counter, init=False)
    # nodes alike for a preemptor (`_preempt`): each node's look (free resources with its
    # parked groups, its victims by kind), the nodes of each look, and nodes to look at again
    _parked_on: dict[int, Resources] = field(default_factory=dict, init=False)
    _look: dict[int, tuple[object, ...]] = field(default_factory=dict, init=False)
    _alike: dict[tuple[object, ...], set[int]] = field(default_factory=dict, init=False)
    _party_of: dict[tuple[object, ...], pol.Party] = field(default_factory=dict, init=False)
    _parked: list[Grant] = field(default_factory=list, init=False)
    _quota: dict[str, Resources] = field(default_factory=dict, init=False)
    # what is granted to each pool that has a quota (others are not counted)
    _used: dict[str, Resources] = field(default_factory=dict, init=False)
    # held by every public method: a plain lock (a condition's `with` costs a Python call);
    # `acquire` waits on `_cond`, built on it
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _cond: threading.Condition = field(init=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, init=False)
    # threads waiting in `acquire`
    _sleepers: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.nodes)
        self._avail = FreeIndex(self.nodes)
        self._cond = threading.Condition(self._lock)

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
        with self._lock:
            while True:
                self._admit()
                if ticket.grant is not None:
                    return ticket.grant
                left = None if deadline is None else deadline - time.monotonic()
                if cancelled() or (left is not None and left <= 0):
                    self._drop(ticket)
                    return None
                self._sleepers += 1
                try:
                    self._cond.wait(0.2 if left is None else min(left, 0.2))
                finally:
                    self._sleepers -= 1

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
        return self.submit_all(
            (owner,),
            resources,
            priority,
            pool=pool,
            labels=labels,
            policy=policy,
            on_preempt=on_preempt,
            saves_state=saves_state,
            elastic=elastic,
            reuse=reuse,
            duration=duration,
            reserve=reserve,
            estimated=estimated,
            nodes=nodes,
        )[0]

    def submit_all(
        self,
        owners: Sequence[str],
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
    ) -> list[Ticket]:
        """`submit` for many claimants that ask alike (a stage's units, an array's jobs): a
        ticket each, in order, as `submit` one by one would queue them, but under one lock, at
        one reading of the clock and with one look for their lane. They share one copy of
        `labels` (nothing changes a ticket's or a grant's labels)."""
        if not owners:
            return []
        with self._lock:
            since = self.clock()
            copied = dict(labels) if labels else {}
            # the lane: requests that ask alike. The resources by their amounts, not as
            # `Resources` (whose hash is a Python call)
            key = (
                resources.cpus,
                resources.gpus,
                resources.memory,
                resources.custom,
                pool,
                reuse,
                tuple(sorted(copied.items())) if copied else (),
                id(policy),
                priority,
                reserve,
                duration,
                nodes,
            )
            lane = self._lanes.get(key)
            if lane is None:
                shape = (resources, pool, reuse, nodes)
                number = self._shapes.setdefault(shape, len(self._shapes))
                simple = reuse is None and nodes is None
                lane = self._lanes[key] = _Lane(key, number, priority, simple)
            # queue order: one clock reading, so the tickets follow one another by arrival
            first = -(priority - AGEING_PER_SECOND * since)
            seqs = self._seq
            tickets = [
                Ticket(  # positional, all fields: keywords and defaults cost per ticket
                    owner,
                    resources,
                    priority,
                    since,
                    seq,
                    (first, seq),
                    pool,
                    copied,
                    policy,
                    on_preempt,
                    saves_state,
                    elastic,
                    reuse,
                    duration,
                    reserve,
                    estimated,
                    nodes,
                    None,
                    [],
                    None,
                    lane,
                )
                for owner, seq in zip(owners, seqs, strict=False)  # `seqs` never ends
            ]
            queue = lane.tickets
            if not queue or not tickets or queue[-1].order < tickets[0].order:
                queue += tickets
            else:
                for ticket in tickets:
                    bisect.insort(queue, ticket, key=lambda t: t.order)
            self._count += len(tickets)
            return tickets

    def admit(self) -> list[Ticket]:
        """Grant what can be granted now; the tickets admitted by this call."""
        with self._lock:
            return self._admit()

    def withdraw(self, ticket: Ticket) -> None:
        """Stop waiting (or give back what the ticket was granted)."""
        with self._lock:
            if ticket.grant is not None:
                self.release(ticket.grant)
            else:
                self._drop(ticket)

    def release(self, grant: Grant) -> None:
        """Give a grant's resources back and wake the waiters; a second release is a no-op.
        The scheduler's own releases call this too, under the lock they hold already (it is
        reentrant): one call per release, not a public one and a private one."""
        with self._lock:
            if grant.released:
                return
            grant.released = True
            # `_unrun`, inline: once per release
            here = self._on_node.get(grant.node)
            if here is not None:
                here.discard(grant)
            if grant.on_preempt is not None:
                self._not_victim(grant)
            if grant.tag is not None and grant in self._parked:
                self._parked_del(grant)
            if grant.lender is None:  # a lent grant's resources stay its lender's
                self._avail.give(grant.node, grant.resources)
                if grant.pool in self._used:
                    self._used[grant.pool] = self._used[grant.pool] - grant.resources
            if grant.preempted_at is not None:
                self._victim_done(grant)
            if self._sleepers:  # `_wake`, without the call on every release
                self._cond.notify_all()

    def lend(
        self,
        lender: Grant,
        owner: str,
        priority: float,
        *,
        labels: Mapping[str, str] | None = None,
        on_preempt: Notify | None = None,
        saves_state: bool = False,
        elastic: bool = False,
        estimated: float | None = None,
    ) -> Grant:
        """A unit's own grant over what `lender` holds (a reserved placement group lent to a
        replica): preemptible by the normal rules like any grant of that unit. Released, it
        gives nothing back, for the resources stay the lender's; so when it is chosen as a
        victim, its lender must be released too for the preemptor to have them."""
        with self._lock:
            now = self.clock()
            grant = Grant(
                owner,
                lender.resources,
                priority,
                lender.node,
                0.0,
                lender.pool,
                dict(labels or {}),
                on_preempt,
                saves_state,
                elastic,
                now,
                None,
                estimated,
                lender=lender,
            )
            self._on_node.setdefault(grant.node, set()).add(grant)
            if on_preempt is not None:
                self._preemptible(grant)
            return grant

    def park(self, grant: Grant, tag: str, on_reclaim: Notify) -> None:
        """Keep a grant's resources as an idle placement group: requests with `reuse=tag`
        take it over, any other request may reclaim it (then `on_reclaim` is told)."""
        with self._lock:
            if grant.released:
                return
            self._unrun(grant)
            self._victim_done(grant)
            grant.tag, grant.on_reclaim = tag, on_reclaim
            self._parked_add(grant)
            self._wake()

    def set_quota(self, pool: str, resources: Resources) -> None:
        """At most `resources` may be granted to requests of `pool` at once."""
        with self._lock:
            self._quota[pool] = resources
            if pool not in self._used:  # counted from now on: what it holds already, first
                running = [g for here in self._on_node.values() for g in here]
                held = [g.resources for g in (*running, *self._parked) if g.pool == pool]
                self._used[pool] = _sum(held)

    def set_capacity(self, node: int, capacity: Resources) -> None:
        """A node's capacity changed (zero: it left the cluster); grants on it stay until
        released, so its free resources may be negative meanwhile."""
        with self._lock:
            self._avail[node] = self._avail[node] + (capacity - self.nodes[node])
            self.nodes[node] = capacity
            self._wake()

    def add_node(self, capacity: Resources) -> int:
        """A node joined; its index."""
        with self._lock:
            self.nodes.append(capacity)
            self._avail.append(capacity)
            self._wake()
            return len(self.nodes) - 1

    # --- looking --------------------------------------------------------------------------

    def free(self) -> Resources:
        """What is not granted now, summed over nodes (parked groups count as granted)."""
        with self._lock:
            return _sum([self._avail.total(), *(t.resources for t in self._held)])

    def waiting(self) -> int:
        with self._lock:
            return self._count

    def running(self) -> list[Grant]:
        with self._lock:
            return [g for here in self._on_node.values() for g in here]

    # --- admission ------------------------------------------------------------------------

    def _admit(self) -> list[Ticket]:
        """One pass over the waiting tickets in queue order (the lanes merged): grant what fits,
        reserve for the first job that does not, preempt for those that may."""
        now = self.clock()
        # what a preemptor holds while its victims stop is kept from everyone else (it is not
        # in `_avail`), so the resources a victim frees go to the request that evicted it
        view = self._avail
        granted: list[Ticket] = []
        # (lane shape, barred from a reserved node) refused in this pass, as one number:
        # shape * 2 + barred
        failed: set[int] = set()
        hopeless: set[tuple[object, ...]] = set()
        # (node, earliest start) held for the first reserving request that did not fit
        reserved: tuple[int, float] | None = None
        lanes = [lane for lane in self._lanes.values() if lane.tickets]
        # (order, lane number, index in lane); held tickets are visited on their own (lane -1)
        heap: list[tuple[tuple[float, int], int, int]] = [
            (lane.tickets[0].order, n, 0) for n, lane in enumerate(lanes)
        ]
        held_list = sorted(self._held, key=lambda t: t.order)
        heap += [(t.order, -1 - i, 0) for i, t in enumerate(held_list)]
        heapq.heapify(heap)
        reached = [0] * len(lanes)
        # what each admitted ticket waited, by priority in the order first admitted, told to
        # the metrics once a pass (`admitted_many`), and the list each lane adds to (found on
        # its first admission)
        waited: dict[float, list[float]] = {}
        lane_waited: list[list[float] | None] = [None] * len(lanes)
        # no quotas: a simple lane's ticket is placed here, not in `_place`
        quotas = bool(self._quota)
        place, on_node = view.place, self._on_node
        # after a grant, the lane's next ticket is taken at once when it comes before every
        # other lane's head (a lane is mostly walked in runs), without going through the heap
        n = i = 0
        going_on = False
        while True:
            if going_on:
                going_on = False
            elif heap:
                _, n, i = heapq.heappop(heap)
            else:
                break
            if n < 0:
                ticket = held_list[-1 - n]
                if ticket.grant is not None or ticket.lane is None:
                    continue
            else:
                tickets = lanes[n].tickets
                while i < len(tickets) and (
                    tickets[i].hold_node is not None or tickets[i].grant is not None
                ):
                    i += 1  # held at the start of the pass: visited on its own
                if i >= len(tickets):
                    continue
                ticket = tickets[i]
                reached[n] = i + 1
            held = ticket.hold_node
            if held is not None:
                view.give(held, ticket.resources)
                self._held.discard(ticket)
            if held is not None or reserved is None:
                barred = None
            else:
                # the reserved node is barred to a ticket that would still run when the
                # reservation starts (or has no duration to tell)
                duration = ticket.duration
                fits_before = duration is not None and now + duration <= reserved[1]
                barred = None if fits_before else reserved[0]
            lane = ticket.lane
            assert lane is not None
            shape = lane.shape * 2 + (barred is not None)
            more = True  # whether the lane's next ticket could come to anything in this pass
            if shape not in failed or held is not None:
                if lane.simple and not quotas:
                    # `_place` and `_new_grant`, inline: this runs once per decision
                    node = place(ticket.resources, barred)
                    if node is None:
                        grant = (
                            self._reclaim_for(ticket, None, now, barred) if self._parked else None
                        )
                    else:
                        grant = Grant(
                            ticket.owner,
                            ticket.resources,
                            ticket.priority,
                            node,
                            now - ticket.since,
                            ticket.pool,
                            ticket.labels,
                            ticket.on_preempt,
                            ticket.saves_state,
                            ticket.elastic,
                            now,
                            None if ticket.duration is None else now + ticket.duration,
                            ticket.estimated,
                        )
                else:
                    grant = self._place(ticket, now, barred)
                if grant is not None:
                    # recorded here (a preemptible grant also in `_preemptible`), the metrics
                    # told at the end of the pass
                    ticket.grant = grant
                    if ticket.victims:
                        ticket.victims = []
                    ticket.hold_node = None
                    here = on_node.get(grant.node)
                    if here is None:
                        here = on_node[grant.node] = set()
                    here.add(grant)
                    if grant.on_preempt is not None:
                        self._preemptible(grant)
                    granted.append(ticket)
                    if n >= 0:
                        waits = lane_waited[n]
                        if waits is None:
                            waits = lane_waited[n] = waited.setdefault(lane.priority, [])
                        waits.append(grant.waited)
                        ticket.lane = None
                        if i + 1 < len(tickets):
                            if not heap or tickets[i + 1].order < heap[0][0]:
                                i += 1
                                going_on = True
                            else:
                                heapq.heappush(heap, (tickets[i + 1].order, n, i + 1))
                    else:
                        waited.setdefault(ticket.priority, []).append(grant.waited)
                    continue
                if held is None:
                    failed.add(shape)
            if reserved is None and held is None and ticket.reserve:
                reserved = self._reservation(ticket, view, now)
            if held is not None:
                self._hold(ticket, held)
                if ticket.waiting_on_victims():
                    continue
            if ticket.policy is None:
                more = False
            else:
                key = (ticket.resources, ticket.pool, ticket.priority, tuple(ticket.labels.items()))
                if key in hopeless or not self._evaluate(ticket, view, now):
                    hopeless.add(key)
                    more = False
                elif ticket.hold_node is not None and ticket.hold_node != held:
                    if held is not None:
                        self._unhold(ticket, held)
                    self._hold(ticket, ticket.hold_node)
            if n >= 0 and more and i + 1 < len(lanes[n].tickets):
                heapq.heappush(heap, (lanes[n].tickets[i + 1].order, n, i + 1))
        if granted:
            for n, lane in enumerate(lanes):
                if reached[n]:
                    head = lane.tickets[: reached[n]]
                    lane.tickets[: reached[n]] = [t for t in head if t.grant is None]
            for ticket in held_list:  # granted on their own, maybe beyond where a lane was walked
                if ticket.grant is not None and ticket.lane is not None:
                    self._unqueue(ticket)
                    ticket.lane = None
            for empty in [k for k, lane in self._lanes.items() if not lane.tickets]:
                del self._lanes[empty]
            self._count -= len(granted)
            for priority, waits in waited.items():
                self.metrics.admitted_many(priority, waits)
            self._wake()
        return granted

    def _hold(self, ticket: Ticket, node: int) -> None:
        """The ticket keeps `node`'s room for itself while its victims stop."""
        ticket.hold_node = node
        self._avail.take(node, ticket.resources)
        self._held.add(ticket)

    def _unhold(self, ticket: Ticket, node: int) -> None:
        self._avail.give(node, ticket.resources)
        self._held.discard(ticket)

    def _reservation(self, ticket: Ticket, view: FreeIndex, now: float) -> tuple[int, float] | None:
        """The node where `ticket` could start soonest, and when: running grants end at their
        `ends` (one without is taken to end any moment, so nothing backfills before it).
        Nodes are looked at in order and a tie goes to the first, so a node stops being looked
        at once it could not start before the best so far (none can start before `now`)."""
        best: tuple[float, int] | None = None
        for node, capacity in enumerate(self.nodes):
            if best is not None and best[0] <= now:
                break
            if not ticket.resources.fits_in(capacity) or not _may_use(ticket, node):
                continue
            here = self._on_node.get(node, ())
            avail, start = view[node], now
            for g in sorted(here, key=lambda g: now if g.ends is None else g.ends):
                if ticket.resources.fits_in(avail) or (best is not None and start >= best[0]):
                    break
                avail, start = avail + g.resources, max(start, g.ends or now)
            if ticket.resources.fits_in(avail) and (best is None or (start, node) < best):
                best = (start, node)
        return None if best is None else (best[1], best[0])

    def _place(self, ticket: Ticket, now: float, barred: int | None) -> Grant | None:
        """A grant for `ticket` on the roomiest node that holds it, never on node `barred`
        (reserved for a request ahead): a parked group it may reuse, fresh resources, or
        resources of parked groups reclaimed."""
        need = ticket.resources
        room = self._quota_room(ticket.pool) if self._quota else None
        if ticket.reuse is not None:
            taken = self._reuse(ticket, room, barred)
            if taken is not None:
                return taken
        if room is None or need.fits_in(room):
            if ticket.nodes is None:  # `_roomiest_of`, without the call in the common case
                node = self._avail.roomiest(need, barred)
            else:
                node = self._roomiest_of(ticket, barred)
            if node is not None:
                return self._new_grant(ticket, node, need, now)
        return self._reclaim_for(ticket, room, now, barred) if self._parked else None

    def _roomiest_of(self, ticket: Ticket, barred: int | None) -> int | None:
        """The roomiest node that holds `ticket`, never `barred`, only among its `nodes` when
        it names them (a job's partition: a few nodes, looked at one by one)."""
        if ticket.nodes is None:
            return self._avail.roomiest(ticket.resources, barred)
        fits = [
            n
            for n in sorted(ticket.nodes)
            if n != barred and n < len(self.nodes) and self._avail.holds(n, ticket.resources)
        ]
        return max(fits, key=self._avail.cpus, default=None)

    def _reuse(self, ticket: Ticket, room: Resources | None, barred: int | None) -> Grant | None:
        """Best fit among parked groups of the same tag: the exact shape, else fresh resources
        when they are free, else the smallest parked group that holds the request."""
        promised = self._promised(ticket)
        fitting = [
            g
            for g in self._parked
            if g.tag == ticket.reuse
            and ticket.resources.fits_in(g.resources)
            and _may_use(ticket, g.node)
            and g not in promised
        ]
        if not fitting:
            return None
        best = min(fitting, key=lambda g: _size(g.resources))
        fresh_ok = room is None or ticket.resources.fits_in(room)
        if (
            best.resources != ticket.resources
            and fresh_ok
            and self._roomiest_of(ticket, barred) is not None
        ):
            return None
        self._parked_del(best)
        best.released = True  # taken over whole: its resources stay granted
        grant = self._new_grant(ticket, best.node, best.resources, self.clock(), take=False)
        grant.reused = best
        return grant

    def _reclaim_for(
        self, ticket: Ticket, room: Resources | None, now: float, barred: int | None
    ) -> Grant | None:
        """Free parked groups (on one node, and of the same pool when the quota is short)."""
        need = ticket.resources
        if not self._parked:
            return None
        view = self._avail
        promised = self._promised(ticket)
        parked = [g for g in self._parked if g not in promised]
        pool_parked = [g for g in parked if g.pool == ticket.pool]
        if room is not None and not need.fits_in(_sum([room, *(g.resources for g in pool_parked)])):
            return None
        by_node: dict[int, list[Grant]] = {}
        for g in parked:
            by_node.setdefault(g.node, []).append(g)
        for node in sorted(by_node):
            here = by_node[node]
            if (
                node == barred
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
                self._parked_del(g)
                self.release(g)  # its resources are free on the node again
                if g.on_reclaim is not None:
                    g.on_reclaim(g, "reclaimed")
            room = self._quota_room(ticket.pool)
            if need.fits_in(view[node]) and (room is None or need.fits_in(room)):
                return self._new_grant(ticket, node, need, now)
        return None

    def _evaluate(self, ticket: Ticket, view: FreeIndex, now: float) -> bool:
        """`_preempt`, timed for the metrics (ScheduleMesh's evaluation latency)."""
        started = time.perf_counter()
        chosen = self._preempt(ticket, view, now)
        self.metrics.preempt_evaluated(time.perf_counter() - started)
        return chosen

    def _promised(self, ticket: Ticket) -> set[Grant]:
        """Parked groups of victims whose preemptor still waits: what a victim frees is its
        preemptor's alone, parked for reuse or not (a roles victim's group is parked as it is
        killed), so no other request reuses or reclaims it meanwhile."""
        return {v for t in self._held if t is not ticket for v in t.victims if v.tag is not None}

    def _preempt(self, ticket: Ticket, view: FreeIndex, now: float) -> bool:
        """Choose victims by the ticket's policy and tell them; False when none would do.

        Nodes whose free resources and victims are alike (same kinds, as many of each) offer
        the same choice: only the first of them is searched (a later one never wins a tie)."""
        assert ticket.policy is not None
        me = pol.Party(ticket.priority, ticket.pool, ticket.labels)
        reasons: dict[tuple[object, ...], str] = {}
        for party, count in self._parties.items():
            if count:
                reason = pol.preemption_reason(me, self._party_of[party], ticket.policy)
                if reason is not None:
                    reasons[party] = reason
        if not reasons:
            return False
        room = self._quota_room(ticket.pool)
        pool_mates = room is not None and not ticket.resources.fits_in(room)
        seen: set[tuple[object, ...]] = set()
        best: tuple[tuple[object, ...], int, list[pol.Candidate]] | None = None
        for node in range(len(self.nodes)) if pool_mates else self._first_of_each_look():
            base = view[node] + self._parked_on.get(node, Resources())
            if pool_mates:
                here = [
                    g
                    for victims in self._node_victims.values()
                    for g in victims
                    if _party_key(g) in reasons and (g.node == node or g.pool == ticket.pool)
                ]
            else:
                kinds = frozenset(
                    (k, n) for k, n in self._node_kinds[node].items() if n and k[:3] in reasons
                )
                if not kinds or (base, kinds) in seen:
                    continue
                seen.add((base, kinds))
                here = [g for g in self._node_victims[node] if _party_key(g) in reasons]
            cands = [_candidate(g, now) for g in here]
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
            reason = reasons[_party_key(g)]
            g.preempted, g.preempted_at = reason, now
            self._not_victim(g)
            self.metrics.preempted(g.pool, reason)
            assert g.on_preempt is not None
            g.on_preempt(g, reason)
        ticket.victims = victims
        ticket.hold_node = node
        return True

    def _first_of_each_look(self) -> list[int]:
        """One node of each look (free resources, parked groups and victims alike), the lowest
        numbered, in order: any other node of a look offers the same victims, and a later node
        never wins a tie. Looks are brought up to date for the nodes changed since last time."""
        for node in self._avail.dirty:
            old = self._look.pop(node, None)
            if old is not None:
                self._alike[old].discard(node)
                if not self._alike[old]:
                    del self._alike[old]
            kinds = self._node_kinds.get(node)
            if kinds:
                base = self._avail[node] + self._parked_on.get(node, Resources())
                look = (base, frozenset(kinds.items()))
                self._look[node] = look
                self._alike.setdefault(look, set()).add(node)
        self._avail.dirty.clear()
        return sorted(min(nodes) for nodes in self._alike.values())

    def _parked_add(self, grant: Grant) -> None:
        self._parked.append(grant)
        self._parked_on[grant.node] = self._parked_on.get(grant.node, Resources()) + grant.resources
        self._avail.dirty.add(grant.node)

    def _parked_del(self, grant: Grant) -> None:
        self._parked.remove(grant)
        self._parked_on[grant.node] = self._parked_on[grant.node] - grant.resources
        self._avail.dirty.add(grant.node)

    # --- bookkeeping ----------------------------------------------------------------------

    def _new_grant(
        self, ticket: Ticket, node: int, resources: Resources, now: float, take: bool = True
    ) -> Grant:
        if take:
            self._avail.take(node, resources)
            if ticket.pool in self._used:
                self._used[ticket.pool] = self._used[ticket.pool] + resources
        return Grant(
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
            # positional, as all above: keywords make a class call build a dict
            None if ticket.duration is None else now + ticket.duration,
            ticket.estimated,
        )

    def _preemptible(self, grant: Grant) -> None:
        """A grant with `on_preempt` was admitted: it may be chosen as a victim from now on."""
        party = _party_key(grant)
        if party not in self._party_of:
            self._party_of[party] = pol.Party(grant.priority, grant.pool, grant.labels)
        self._parties[party] += 1
        self._node_victims.setdefault(grant.node, {})[grant] = None
        self._node_kinds.setdefault(grant.node, Counter())[_victim_kind(grant)] += 1
        self._avail.dirty.add(grant.node)

    def _unrun(self, grant: Grant) -> None:
        """The grant no longer runs (released or parked)."""
        here = self._on_node.get(grant.node)
        if here is not None:
            here.discard(grant)
        if grant.on_preempt is not None:  # only those are ever victims (`_preemptible`)
            self._not_victim(grant)

    def _not_victim(self, grant: Grant) -> None:
        """The grant can no longer be chosen as a victim (chosen already, or not running)."""
        victims = self._node_victims.get(grant.node)
        if victims is None or grant not in victims:
            return
        del victims[grant]
        self._parties[_party_key(grant)] -= 1
        self._avail.dirty.add(grant.node)
        kinds, kind = self._node_kinds[grant.node], _victim_kind(grant)
        kinds[kind] -= 1
        if not kinds[kind]:
            del kinds[kind]
        if not victims:
            del self._node_victims[grant.node], self._node_kinds[grant.node]

    def _unqueue(self, ticket: Ticket) -> bool:
        """Take the ticket out of its lane; False when it was not there."""
        lane = ticket.lane
        if lane is None:
            return False
        i = bisect.bisect_left(lane.tickets, ticket.order, key=lambda t: t.order)
        if i < len(lane.tickets) and lane.tickets[i] is ticket:
            del lane.tickets[i]
            if not lane.tickets and self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]
            return True
        return False

    def _drop(self, ticket: Ticket) -> None:
        """A waiting ticket gives up (withdrawn, timed out): out of the queue, its hold freed."""
        if self._unqueue(ticket):
            self._count -= 1
        if ticket.hold_node is not None and ticket in self._held:
            self._unhold(ticket, ticket.hold_node)
            ticket.hold_node = None
        ticket.lane = None

    def _wake(self) -> None:
        """Wake the threads waiting in `acquire`, if any (a simulation has none: it skips the
        condition's bookkeeping on every release)."""
        if self._sleepers:
            self._cond.notify_all()

    def _victim_done(self, grant: Grant) -> None:
        if grant.preempted_at is not None:
            seconds = self.clock() - grant.preempted_at
            self.metrics.preempt_done(seconds, grant.pool, grant.preempted or "")
            grant.preempted_at = None

    def _quota_room(self, pool: str) -> Resources | None:
        quota = self._quota.get(pool)
        if quota is None:
            return None
        return quota - self._used.get(pool, Resources())


def _may_use(ticket: Ticket, node: int) -> bool:
    """Whether `node` is one the ticket may run on (its `nodes`, when it names them)."""
    return ticket.nodes is None or node in ticket.nodes


def _party_key(g: Grant) -> tuple[object, ...]:
    return (g.priority, g.pool, tuple(sorted(g.labels.items())))


def _victim_kind(g: Grant) -> tuple[object, ...]:
    """What tells victims apart when choosing (`_candidate`): grants of one kind on one node
    are interchangeable. Starts with the party key."""
    lost_from = None if g.saves_state else g.since
    left_from = None if g.estimated is None else (g.estimated, g.since)  # work left ranks them
    return (*_party_key(g), g.resources, g.elastic, lost_from, left_from)


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
