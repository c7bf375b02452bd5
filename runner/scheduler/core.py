"""Admission by priority against per-node capacity, shared by every stage of a run.

Ray has no priorities: whoever asks first gets the CPUs. Here every resource claim (a pool
worker, a job, a shard, a role replica) is a `Request` (`scheduler/request.py`) that waits in
one queue ordered by priority plus an ageing bonus, so low priority cannot starve forever.
Requests that do not fit are passed over for smaller ones behind them (backfill), except past a
request that asked for a reservation (a job): the first of those that does not fit reserves the
node where it could start soonest, by the `duration` (time limit) of the grants there, and a
request behind it lands on that node only when its own duration ends it before then, as
Slurm's backfill does; one without a duration never does. An `exclusive` request takes a whole
empty node (and reserves one the same way when none is empty). Pools may have quotas. A request
that carries a preemption `Policy` may take the resources of preemptible grants (`on_preempt`):
the victims are told, the request holds its node until they give their resources back. A grant
may also be parked (an idle placement group kept for reuse): any request may reclaim it, and
requests with the same `reuse` tag take it over whole, best fit first; what a victim frees,
parked or not, is its waiting preemptor's alone (`_promised`). A grant may be lent (`lend`: a
reserved group to a role replica): the unit's own grant over the lender's resources, a victim
by the normal rules, whose release gives nothing back (the lender's does).

One admission pass (`admit`) walks the waiting tickets in queue order (`_Merge`: the lanes of
requests that ask alike, merged) and for each one: places it (`_place`: fresh resources, a
parked group it reuses, or parked groups reclaimed), else notes its reservation and tries
preemption (`_refused`, `_preempt`).

The core is pure Python and never blocks: the executor, and a simulated cluster in virtual
time, drive it through `clock`, `submit`, `admit` and `release`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from runner.resources import NOTHING, Resources, total
from runner.scheduler import policy as pol
from runner.scheduler.capacity import FreeIndex
from runner.scheduler.metrics import REGISTRY, Metrics
from runner.scheduler.request import Request

# priority points a waiting request gains per second of waiting
AGEING_PER_SECOND = 0.01
# victim choices remembered (`Scheduler._choose`), forgotten all at once beyond this; and the
# most candidates a remembered choice was made among
CHOICES_KEPT, CHOICE_CANDIDATES = 4096, 64

# called under the scheduler's lock: must only record, never block or call the scheduler
Notify = Callable[["Grant", str], None]


@dataclass(eq=False, slots=True)
class Grant:
    """A request's resources on one node, until released (or parked)."""

    owner: str
    request: Request
    # what it runs with: the request's resources, or the whole parked group it took over
    resources: Resources
    # what it keeps from everyone else on its node: `resources`, or the whole node for an
    # exclusive request (Ray is told only `resources`: the unit runs with what it asked for)
    holds: Resources
    node: int
    waited: float
    since: float
    # when it will have ended at the latest (its request's duration), if it has one
    ends: float | None = None
    # told (victim, reason) when it is chosen as a victim; None: it is never one
    on_preempt: Notify | None = None
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
    # the ticket it was evicted for (or its lent grant was): what it frees on the node that
    # ticket holds is that ticket's, out of everyone else's view
    preemptor: Ticket | None = None
    # what tells it apart from other victims (`_victim_kind`), made once: it never changes
    kind: tuple[object, ...] | None = None


@dataclass(eq=False, slots=True)
class Ticket:
    """A request waiting for one owner; `grant` is set once it is admitted."""

    owner: str
    request: Request
    since: float
    # queue order: ageing adds the same bonus per second to all, so this never changes
    order: tuple[float, int]
    # the request's grant is a victim to be told through this (None unless preemptible)
    on_preempt: Notify | None = None
    grant: Grant | None = None
    # victims told to make room for this ticket, the node it holds meanwhile, and what it
    # holds there: what was free when it chose them (up to its need), then what they free
    victims: Sequence[Grant] = ()
    hold_node: int | None = None
    lane: _Lane | None = field(default=None, repr=False)
    holding: Resources | None = None

    def waiting_on_victims(self) -> bool:
        return any(not v.released and v.tag is None for v in self.victims)


@dataclass(eq=False, slots=True)
class _Lane:
    """Waiting tickets that ask alike (shape, pool, labels, policy, priority...), in queue order.

    Within a pass every ticket of a lane meets the same answer until one is granted, so a pass
    walks the lanes merged by queue order and leaves a lane at its first refusal that nothing
    further can come of (no preemption, no reservation), instead of walking every ticket."""

    key: tuple[object, ...]
    # what decides whether a ticket fits (resources, pool, reuse, nodes, exclusive), as a small
    # number: a pass remembers the shapes refused so far, and tells them apart on every ticket
    shape: int
    # no reuse tag, no node list, not exclusive: placed straight from the free index
    simple: bool
    tickets: list[Ticket] = field(default_factory=list)


def _order(ticket: Ticket) -> tuple[float, int]:
    return ticket.order


