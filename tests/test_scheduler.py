"""The scheduler admits claims by priority, with ageing and backfill, per node."""

from __future__ import annotations

import threading

import pytest

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
    while s.waiting() < 2:
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
    old = s.submit("old-low", cpus(1), 0.0)
    clock.now = 2.0 / AGEING_PER_SECOND  # two priority points of waiting
    new = s.submit("new-high", cpus(1), 1.0)
    s.release(held)
    assert s.admit() == [old] and new.grant is None


def test_a_small_claim_backfills_past_one_that_does_not_fit() -> None:
    s = Scheduler([cpus(2)])
    assert s.acquire("a", cpus(1.5), timeout=0) is not None
    assert s.acquire("big", cpus(1), timeout=0) is None
    assert s.acquire("small", cpus(0.5), timeout=0) is not None


def reserved_node(clock: Clock) -> Scheduler:
    """One 2-CPU node: a 1-CPU job holding it until t=100 (its time limit), and a 2-CPU job
    waiting behind it with a reservation."""
    s = Scheduler([cpus(2)], clock=clock)
    s.submit("running", cpus(1), 10.0, duration=100.0, reserve=True)
    assert [t.owner for t in s.admit()] == ["running"]
    s.submit("big", cpus(2), 5.0, reserve=True)
    assert s.admit() == []
    return s


@pytest.mark.parametrize(
    ("duration", "admitted"),
    [
        pytest.param(None, False, id="no_time_limit_never_backfills_past_a_reserved_head"),
        pytest.param(150.0, False, id="a_job_that_would_delay_the_head_waits"),
        pytest.param(60.0, True, id="a_job_that_ends_before_the_head_could_start_backfills"),
    ],
)
def test_a_reserved_head_lets_only_jobs_that_end_before_it_backfill(
    duration: float | None, admitted: bool
) -> None:
    clock = Clock()
    s = reserved_node(clock)
    s.submit("small", cpus(1), 1.0, duration=duration, reserve=True)
    assert [t.owner for t in s.admit()] == (["small"] if admitted else [])


def test_the_reserved_head_starts_when_the_job_before_it_ends() -> None:
    clock = Clock()
    s = reserved_node(clock)
    small = s.submit("small", cpus(1), 1.0, reserve=True)
    (running,) = s.running()
    clock.now = 40.0
    s.release(running)
    assert [t.owner for t in s.admit()] == ["big"]
    assert small.grant is None


def test_requests_that_ask_no_reservation_still_backfill_past_each_other() -> None:
    s = Scheduler([cpus(2)])
    s.submit("running", cpus(1), 10.0)
    s.submit("big", cpus(2), 5.0)
    s.submit("small", cpus(1), 1.0)
    assert [t.owner for t in s.admit()] == ["running", "small"]


def test_a_reservation_bars_only_its_own_node() -> None:
    clock = Clock()
    s = Scheduler([cpus(2), cpus(1)], clock=clock)
    s.submit("running", cpus(1), 10.0, duration=100.0, reserve=True)
    s.submit("big", cpus(2), 5.0, reserve=True)
    s.submit("small", cpus(1), 1.0, reserve=True)
    s.submit("small-too", cpus(1), 0.0, reserve=True)
    assert [t.owner for t in s.admit()] == ["running", "small"]
    assert [g.node for g in s.running() if g.owner == "small"] == [1]


def test_a_claim_that_names_its_nodes_lands_only_on_them() -> None:
    """A job's partition: the roomier node is passed over, and a claim held back on its only
    node does not hold back an equal claim that may use another."""
    s = Scheduler([cpus(4), cpus(1)])
    only_small = s.submit("debug-1", cpus(1), nodes=frozenset({1}))
    again = s.submit("debug-2", cpus(1), nodes=frozenset({1}))
    anywhere = s.submit("any", cpus(1))
    s.admit()
    assert only_small.grant is not None and only_small.grant.node == 1
    assert again.grant is None  # node 1 is full; node 0 is not its to use
    assert anywhere.grant is not None and anywhere.grant.node == 0
    nowhere = s.submit("lost", cpus(1), nodes=frozenset())
    s.release(only_small.grant)
    s.admit()
    assert again.grant is not None and again.grant.node == 1
    assert nowhere.grant is None


def test_claims_submitted_as_one_batch_queue_as_they_would_one_by_one() -> None:
    """`submit_all` (a stage's units that ask alike) gives each owner the ticket `submit` would
    have, in the same queue order, and the same admissions follow, by priority and arrival."""

    def queue(batch: bool) -> tuple[list[tuple[float, int]], list[tuple[str, int]]]:
        clock = Clock()
        s = Scheduler([cpus(2), cpus(2)], clock=clock)
        s.submit("first", cpus(1), 1.0)
        clock.now = 5.0
        owners = ["a", "b", "c", "d"]
        if batch:
            tickets = s.submit_all(owners, cpus(1), 1.0, labels={"team": "x"})
        else:
            tickets = [s.submit(o, cpus(1), 1.0, labels={"team": "x"}) for o in owners]
        s.submit("urgent", cpus(1), 9.0)
        assert s.waiting() == 6
        granted = [(t.owner, t.grant.node) for t in s.admit() if t.grant is not None]
        return [t.order for t in tickets], granted

    assert queue(batch=True) == queue(batch=False)
    orders, granted = queue(batch=True)
    assert orders == sorted(orders)
    assert [owner for owner, _ in granted] == ["urgent", "first", "a", "b"]
