"""The scheduler admits claims by priority, with ageing and backfill, per node."""

from __future__ import annotations

import threading

from runner.resources import Resources
from runner.scheduler import Scheduler
from runner.scheduler.core import AGEING_PER_SECOND


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cpus(n: float) -> Resources:
    return Resources(cpus=n)


def test_a_claim_lands_on_a_node_that_holds_it_whole() -> None:
    s = Scheduler([cpus(2), cpus(4)])
    grant = s.acquire("a", cpus(3), timeout=0)
    assert grant is not None and grant.node == 1
    assert s.acquire("b", cpus(3), timeout=0) is None  # 1 + 2 free, but on no one node


def test_released_resources_go_to_the_highest_priority_waiter() -> None:
    s = Scheduler([cpus(1)])
    held = s.acquire("holder", cpus(1), timeout=0)
    assert held is not None
    order: list[str] = []

    def wait(name: str, priority: float) -> None:
        grant = s.acquire(name, cpus(1), priority, timeout=10)
        assert grant is not None
        order.append(name)
        s.release(grant)

    low = threading.Thread(target=wait, args=("low", 0.0))
    high = threading.Thread(target=wait, args=("high", 5.0))
    low.start()
    high.start()
    while len(s._waiting) < 2:
        pass
    s.release(held)
    low.join()
    high.join()
    assert order == ["high", "low"]


def test_ageing_lets_a_long_waiting_low_priority_claim_overtake() -> None:
    clock = Clock()
    s = Scheduler([cpus(1)], clock=clock)
    held = s.acquire("holder", cpus(1), timeout=0)
    assert held is not None
    s._waiting.append(_request(s, "old-low", 0.0, since=0.0))
    clock.now = 2.0 / AGEING_PER_SECOND  # two priority points of waiting
    s._waiting.append(_request(s, "new-high", 1.0, since=clock.now))
    s.release(held)
    with s._cond:
        s._admit()
    granted = [r.owner for r in s._waiting if r.grant] + ["old-low" if s.free().cpus == 0 else ""]
    assert "old-low" in granted


def test_a_small_claim_backfills_past_one_that_does_not_fit() -> None:
    s = Scheduler([cpus(2)])
    assert s.acquire("a", cpus(1.5), timeout=0) is not None
    assert s.acquire("big", cpus(1), timeout=0) is None
    assert s.acquire("small", cpus(0.5), timeout=0) is not None


def _request(s: Scheduler, owner: str, priority: float, since: float):  # type: ignore[no-untyped-def]
    from runner.scheduler.core import _Request

    return _Request(owner, cpus(1), priority, since, next(s._seq))