class _Merge:
    """The waiting tickets of one pass in queue order: the lanes merged by a heap of lane heads,
    and the tickets that hold a node for their victims (`held`), each visited on its own.

    After a ticket, `leave = True` says nothing more can come of its lane in this pass: the
    lane's further tickets are not visited. A lane is mostly walked in runs: its next ticket is
    taken at once while it comes before every other lane's head, without the heap."""

    def __init__(self, lanes: list[_Lane], held: list[Ticket]) -> None:
        self.lanes, self.held = lanes, held
        # how far each lane was walked (its tickets before that may have been granted)
        self.reached = [0] * len(lanes)
        self.leave = False

    def __iter__(self) -> Iterator[Ticket]:
        lanes, held, reached = self.lanes, self.held, self.reached
        # (order, lane number, index in lane); a held ticket is lane -1 - its index in `held`
        heap = [(lane.tickets[0].order, n, 0) for n, lane in enumerate(lanes)]
        heap += [(t.order, -1 - i, 0) for i, t in enumerate(held)]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, n, i = pop(heap)
            if n < 0:
                ticket = held[-1 - n]
                if ticket.grant is None and ticket.lane is not None:
                    yield ticket
                    self.leave = False
                continue
            tickets = lanes[n].tickets
            end = len(tickets)
            while i < end:
                ticket = tickets[i]
                i += 1
                if ticket.hold_node is not None or ticket.grant is not None:
                    continue  # held at the start of the pass: visited on its own
                reached[n] = i
                yield ticket
                if self.leave:
                    self.leave = False
                    break
                if i < end and heap and heap[0][0] <= tickets[i].order:
                    push(heap, (tickets[i].order, n, i))  # another lane's head comes first
                    break


@dataclass(eq=False, slots=True)
class _Pass:
    """What one admission pass has decided and learnt so far."""

    now: float
    # a pool has a quota: every request is placed through `_place_any`, which minds it
    quotas: bool
    granted: list[Ticket] = field(default_factory=list)
    # what each admitted ticket waited, by priority in the order first admitted (the metrics
    # are told once a pass, `admitted_many`)
    waited: dict[float, list[float]] = field(default_factory=dict)
    # (lane shape, barred from the reserved node) refused so far, as one number:
    # shape * 2 + barred; a ticket of a refused shape is not placed again in this pass
    failed: set[int] = field(default_factory=set)
    # preemptors (resources, pool, priority, labels) that found no victims in this pass
    hopeless: set[tuple[object, ...]] = field(default_factory=set)
    # (node, earliest start) held for the first reserving request that did not fit
    reserved: tuple[int, float] | None = None

    def barred(self, request: Request) -> int | None:
        """The reserved node, to a request that would still run when the reservation starts
        (or has no duration to tell); None when it may go anywhere."""
        reserved = self.reserved
        if reserved is None:
            return None
        duration = request.duration
        if duration is not None and self.now + duration <= reserved[1]:
            return None
        return reserved[0]


