"""The scheduler admits claims by priority, with ageing and backfill, per node."""

from __future__ import annotations

import pytest

from runner.resources import Resources
from runner.scheduler import Request, Scheduler
from runner.scheduler.core import AGEING_PER_SECOND
from tests.scheduling import Clock, admitted, ask


def cpus(n: float) -> Resources:
    return Resources(cpus=n)


def test_a_claim_lands_on_a_node_that_holds_it_whole() -> None:
    s = Scheduler([cpus(2), cpus(4)])
    grant = admitted(s, ask(s, "a", cpus(3)))
    assert grant is not None and grant.node == 1
    assert admitted(s, ask(s, "b", cpus(3))) is None  # 1 + 2 free, but on no one node


def test_released_resources_go_to_the_highest_priority_waiter() -> None:
    s = Scheduler([cpus(1)])
    held = admitted(s, ask(s, "holder", cpus(1)))
    assert held is not None
    low = ask(s, "low", cpus(1), 0.0)
    high = ask(s, "high", cpus(1), 5.0)
    assert s.admit() == [] and s.waiting() == 2
    s.release(held)
    assert s.admit() == [high]
    assert high.grant is not None
    s.release(high.grant)
    assert s.admit() == [low]


def test_ageing_lets_a_long_waiting_low_priority_claim_overtake() -> None:
    clock = Clock()
    s = Scheduler([cpus(1)], clock=clock)
    held = admitted(s, ask(s, "holder", cpus(1)))
    assert held is not None
    old = ask(s, "old-low", cpus(1), 0.0)
    clock.now = 2.0 / AGEING_PER_SECOND  # two priority points of waiting
    new = ask(s, "new-high", cpus(1), 1.0)
    s.release(held)
    assert s.admit() == [old] and new.grant is None


def test_a_small_claim_backfills_past_one_that_does_not_fit() -> None:
    s = Scheduler([cpus(2)])
    assert admitted(s, ask(s, "a", cpus(1.5))) is not None
    assert admitted(s, ask(s, "big", cpus(1))) is None
    assert admitted(s, ask(s, "small", cpus(0.5))) is not None


def reserved_node(clock: Clock) -> Scheduler:
    """One 2-CPU node: a 1-CPU job holding it until t=100 (its time limit), and a 2-CPU job
    waiting behind it with a reservation."""
    s = Scheduler([cpus(2)], clock=clock)
    ask(s, "running", cpus(1), 10.0, duration=100.0, reserve=True)
    assert [t.owner for t in s.admit()] == ["running"]
    ask(s, "big", cpus(2), 5.0, reserve=True)
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
    ask(s, "small", cpus(1), 1.0, duration=duration, reserve=True)
    assert [t.owner for t in s.admit()] == (["small"] if admitted else [])


def test_the_reserved_head_starts_when_the_job_before_it_ends() -> None:
    clock = Clock()
    s = reserved_node(clock)
    small = ask(s, "small", cpus(1), 1.0, reserve=True)
    (running,) = s.running()
    clock.now = 40.0
    s.release(running)
    assert [t.owner for t in s.admit()] == ["big"]
    assert small.grant is None


def test_requests_that_ask_no_reservation_still_backfill_past_each_other() -> None:
    s = Scheduler([cpus(2)])
    ask(s, "running", cpus(1), 10.0)
    ask(s, "big", cpus(2), 5.0)
    ask(s, "small", cpus(1), 1.0)
    assert [t.owner for t in s.admit()] == ["running", "small"]


def test_a_reservation_bars_only_its_own_node() -> None:
    clock = Clock()
    s = Scheduler([cpus(2), cpus(1)], clock=clock)
    ask(s, "running", cpus(1), 10.0, duration=100.0, reserve=True)
    ask(s, "big", cpus(2), 5.0, reserve=True)
    ask(s, "small", cpus(1), 1.0, reserve=True)
    ask(s, "small-too", cpus(1), 0.0, reserve=True)
    assert [t.owner for t in s.admit()] == ["running", "small"]
    assert [g.node for g in s.running() if g.owner == "small"] == [1]


