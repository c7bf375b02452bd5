"""The unit loop's backend in virtual time (`cluster=sim`): nothing starts; each start and
each call is answered after the time its kind expects, as the kind expects.

A clock moved by an event queue: a lease starts after the start-up latency a measured run saw
(`cluster.sim_durations_from`, else none), a task answers after its `Expect`, an actor's calls
are served one after another, and a call that works in steps stops at its next step when it is
interrupted (at once when it drops the step in progress). The loop, the scheduler and the kinds
are the real ones, so the simulated run makes the decisions the real one would, at hundreds of
nodes, in seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from runner.backend import Began, Happened, Raised, Replied
from runner.calls import NEW_GROUP, Call, Expect, Remote
from runner.cluster import RayNode
from runner.lease import Lease
from runner.placement import Started

# what a simulated process calls its host
HOST = "sim"
# a call that ran this close to a step's end has finished that step
STEP_EPSILON = 1e-9


class Events:
    """What is due when: actions by virtual time, each time's in the order they were added.

    Units that start together end together, so many events share a time: a heap of
    (time, sequence) tuples would compare down a long run of equal times on every push and pop;
    here the heap holds each distinct time once, and a time's actions are a list."""

    def __init__(self) -> None:
        self._times: list[float] = []
        self._due: dict[float, list[Callable[[], None]]] = {}

    def __bool__(self) -> bool:
        return bool(self._times)

    def add(self, when: float, action: Callable[[], None]) -> None:
        due = self._due.get(when)
        if due is None:
            self._due[when] = [action]
            heapq.heappush(self._times, when)
        else:
            due.append(action)

    def next_time(self) -> float:
        return self._times[0]

    def run_until(self, now: float) -> None:
        """Run every action due at `now` or before, in time order, and those they add on the
        way: for the time being run, after the ones already there."""
        times, due = self._times, self._due
        while times and times[0] <= now:
            when = heapq.heappop(times)
            actions = due[when]
            i = 0
            while i < len(actions):  # an action may add more for this time
                actions[i]()
                i += 1
            del due[when]


@dataclass(eq=False)
class _Call:
    """A call in flight on a virtual actor (or a virtual task's run)."""

    ref: object
    tag: object
    began: float
    expect: Expect
    # false once answered (or its answer replaced, when it was interrupted)
    live: bool = True


@dataclass(eq=False)
class _Process:
    """A lease's virtual actor or task: when it is free for its next call, what it runs."""

    lease: Lease
    free_at: float
    running: list[_Call] = field(default_factory=list)
    dead: bool = False


class _Group:
    """A virtual placement group."""


class VirtualBackend:
    """Virtual time, as the unit loop uses a backend (`backend.Backend`)."""

    def __init__(self, latency: Callable[[Lease], float] = lambda lease: 0.0) -> None:
        self.now = 0.0
        self.latency = latency
        self.events = Events()
        self.out: list[Happened] = []
        self.pids = itertools.count(1)

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    # --- starting work ---------------------------------------------------------------------

    def launch(self, lease: Lease, work: Remote) -> None:
        assert lease.placement is not None
        if work.group is NEW_GROUP:
            lease.group = _Group()
        elif work.group is not None:
            lease.group = work.group
        at = self.now + (self.latency(lease) if work.target is not None else 0.0)
        process = _Process(lease, at)
        lease.handle = process
        where = Started(lease.placement.node_id, lease.placement.node_ip, HOST, next(self.pids), at)
        self.events.add(at, partial(self._began, process, where, work))

    def _began(self, process: _Process, where: Started, work: Remote) -> None:
        if process.dead:
            return
        self.out.append(Began(process.lease, where))
        if not work.actor and work.target is not None:  # a task: it answers after its time
            expect = work.expect() if work.expect is not None else Expect(0.0)
            ref = object()
            process.lease.calls[ref] = None
            self._serve(process, _Call(ref, None, self.now, expect))

    def call(self, lease: Lease, call: Call) -> None:
        process = lease.handle
        assert isinstance(process, _Process)
        ref = object()
        lease.calls[ref] = call.tag
        expect = call.expect() if call.expect is not None else Expect(0.0)
        if call.interrupts:
            for running in list(process.running):
                self._interrupt(process, running)
            self.events.add(
                self.now, partial(self._answer, process, _Call(ref, call.tag, self.now, expect))
            )
            return
        begun = max(self.now, process.free_at)
        self._serve(process, _Call(ref, call.tag, begun, expect))

    def _serve(self, process: _Process, call: _Call) -> None:
        """Run `call` from its start for its time; calls on one process run one after another."""
        end = call.began + call.expect.seconds
        process.free_at = max(process.free_at, end)
        process.running.append(call)
        self.events.add(end, partial(self._answer, process, call))

    def _interrupt(self, process: _Process, call: _Call) -> None:
        """A running call asked to stop: at its next step (now, when it drops the step in
        progress), answering as stopped then."""
        step = call.expect.step
        stopped = call.expect.stopped
        if step is None or stopped is None or self.now < call.began:
            return
        done = self.now - call.began
        if not call.expect.drops_step:
            done = math.ceil(done / step - STEP_EPSILON) * step
        end = call.began + min(done, call.expect.seconds)
        if end >= call.began + call.expect.seconds:
            return  # it ends anyway before it would look
        call.live = False
        early = _Call(
            call.ref, call.tag, call.began, Expect(end - call.began, stopped(end - call.began))
        )
        process.running.append(early)
        process.free_at = end
        self.events.add(end, partial(self._answer, process, early))

    def _answer(self, process: _Process, call: _Call) -> None:
        if call in process.running:
            process.running.remove(call)
        if process.dead or not call.live:
            return
        call.live = False
        lease = process.lease
        if lease.closed or call.ref not in lease.calls:
            return
        self.out.append(Replied(lease, call.ref, call.tag, call.expect.reply))

    # --- stopping it -----------------------------------------------------------------------

    def cancel(self, lease: Lease) -> None:
        process = lease.handle
        if not isinstance(process, _Process) or process.dead:
            return
        for call in list(process.running):
            if call.live:
                call.live = False
                self.events.add(self.now, partial(self._cancelled, process, call))

    def _cancelled(self, process: _Process, call: _Call) -> None:
        lease = process.lease
        if process.dead or lease.closed or call.ref not in lease.calls:
            return
        self.out.append(Raised(lease, call.ref, call.tag, "cancelled", cancelled=True))

    def kill(self, lease: Lease) -> None:
        if isinstance(lease.handle, _Process):
            lease.handle.dead = True

    def remove_group(self, group: object) -> None:
        """Nothing to remove: a virtual group holds nothing but its grant."""

    # --- what happened ---------------------------------------------------------------------

    def wait(self, until: float) -> list[Happened]:
        """Move the clock to the next time anything is due (at most to `until`) and tell what
        happened then."""
        if not self.events:
            if until != math.inf:
                self.now = max(self.now, until)
            return []
        when = self.events.next_time()
        if when > until:
            self.now = max(self.now, until)
            return []
        self.now = max(self.now, when)
        self.out = []
        self.events.run_until(when)
        return self.out

    # --- the cluster -----------------------------------------------------------------------

    def nodes(self, force: bool = False) -> list[RayNode] | None:
        return None  # a simulated cluster keeps its nodes

    def alive(self) -> bool:
        return True

    def orphan(self, lease: Lease) -> None:
        """Nothing runs to be left behind."""

    def close(self) -> None:
        """Nothing was made."""
