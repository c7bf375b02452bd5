"""Admission by priority against per-node capacity, shared by every stage of a run.

Ray has no priorities: whoever asks first gets the CPUs. Here every resource claim (a pool
worker, later a job, a shard, a role replica) waits in one queue ordered by priority plus an
ageing bonus, so low priority cannot starve forever. Requests that do not fit are passed over
for smaller ones behind them (backfill). The core is pure Python: a simulated cluster can
drive it in virtual time through `clock`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.resources import Resources

# priority points a waiting request gains per second of waiting
AGEING_PER_SECOND = 0.01


@dataclass(eq=False)
class Grant:
    """Resources handed to one claimant on one node, until released."""

    owner: str
    resources: Resources
    priority: float
    node: int
    waited: float


@dataclass(eq=False)
class _Request:
    owner: str
    resources: Resources
    priority: float
    since: float
    seq: int
    grant: Grant | None = None


@dataclass
class Scheduler:
    """Grants resource claims by priority; thread-safe; time comes from `clock`."""

    nodes: list[Resources]
    clock: Callable[[], float] = time.monotonic
    _free: list[Resources] = field(init=False)
    _waiting: list[_Request] = field(default_factory=list, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def __post_init__(self) -> None:
        self._free = list(self.nodes)

    def acquire(
        self,
        owner: str,
        resources: Resources,
        priority: float = 0.0,
        timeout: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Grant | None:
        """Wait for a grant; None on timeout (0 = try once) or when `cancelled()` turns true."""
        with self._cond:
            request = _Request(owner, resources, priority, self.clock(), next(self._seq))
            self._waiting.append(request)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                self._admit()
                if request.grant is not None:
                    return request.grant
                left = None if deadline is None else deadline - time.monotonic()
                if cancelled() or (left is not None and left <= 0):
                    self._waiting.remove(request)
                    return None
                self._cond.wait(0.2 if left is None else min(left, 0.2))

    def release(self, grant: Grant) -> None:
        """Give a grant's resources back and wake the waiters."""
        with self._cond:
            self._free[grant.node] = self._free[grant.node] + grant.resources
            self._cond.notify_all()

    def free(self) -> Resources:
        """What is not granted now, summed over nodes."""
        with self._cond:
            total = Resources()
            for node in self._free:
                total = total + node
            return total

    def _admit(self) -> None:
        now = self.clock()
        order = sorted(
            self._waiting,
            key=lambda r: (-(r.priority + AGEING_PER_SECOND * (now - r.since)), r.seq),
        )
        for request in order:
            node = self._place(request.resources)
            if node is None:
                continue
            self._free[node] = self._free[node] - request.resources
            request.grant = Grant(
                request.owner, request.resources, request.priority, node, now - request.since
            )
            self._waiting.remove(request)
            self._cond.notify_all()

    def _place(self, resources: Resources) -> int | None:
        """The node with the most free CPUs that holds `resources` (spreads load), or None."""
        best = None
        for i, free in enumerate(self._free):
            if resources.fits_in(free) and (best is None or free.cpus > self._free[best].cpus):
                best = i
        return best