def test_a_claim_that_names_its_nodes_lands_only_on_them() -> None:
    """A job's partition: the roomier node is passed over, and a claim held back on its only
    node does not hold back an equal claim that may use another."""
    s = Scheduler([cpus(4), cpus(1)])
    only_small = ask(s, "debug-1", cpus(1), nodes=frozenset({1}))
    again = ask(s, "debug-2", cpus(1), nodes=frozenset({1}))
    anywhere = ask(s, "any", cpus(1))
    s.admit()
    assert only_small.grant is not None and only_small.grant.node == 1
    assert again.grant is None  # node 1 is full; node 0 is not its to use
    assert anywhere.grant is not None and anywhere.grant.node == 0
    nowhere = ask(s, "lost", cpus(1), nodes=frozenset())
    s.release(only_small.grant)
    s.admit()
    assert again.grant is not None and again.grant.node == 1
    assert nowhere.grant is None


def test_claims_submitted_as_one_batch_queue_as_they_would_one_by_one() -> None:
    """One `submit` for many owners (a stage's units that ask alike) gives each owner the
    ticket one `submit` each would have, in the same queue order, and the same admissions
    follow, by priority and arrival."""

    def queue(batch: bool) -> tuple[list[tuple[float, int]], list[tuple[str, int]]]:
        clock = Clock()
        s = Scheduler([cpus(2), cpus(2)], clock=clock)
        ask(s, "first", cpus(1), 1.0)
        clock.now = 5.0
        owners = ["a", "b", "c", "d"]
        if batch:
            tickets = s.submit(Request(cpus(1), 1.0, labels={"team": "x"}), owners)
        else:
            tickets = [ask(s, o, cpus(1), 1.0, labels={"team": "x"}) for o in owners]
        ask(s, "urgent", cpus(1), 9.0)
        assert s.waiting() == 6
        granted = [(t.owner, t.grant.node) for t in s.admit() if t.grant is not None]
        return [t.order for t in tickets], granted

    assert queue(batch=True) == queue(batch=False)
    orders, granted = queue(batch=True)
    assert orders == sorted(orders)
    assert [owner for owner, _ in granted] == ["urgent", "first", "a", "b"]


def test_tickets_and_grants_hold_the_request_itself() -> None:
    """One request for many owners: every ticket and grant holds that very value (a field
    added to `Request` is read through it, nowhere copied)."""
    s = Scheduler([cpus(4)], clock=Clock())
    request = Request(cpus(1), 3.0, labels={"team": "x"}, duration=60.0)
    tickets = s.submit(request, ["a", "b"])
    s.admit()
    assert all(t.request is request for t in tickets)
    assert all(t.grant is not None and t.grant.request is request for t in tickets)
    assert [g.ends for g in s.running()] == [60.0, 60.0]


def test_a_preemptible_request_must_say_whom_to_tell() -> None:
    s = Scheduler([cpus(1)])
    with pytest.raises(ValueError, match="on_preempt"):
        s.submit(Request(cpus(1), preemptible=True), ["a"])


# --- exclusive: a node to itself -----------------------------------------------------------


def test_an_exclusive_request_waits_for_its_node_to_empty_then_holds_it_whole() -> None:
    """SCNS's `exclusive: true`: on one 4-CPU node with a 1-CPU job running, an exclusive
    1-CPU job waits although 3 CPUs are free; once the node is empty it starts, and a 1-CPU
    job asked meanwhile waits until it ends."""
    s = Scheduler([cpus(4)])
    running = admitted(s, ask(s, "running", cpus(1)))
    assert running is not None
    alone = ask(s, "alone", cpus(1), exclusive=True)
    assert s.admit() == []
    s.release(running)
    assert s.admit() == [alone]
    assert alone.grant is not None
    assert alone.grant.resources == cpus(1) and alone.grant.holds == cpus(4)
    beside = ask(s, "beside", cpus(1))
    assert s.admit() == [] and s.free() == Resources()
    s.release(alone.grant)
    assert s.admit() == [beside]


def test_an_exclusive_request_takes_the_smallest_empty_node_that_holds_it() -> None:
    s = Scheduler([cpus(8), cpus(2), cpus(4), cpus(2)])
    assert admitted(s, ask(s, "busy", cpus(1), nodes=frozenset({1}))) is not None
    alone = admitted(s, ask(s, "alone", cpus(2), exclusive=True))
    assert alone is not None and alone.node == 3  # node 1 is smaller too, but not empty
    big = admitted(s, ask(s, "big", cpus(3), exclusive=True))
    assert big is not None and big.node == 2
    pinned = admitted(s, ask(s, "pinned", cpus(1), exclusive=True, nodes=frozenset({1, 3})))
    assert pinned is None  # both of its nodes are in use