@dataclass
class Scheduler:
    """Grants resource requests by priority; thread-safe; time comes from `clock`."""

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
    # parked groups in the order they were parked (a dict: removed in O(1), order kept), and
    # the same by tag and shape (`_reuse`) and by node (`_reclaim_for`): a lookup per
    # admission must not walk every parked group (tens of thousands at scale)
    _parked: dict[Grant, None] = field(default_factory=dict, init=False)
    _parked_by_tag: dict[str, dict[Resources, dict[Grant, None]]] = field(
        default_factory=dict, init=False
    )
    _parked_at: dict[int, dict[Grant, None]] = field(default_factory=dict, init=False)
    _parked_seq: dict[Grant, int] = field(default_factory=dict, init=False)
    _parked_count: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _quota: dict[str, Resources] = field(default_factory=dict, init=False)
    # what is granted to each pool that has a quota (others are not counted)
    _used: dict[str, Resources] = field(default_factory=dict, init=False)
    # held by every public method (reentrant: `release` is called under it too)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, init=False)
    # shared by several loops (a sweep's jobs side by side): whose each ticket is, and the
    # tickets granted by one tenant's `admit` that are another's, until that one asks
    _tenant_of: dict[Ticket, object] = field(default_factory=dict, init=False)
    _granted_for: dict[object, list[Ticket]] = field(default_factory=dict, init=False)
    # victim choices by what they depend on (`_choose`): positions among the candidates
    _choices: dict[tuple[object, ...], list[int] | None] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.nodes)
        self._avail = FreeIndex(self.nodes)

    # --- asking and giving back -----------------------------------------------------------

    def submit(
        self,
        request: Request,
        owners: Sequence[str],
        on_preempt: Notify | None = None,
        tenant: object = None,
    ) -> list[Ticket]:
        """Queue `request` once for each of `owners` (one, or a stage's units that ask alike),
        a ticket each, in order, at one reading of the clock; `admit()` grants them later.
        A preemptible request's grants are told through `on_preempt` when chosen as victims.
        A scheduler shared by several loops knows each one's tickets by its `tenant`."""
        if request.preemptible and on_preempt is None:
            raise ValueError("a preemptible request needs on_preempt, to tell its victims")
        if request.exclusive and (request.policy is not None or request.reuse is not None):
            raise ValueError("an exclusive request neither preempts nor reuses parked groups")
        if not owners:
            return []
        notify = on_preempt if request.preemptible else None
        with self._lock:
            since = self.clock()
            lane = self._lane_of(request)
            # queue order: one clock reading, so the tickets follow one another by arrival
            first = -(request.priority - AGEING_PER_SECOND * since)
            tickets = [
                # positional, all fields: keywords and defaults cost per ticket
                Ticket(owner, request, since, (first, seq), notify, None, (), None, lane)
                for owner, seq in zip(owners, self._seq, strict=False)  # `_seq` never ends
            ]
            queue = lane.tickets
            if not queue or queue[-1].order < tickets[0].order:
                queue += tickets
            else:
                for ticket in tickets:
                    bisect.insort(queue, ticket, key=_order)
            self._count += len(tickets)
            if tenant is not None:
                self._tenant_of.update(dict.fromkeys(tickets, tenant))
            return tickets

    def _lane_of(self, request: Request) -> _Lane:
        """The lane of requests that ask alike, keyed by the request's amounts (a `Resources`
        hash is a Python call) and what else orders or places it."""
        r, labels = request.resources, request.labels
        key = (
            r.cpus,
            r.gpus,
            r.memory,
            r.custom,
            request.pool,
            request.reuse,
            tuple(sorted(labels.items())) if labels else (),
            id(request.policy),
            request.priority,
            request.reserve,
            request.duration,
            request.nodes,
            request.exclusive,
        )
        lane = self._lanes.get(key)
        if lane is None:
            shape = (r, request.pool, request.reuse, request.nodes, request.exclusive)
            number = self._shapes.setdefault(shape, len(self._shapes))
            simple = request.reuse is None and request.nodes is None and not request.exclusive
            lane = self._lanes[key] = _Lane(key, number, simple)
        return lane

    def admit(self, tenant: object = None) -> list[Ticket]:
        """Grant what can be granted now; the tickets admitted by this call (for a `tenant`:
        its own, including those another tenant's call admitted since it last asked)."""
        with self._lock:
            granted = self._admit()
            if not self._tenant_of and not self._granted_for:
                return granted
            for ticket in granted:
                owner = self._tenant_of.pop(ticket, None)
                self._granted_for.setdefault(owner, []).append(ticket)
            return self._granted_for.pop(tenant, [])

    def tenants_hold(self, tenant: object, mine: Callable[[Grant], bool]) -> bool:
        """Whether grants that are not `tenant`'s (`mine` says which are) hold resources, or
        tickets of other tenants wait: a loop that shares the scheduler is not stuck while
        another's units may still end and free what it waits for."""
        with self._lock:
            if any(t is not tenant for t in self._tenant_of.values()):
                return True
            return any(not mine(g) for here in self._on_node.values() for g in here)

    def withdraw(self, ticket: Ticket) -> None:
        """Stop waiting (or give back what the ticket was granted)."""
        with self._lock:
            self._tenant_of.pop(ticket, None)
            if ticket.grant is not None:
                self.release(ticket.grant)
            else:
                self._drop(ticket)

    def release(self, grant: Grant) -> None:
        """Give a grant's resources back; a second release is a no-op. The scheduler's own
        releases call this too, under the lock they hold already (it is reentrant): one call
        per release, not a public one and a private one."""
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
                taker = grant.preemptor
                if taker is not None and taker.hold_node == grant.node and taker in self._held:
                    # a victim's resources go to its preemptor, never through the free index
                    taker.holding = (taker.holding or NOTHING) + grant.holds
                else:
                    self._avail.give(grant.node, grant.holds)
                pool = grant.request.pool
                if pool in self._used:
                    self._used[pool] = self._used[pool] - grant.holds
            if grant.preempted_at is not None:
                self._victim_done(grant)

    def lend(
        self, lender: Grant, request: Request, owner: str, on_preempt: Notify | None = None
    ) -> Grant:
        """A unit's own grant over what `lender` holds (a reserved placement group lent to a
        replica, `request` the replica's): preemptible by the normal rules like any grant of
        that unit. Released, it gives nothing back, for the resources stay the lender's; so
        when it is chosen as a victim, its lender must be released too for the preemptor to
        have them."""
        if request.preemptible and on_preempt is None:
            raise ValueError("a preemptible request needs on_preempt, to tell its victims")
        with self._lock:
            now = self.clock()
            duration = request.duration
            grant = Grant(
                owner,
                request,
                lender.resources,
                lender.holds,
                lender.node,
                0.0,
                now,
                None if duration is None else now + duration,
                on_preempt if request.preemptible else None,
                lender=lender,
            )
            self._on_node.setdefault(grant.node, set()).add(grant)
            if grant.on_preempt is not None:
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

    def set_quota(self, pool: str, resources: Resources) -> None:
        """At most `resources` may be granted to requests of `pool` at once."""
        with self._lock:
            self._quota[pool] = resources
            if pool not in self._used:  # counted from now on: what it holds already, first
                running = [g for here in self._on_node.values() for g in here]
                held = [
                    g.holds
                    for g in (*running, *self._parked)
                    if g.request.pool == pool and g.lender is None  # a lent one: its lender's
                ]
                self._used[pool] = total(held)

    def set_capacity(self, node: int, capacity: Resources) -> None:
        """A node's capacity changed (zero: it left the cluster); grants on it stay until
        released, so its free resources may be negative meanwhile."""
        with self._lock:
            self._avail[node] = self._avail[node] + (capacity - self.nodes[node])
            self.nodes[node] = capacity

    def add_node(self, capacity: Resources) -> int:
        """A node joined; its index."""
        with self._lock:
            self.nodes.append(capacity)
            self._avail.append(capacity)
            return len(self.nodes) - 1

    # --- looking --------------------------------------------------------------------------

    def free(self) -> Resources:
        """What is not granted now, summed over nodes (parked groups count as granted)."""
        with self._lock:
            return total([self._avail.total(), *(t.holding or Resources() for t in self._held)])

    def waiting(self) -> int:
        with self._lock:
            return self._count

    def running(self) -> list[Grant]:
        with self._lock:
            return [g for here in self._on_node.values() for g in here]

    # --- admission: one pass, then each ticket placed, or refused ------------------------

    def _admit(self) -> list[Ticket]:
        """One pass over the waiting tickets in queue order (`_Merge`): each is placed, or
        else reserves and preempts (`_decide`); the granted then leave their lanes."""
        p = _Pass(self.clock(), bool(self._quota))
        lanes = [lane for lane in self._lanes.values() if lane.tickets]
        merge = _Merge(lanes, sorted(self._held, key=_order))
        decide = self._decide
        for ticket in merge:
            if not decide(ticket, p):
                merge.leave = True
        if p.granted:
            self._settle(p, merge)
        return p.granted

    def _decide(self, ticket: Ticket, p: _Pass) -> bool:
        """Grant the ticket if it can be placed now (a ticket holding a node for its victims
        may be granted what it holds), else `_refused`. False when nothing more can come of
        its lane in this pass."""
        held = ticket.hold_node
        if held is None:
            barred = None if p.reserved is None else p.barred(ticket.request)
        else:
            self._unhold(ticket, held)  # what it held is its own to be granted
            barred = None
        lane = ticket.lane
        assert lane is not None
        shape = lane.shape * 2 + (barred is not None)
        if held is not None or shape not in p.failed:
            if lane.simple and not p.quotas:
                grant = self._place(ticket, p.now, barred)
            else:
                grant = self._place_any(ticket, p.now, barred)
            if grant is not None:
                self._granted(ticket, grant, p)
                if held is None:
                    ticket.lane = None  # out of its lane at `_settle` (a held one: there)
                return True
            if held is None:
                p.failed.add(shape)
        return self._refused(ticket, held, p)

    def _granted(self, ticket: Ticket, grant: Grant, p: _Pass) -> None:
        """The ticket is admitted: its grant runs on its node (a victim from now on, when
        preemptible), and the pass counts it."""
        ticket.grant = grant
        if ticket.victims:
            ticket.victims = ()
        ticket.hold_node = ticket.holding = None
        here = self._on_node.get(grant.node)
        if here is None:
            here = self._on_node[grant.node] = set()
        here.add(grant)
        if grant.on_preempt is not None:
            self._preemptible(grant)
        p.granted.append(ticket)
        priority = ticket.request.priority
        waits = p.waited.get(priority)
        if waits is None:
            waits = p.waited[priority] = []
        waits.append(grant.waited)

    def _refused(self, ticket: Ticket, held: int | None, p: _Pass) -> bool:
        """A ticket that was not placed: the first one that asks for a reservation makes the
        pass's; one that held a node holds it again while its victims stop; one with a
        policy looks for victims. False when nothing more can come of its lane this pass."""
        request = ticket.request
        if held is None and p.reserved is None and request.reserve:
            p.reserved = self._reservation(request, p.now)
        if held is not None:
            self._hold(ticket, held)
            if ticket.waiting_on_victims():
                return True
        if request.policy is None:
            return False
        key = (request.resources, request.pool, request.priority, tuple(request.labels.items()))
        if key in p.hopeless or not self._evaluate(ticket, p.now):
            p.hopeless.add(key)
            return False
        node = ticket.hold_node
        if node is not None and node != held:  # its victims are elsewhere: hold that node
            if held is not None:
                self._unhold(ticket, held)
                ticket.holding = None  # what it holds there is found anew
            self._hold(ticket, node)
        return True

    def _settle(self, p: _Pass, merge: _Merge) -> None:
        """After a pass that granted: the granted leave their lanes, empty lanes go, the
        metrics are told."""
        for lane, reached in zip(merge.lanes, merge.reached, strict=True):
            if reached:
                head = lane.tickets[:reached]
                lane.tickets[:reached] = [t for t in head if t.grant is None]
        for ticket in merge.held:  # granted on their own, maybe beyond where a lane was walked
            if ticket.grant is not None and ticket.lane is not None:
                self._unqueue(ticket)
                ticket.lane = None
        for empty in [k for k, lane in self._lanes.items() if not lane.tickets]:
            del self._lanes[empty]
        self._count -= len(p.granted)
        for priority, waits in p.waited.items():
            self.metrics.admitted_many(priority, waits)

    def _hold(self, ticket: Ticket, node: int) -> None:
        """The ticket keeps `node`'s room for itself while its victims stop: what is free
        there when it first holds it (up to its need), and what its victims free as they go
        (`release`). Not its whole need at once: its victims' resources are not free yet, and
        counting them as taken too would make the next preemptor on the node evict twice
        what it needs, and keep the ticket from what its victims gave back."""
        ticket.hold_node = node
        if ticket.holding is None:
            ticket.holding = _within(ticket.request.resources, self._avail[node])
        self._avail.take(node, ticket.holding)
        self._held.add(ticket)

    def _unhold(self, ticket: Ticket, node: int) -> None:
        if ticket.holding is not None:
            self._avail.give(node, ticket.holding)
        self._held.discard(ticket)

    # --- placing --------------------------------------------------------------------------

    def _place(self, ticket: Ticket, now: float, barred: int | None) -> Grant | None:
        """A plain request (no quota anywhere, no reuse tag, no node list, not exclusive): on
        the roomiest node that holds it, never `barred`, else on parked groups reclaimed.
        The free index finds the node and takes from it in one call: this runs once per
        decision."""
        resources = ticket.request.resources
        node = self._avail.place(resources, barred)
        if node is None:
            return self._reclaim_for(ticket, None, now, barred) if self._parked else None
        return self._new_grant(ticket, node, now, resources, resources)

    def _place_any(self, ticket: Ticket, now: float, barred: int | None) -> Grant | None:
        """`_place` for any request, never on `barred`: a parked group it may reuse, fresh
        resources (`_fresh_node`), or parked groups reclaimed, within its pool's quota."""
        request = ticket.request
        room = self._quota_room(request.pool) if self._quota else None
        if request.reuse is not None:
            taken = self._reuse(ticket, room, barred, now)
            if taken is not None:
                return taken
        node = self._fresh_node(request, room, barred)
        if node is not None:
            return self._take(ticket, node, now)
        return self._reclaim_for(ticket, room, now, barred) if self._parked else None

    def _fresh_node(
        self, request: Request, room: Resources | None, barred: int | None
    ) -> int | None:
        """Where `request` fits in free resources now, never `barred`: the roomiest node that
        holds it (only among its `nodes` when it names them), or for an exclusive request the
        smallest empty node; None when none does, or its pool's quota (`room`) is short."""
        if request.exclusive:
            return self._empty_node(request, room, barred)
        if room is not None and not request.resources.fits_in(room):
            return None
        return self._roomiest_of(request, barred)

    def _roomiest_of(self, request: Request, barred: int | None) -> int | None:
        """The roomiest node that holds `request`, never `barred`, only among its `nodes` when
        it names them (a job's partition: a few nodes, looked at one by one)."""
        if request.nodes is None:
            return self._avail.roomiest(request.resources, barred)
        fits = [
            n
            for n in sorted(request.nodes)
            if n != barred and n < len(self.nodes) and self._avail.holds(n, request.resources)
        ]
        return max(fits, key=self._avail.cpus, default=None)

    def _empty_node(
        self, request: Request, room: Resources | None, barred: int | None
    ) -> int | None:
        """For an exclusive request: the smallest node that holds it with nothing granted or
        held there (the lowest numbered among equals), never `barred`, within the quota."""
        nodes = self.nodes
        candidates = range(len(nodes)) if request.nodes is None else sorted(request.nodes)
        empty = [
            n
            for n in candidates
            if n != barred
            and n < len(nodes)
            and request.resources.fits_in(nodes[n])
            and (room is None or nodes[n].fits_in(room))
            and self._avail.holds(n, nodes[n])
        ]
        return min(empty, key=lambda n: _size(nodes[n]), default=None)

    def _take(self, ticket: Ticket, node: int, now: float) -> Grant:
        """Grant the ticket fresh resources on `node`: its own, or the whole node for an
        exclusive request, taken from the node's free resources and its pool's quota."""
        request = ticket.request
        holds = self.nodes[node] if request.exclusive else request.resources
        self._avail.take(node, holds)
        if request.pool in self._used:
            self._used[request.pool] = self._used[request.pool] + holds
        return self._new_grant(ticket, node, now, request.resources, holds)

    def _new_grant(
        self, ticket: Ticket, node: int, now: float, resources: Resources, holds: Resources
    ) -> Grant:
        """The one place an admitted grant is made (a lent one: `lend`): what it holds is
        already taken by the caller."""
        duration = ticket.request.duration
        return Grant(  # positional: keywords make a class call build a dict
            ticket.owner,
            ticket.request,
            resources,
            holds,
            node,
            now - ticket.since,
            now,
            None if duration is None else now + duration,
            ticket.on_preempt,
        )

    def _need(self, request: Request, node: int) -> Resources:
        """What `request` takes of `node`: its resources, or the whole node when exclusive."""
        return self.nodes[node] if request.exclusive else request.resources

    def _reservation(self, request: Request, now: float) -> tuple[int, float] | None:
        """The node where `request` could start soonest, and when (`_start_on`). Nodes are
        looked at in order and a tie goes to the first, so a node stops being looked at once
        it could not start before the best so far (none can start before `now`)."""
        best: tuple[float, int] | None = None
        for node, capacity in enumerate(self.nodes):
            if best is not None and best[0] <= now:
                break
            if not request.resources.fits_in(capacity) or not _may_use(request, node):
                continue
            # an exclusive request counts the node's parked groups as free: it reclaims them
            free = self._base(node) if request.exclusive else self._avail[node]
            need = self._need(request, node)
            start = self._start_on(node, need, free, now, None if best is None else best[0])
            if start is not None and (best is None or (start, node) < best):
                best = (start, node)
        return None if best is None else (best[1], best[0])

    def _start_on(
        self, node: int, need: Resources, free: Resources, now: float, beat: float | None
    ) -> float | None:
        """When `need` would be free on `node` (`free` there now) as its grants end at their
        `ends` (one without is taken to end any moment, so nothing backfills before it); None
        when not before `beat` (the best start found elsewhere), or never."""
        avail, start = free, now
        here = self._on_node.get(node, ())
        for g in sorted(here, key=lambda g: now if g.ends is None else g.ends):
            if need.fits_in(avail) or (beat is not None and start >= beat):
                break
            avail, start = avail + g.holds, max(start, g.ends or now)
        return start if need.fits_in(avail) else None

    # --- parked groups: reused whole, or reclaimed ---------------------------------------

    def _reuse(
        self, ticket: Ticket, room: Resources | None, barred: int | None, now: float
    ) -> Grant | None:
        """Best fit among parked groups of the same tag: the exact shape, else fresh resources
        when they are free, else the smallest parked group that holds the request."""
        request = ticket.request
        shapes = self._parked_by_tag.get(request.reuse) if request.reuse is not None else None
        if not shapes:
            return None
        # the smallest shape that holds the request, and among equals the first parked: for
        # each shape that holds it, its first usable group (parked order), then the least
        best: Grant | None = None
        best_key: tuple[float, int] = (math.inf, 0)
        for shape, parked in shapes.items():
            if not request.resources.fits_in(shape):
                continue
            for g in parked:
                if not _may_use(request, g.node):
                    continue
                if not self._promised(g, ticket):
                    key = (_size(shape), self._parked_seq[g])
                    if key < best_key:
                        best, best_key = g, key
                    break
        if best is None:
            return None
        fresh_ok = room is None or request.resources.fits_in(room)
        if (
            best.resources != request.resources
            and fresh_ok
            and self._roomiest_of(request, barred) is not None
        ):
            return None
        self._parked_del(best)
        best.released = True  # taken over whole: its resources stay granted
        grant = self._new_grant(ticket, best.node, now, best.resources, best.holds)
        grant.reused = best
        return grant

    def _reclaim_for(
        self, ticket: Ticket, room: Resources | None, now: float, barred: int | None
    ) -> Grant | None:
        """Fresh resources made by reclaiming parked groups: node by node (never `barred`),
        where the free resources and the groups parked there hold the request, the groups
        it takes (`_to_reclaim`) are freed and their owners told; the grant on the first such
        node where the request then fits (and its pool's quota, refreshed, holds it)."""
        request = ticket.request
        if room is not None:
            parked = [g for g in self._parked if not self._promised(g, ticket)]
            pool_parked = [g.holds for g in parked if g.request.pool == request.pool]
            if not request.resources.fits_in(total([room, *pool_parked])):
                return None
        for node in sorted(self._parked_at):
            if node == barred or not _may_use(request, node):
                continue
            need = self._need(request, node)
            # not even with every group parked there (promised or not): skip it unlisted
            if not need.fits_in(self._avail[node] + self._parked_on[node]):
                continue
            here = [g for g in self._parked_at[node] if not self._promised(g, ticket)]
            if not here:
                continue
            taken = self._to_reclaim(need, request.pool, node, here, room)
            if taken is None:
                continue
            for g in taken:
                self._reclaim(g)
            room = self._quota_room(request.pool)
            if self._avail.holds(node, need) and (room is None or need.fits_in(room)):
                return self._take(ticket, node, now)
        return None

    def _to_reclaim(
        self, need: Resources, pool: str, node: int, here: list[Grant], room: Resources | None
    ) -> list[Grant] | None:
        """The parked groups on `node` to free for `need`: the largest first, until what is
        free there with them holds it (and the pool's quota with those of its own pool);
        None when even all of them would not make room on the node."""
        free = self._avail[node]
        if not need.fits_in(total([free, *(g.holds for g in here)])):
            return None
        taken: list[Grant] = []
        for g in sorted(here, key=lambda g: -_size(g.holds)):
            quota_ok = room is None or need.fits_in(
                total([room, *(t.holds for t in taken if t.request.pool == pool)])
            )
            if quota_ok and need.fits_in(total([free, *(t.holds for t in taken)])):
                break
            taken.append(g)
        return taken

    def _reclaim(self, g: Grant) -> None:
        """A parked group's resources are free on its node again; its owner is told."""
        self._parked_del(g)
        self.release(g)
        if g.on_reclaim is not None:
            g.on_reclaim(g, "reclaimed")

    def _promised(self, g: Grant, ticket: Ticket) -> bool:
        """Whether parked group `g` is a victim's whose preemptor (not `ticket`) still waits:
        what a victim frees is its preemptor's alone, parked for reuse or not (a roles victim's
        group is parked as it is killed), so no other request reuses or reclaims it meanwhile.
        One look at the victim's own preemptor, not a walk over every held ticket's victims."""
        taker = g.preemptor
        return (
            taker is not None and taker is not ticket and taker in self._held and g in taker.victims
        )

    def _parked_add(self, grant: Grant) -> None:
        assert grant.tag is not None
        self._parked[grant] = None
        self._parked_seq[grant] = next(self._parked_count)
        by_shape = self._parked_by_tag.setdefault(grant.tag, {})
        by_shape.setdefault(grant.resources, {})[grant] = None
        self._parked_at.setdefault(grant.node, {})[grant] = None
        self._parked_on[grant.node] = self._parked_on.get(grant.node, NOTHING) + grant.holds
        self._avail.dirty.add(grant.node)

    def _parked_del(self, grant: Grant) -> None:
        del self._parked[grant]
        del self._parked_seq[grant]
        assert grant.tag is not None
        by_shape = self._parked_by_tag[grant.tag]
        same = by_shape[grant.resources]
        del same[grant]
        if not same:
            del by_shape[grant.resources]
        here = self._parked_at[grant.node]
        del here[grant]
        if not here:
            del self._parked_at[grant.node]
        self._parked_on[grant.node] = self._parked_on[grant.node] - grant.holds
        self._avail.dirty.add(grant.node)

    # --- preemption -----------------------------------------------------------------------

    def _evaluate(self, ticket: Ticket, now: float) -> bool:
        """`_preempt`, timed for the metrics (ScheduleMesh's evaluation latency)."""
        started = time.perf_counter()
        chosen = self._preempt(ticket, now)
        self.metrics.preempt_evaluated(time.perf_counter() - started)
        return chosen

    def _preempt(self, ticket: Ticket, now: float) -> bool:
        """Choose victims by the ticket's policy where the fewest and cheapest will do, and
        tell them (`_evict`); False when none would do."""
        request = ticket.request
        reasons = self._reasons(request)
        if not reasons:
            return False
        room = self._quota_room(request.pool)
        best: tuple[tuple[object, ...], int, list[Grant]] | None = None
        for node, base, here in self._victims_by_node(request, reasons, room):
            chosen = self._choose(request, node, base, here, room, now)
            if chosen is not None:
                rank = (len(chosen), *pol.set_cost([_candidate(g, now) for g in chosen]))
                if best is None or rank < best[0]:
                    best = (rank, node, chosen)
        if best is None:
            return False
        _, node, victims = best
        self._evict(ticket, node, victims, reasons, now)
        return True

    def _choose(
        self,
        request: Request,
        node: int,
        base: Resources,
        here: list[Grant],
        room: Resources | None,
        now: float,
    ) -> list[Grant] | None:
        """The victims among `here` that free enough for `request` on `node`
        (`pol.choose_victims`), remembered by what the choice depends on: the need, the
        node's free resources with its parked groups, the pool's room, and each candidate's
        kind in order (`_victim_kind`). Victims of one kind are interchangeable and are taken
        in order, so the same kinds give the same positions: at scale thousands of preemptors
        meet a few looks."""
        # a choice that depends on the time (work lost or left) never repeats on a real
        # clock, and a long list of candidates (a short quota's: the pool's victims on every
        # node) makes a big key: those are chosen afresh and not kept
        timed = any(g.request.estimated is not None or not g.request.saves_state for g in here)
        key: tuple[object, ...] | None = None
        if not timed and len(here) <= CHOICE_CANDIDATES:
            kinds = tuple((_victim_kind(g), g.node == node) for g in here)
            key = (request.resources, request.pool, base, room, kinds)
        if key is not None and key in self._choices:
            positions = self._choices[key]
        else:
            candidates = [_candidate(g, now) for g in here]
            enough = _enough(request.resources, node, base, room, request.pool)
            chosen = pol.choose_victims(candidates, enough)
            index = {id(c): i for i, c in enumerate(candidates)}
            positions = None if chosen is None else [index[id(c)] for c in chosen]
            if key is not None:
                if len(self._choices) >= CHOICES_KEPT:
                    self._choices.clear()
                self._choices[key] = positions
        return None if positions is None else [here[i] for i in positions]

    def _reasons(self, request: Request) -> dict[tuple[object, ...], str]:
        """The parties (priority, pool, labels) with victims running that `request`'s policy
        may preempt, each with the reason it may."""
        assert request.policy is not None
        me = pol.Party(request.priority, request.pool, request.labels)
        reasons: dict[tuple[object, ...], str] = {}
        for party, count in self._parties.items():
            if count:
                reason = pol.preemption_reason(me, self._party_of[party], request.policy)
                if reason is not None:
                    reasons[party] = reason
        return reasons

    def _victims_by_node(
        self, request: Request, reasons: dict[tuple[object, ...], str], room: Resources | None
    ) -> Iterator[tuple[int, Resources, list[Grant]]]:
        """(node, its free resources with its parked groups, the victims `reasons` allow) for
        each node worth searching: when the pool's quota is short, every node with the pool's
        own victims anywhere (they free quota); else one node of each look."""
        if room is not None and not request.resources.fits_in(room):
            pool = request.pool
            for node in range(len(self.nodes)):
                here = [
                    g
                    for victims in self._node_victims.values()
                    for g in victims
                    if g.request.party in reasons and (g.node == node or g.request.pool == pool)
                ]
                yield node, self._base(node), here
        else:
            yield from self._victims_by_look(reasons)

    def _victims_by_look(
        self, reasons: dict[tuple[object, ...], str]
    ) -> Iterator[tuple[int, Resources, list[Grant]]]:
        """`_victims_by_node` for one node of each look: nodes whose free resources and victims
        are alike (same kinds, as many of each) offer the same choice, and a later one never
        wins a tie."""
        seen: set[tuple[object, ...]] = set()
        for node in self._first_of_each_look():
            base = self._base(node)
            kinds = frozenset(
                (k, n) for k, n in self._node_kinds[node].items() if n and k[:3] in reasons
            )
            if not kinds or (base, kinds) in seen:
                continue
            seen.add((base, kinds))
            yield node, base, [g for g in self._node_victims[node] if g.request.party in reasons]

    def _base(self, node: int) -> Resources:
        """What a preemptor could have on `node` before any victim: free and parked."""
        return self._avail[node] + self._parked_on.get(node, NOTHING)

    def _evict(
        self,
        ticket: Ticket,
        node: int,
        victims: list[Grant],
        reasons: dict[tuple[object, ...], str],
        now: float,
    ) -> None:
        """Tell the chosen victims (counted by reason); the ticket holds `node` for itself."""
        for g in victims:
            reason = reasons[g.request.party]
            g.preempted, g.preempted_at = reason, now
            g.preemptor = ticket
            if g.lender is not None:  # what it frees is its lender's, released with it
                g.lender.preemptor = ticket
            self._not_victim(g)
            self.metrics.preempted(g.request.pool, reason)
            assert g.on_preempt is not None
            g.on_preempt(g, reason)
        ticket.victims = victims
        ticket.hold_node = node

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
                look = (self._base(node), frozenset(kinds.items()))
                self._look[node] = look
                self._alike.setdefault(look, set()).add(node)
        self._avail.dirty.clear()
        return sorted(min(nodes) for nodes in self._alike.values())

    # --- bookkeeping ----------------------------------------------------------------------

    def _preemptible(self, grant: Grant) -> None:
        """A grant with `on_preempt` was admitted: it may be chosen as a victim from now on."""
        party = grant.request.party
        if party not in self._party_of:
            request = grant.request
            self._party_of[party] = pol.Party(request.priority, request.pool, request.labels)
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
        self._parties[grant.request.party] -= 1
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
        i = bisect.bisect_left(lane.tickets, ticket.order, key=_order)
        if i < len(lane.tickets) and lane.tickets[i] is ticket:
            del lane.tickets[i]
            if not lane.tickets and self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]
            return True
        return False

    def _drop(self, ticket: Ticket) -> None:
        """A waiting ticket gives up (withdrawn): out of the queue, its hold freed."""
        if self._unqueue(ticket):
            self._count -= 1
        if ticket.hold_node is not None and ticket in self._held:
            self._unhold(ticket, ticket.hold_node)
            ticket.hold_node = ticket.holding = None
        ticket.lane = None

    def _victim_done(self, grant: Grant) -> None:
        if grant.preempted_at is not None:
            seconds = self.clock() - grant.preempted_at
            self.metrics.preempt_done(seconds, grant.request.pool, grant.preempted or "")
            grant.preempted_at = None

    def _quota_room(self, pool: str) -> Resources | None:
        quota = self._quota.get(pool)
        if quota is None:
            return None
        return quota - self._used.get(pool, NOTHING)


def _may_use(request: Request, node: int) -> bool:
    """Whether `node` is one the request may run on (its `nodes`, when it names them)."""
    return request.nodes is None or node in request.nodes


def _victim_kind(g: Grant) -> tuple[object, ...]:
    """What tells victims apart when choosing (`_candidate`): grants of one kind on one node
    are interchangeable. Starts with the party key. Made once per grant, of plain values (what
    it holds as numbers: a `Resources` hashes and compares by Python calls, and kinds are
    hashed and compared each time victims are counted, chosen or looked at)."""
    kind = g.kind
    if kind is None:
        r, h = g.request, g.holds
        lost_from = None if r.saves_state else g.since
        left_from = None if r.estimated is None else (r.estimated, g.since)  # work left ranks
        holds = (h.cpus, h.gpus, h.memory, h.custom)
        kind = g.kind = (*r.party, holds, r.elastic, lost_from, left_from)
    return kind


def _candidate(g: Grant, now: float) -> pol.Candidate:
    r = g.request
    lost = 0.0 if r.saves_state else now - g.since
    left = pol.remaining(r.estimated, now - g.since)
    return pol.Candidate(g, g.node, g.holds, r.priority, r.pool, lost, r.elastic, left)


def _enough(
    need: Resources, node: int, base: Resources, room: Resources | None, pool: str
) -> Callable[[object], bool]:
    """Whether a victim set frees enough on `node` (and in the pool's quota, when it has one)."""

    def enough(victims: object) -> bool:
        chosen = list(victims)  # type: ignore[call-overload]
        on_node = total([base, *(c.resources for c in chosen if c.node == node)])
        if not need.fits_in(on_node):
            return False
        if room is None:
            return True
        return need.fits_in(total([room, *(c.resources for c in chosen if c.pool == pool)]))

    return enough


def _within(need: Resources, free: Resources) -> Resources:
    """As much of `need` as `free` has now, amount by amount (none of what is short)."""
    have = dict(free.custom)
    return Resources(
        max(0.0, min(need.cpus, free.cpus)),
        max(0.0, min(need.gpus, free.gpus)),
        max(0.0, min(need.memory, free.memory)),
        tuple((k, max(0.0, min(v, have.get(k, 0.0)))) for k, v in need.custom),
    )


def _size(r: Resources) -> float:
    """One number to order shapes by (a GPU weighs like 8 CPUs; memory by the GB)."""
    return r.cpus + 8 * r.gpus + r.memory / (1 << 30) / 4