def test_smaller_jobs_do_not_keep_an_exclusive_jobs_node_busy() -> None:
    """The exclusive job reserves the node that empties soonest: a job behind it that would
    still run then is held back (it would otherwise start in the free CPUs, and the next one
    after it, and the node would never empty); one that ends before then backfills."""
    clock = Clock()
    s = Scheduler([cpus(4)], clock=clock)
    first = admitted(s, ask(s, "first", cpus(1), duration=10.0, reserve=True))
    assert first is not None
    alone = ask(s, "alone", cpus(1), 5.0, exclusive=True, duration=5.0, reserve=True)
    long = ask(s, "long", cpus(1), 1.0, duration=100.0, reserve=True)
    short = ask(s, "short", cpus(1), 1.0, duration=5.0, reserve=True)
    assert s.admit() == [short]  # ends at 5, before the node empties at 10
    clock.now = 10.0
    s.release(first)
    assert short.grant is not None
    s.release(short.grant)
    assert s.admit() == [alone]
    assert long.grant is None and s.admit() == []
    clock.now = 15.0
    assert alone.grant is not None
    s.release(alone.grant)
    assert s.admit() == [long]


def test_parked_groups_are_reclaimed_to_empty_a_node_for_an_exclusive_request() -> None:
    told: list[str] = []
    s = Scheduler([cpus(4)])
    idle = admitted(s, ask(s, "idle", cpus(2)))
    assert idle is not None
    s.park(idle, "pg:x", lambda g, reason: told.append(f"{g.owner} {reason}"))
    alone = admitted(s, ask(s, "alone", cpus(1), exclusive=True))
    assert alone is not None and alone.holds == cpus(4)
    assert told == ["idle reclaimed"]


def test_an_exclusive_request_neither_preempts_nor_reuses() -> None:
    from runner.scheduler.policy import Policy

    s = Scheduler([cpus(4)])
    for fields in ({"policy": Policy()}, {"reuse": "pg:x"}):
        with pytest.raises(ValueError, match="exclusive"):
            s.submit(Request(cpus(1), exclusive=True, **fields), ["a"])  # type: ignore[arg-type]


def test_an_exclusive_request_reserves_a_node_that_only_parked_groups_keep_from_emptying() -> None:
    """Parked groups never end, but an exclusive request reclaims them: the node with one is
    still the node it reserves, so a job behind it with no time limit is held back."""
    clock = Clock()
    s = Scheduler([cpus(4)], clock=clock)
    idle = admitted(s, ask(s, "idle", cpus(2)))
    assert idle is not None
    s.park(idle, "pg:x", lambda g, reason: None)
    first = admitted(s, ask(s, "first", cpus(1), duration=10.0, reserve=True))
    assert first is not None
    alone = ask(s, "alone", cpus(1), 5.0, exclusive=True, reserve=True)
    small = ask(s, "small", cpus(1), 1.0, reserve=True)
    assert s.admit() == []
    clock.now = 10.0
    s.release(first)
    assert s.admit() == [alone] and small.grant is None


def test_a_shared_scheduler_hands_each_tenant_only_its_own_grants() -> None:
    """Two loops (a sweep's jobs) share one scheduler: whichever admits, each one is handed
    its own grants, once, and a loop whose ticket waits while another's grant holds the node
    is told that another tenant holds resources (it is not stuck)."""
    s = Scheduler([Resources(cpus=2)])
    a, b = object(), object()
    one = Request(Resources(cpus=1))
    (ta,) = s.submit(one, ("a/0",), None, a)
    (tb,) = s.submit(one, ("b/0",), None, b)
    assert s.admit(a) == [ta]  # a's pass granted b's ticket too, kept for b
    assert s.admit(a) == []
    assert s.admit(b) == [tb]
    (tc,) = s.submit(Request(Resources(cpus=2)), ("a/1",), None, a)
    assert s.admit(a) == []
    assert tb.grant is not None and ta.grant is not None
    assert s.tenants_hold(a, lambda g: g is ta.grant)
    s.release(tb.grant)
    assert not s.tenants_hold(a, lambda g: g is ta.grant)
    s.release(ta.grant)
    assert s.admit(b) == [] and s.admit(a) == [tc]
