"""Preemption policy as tables: who may preempt whom, which victims, and what the scheduler
does with them (several victims at once, counted by reason, groups reused by best fit)."""

from __future__ import annotations

import pytest

from runner.resources import Resources
from runner.scheduler import Request, Scheduler
from runner.scheduler.core import Grant, Ticket
from runner.scheduler.metrics import Metrics
from runner.scheduler.policy import (
    THRESHOLDS,
    Candidate,
    Party,
    Policy,
    aggressiveness_level,
    choose_victims,
    preemption_reason,
    remaining,
)
from tests.scheduling import admitted, ask

RULES = {"role": {"train": ["reward", "rollout"], "reward": ["rollout"]}}


def party(priority: float, pool: str = "a", role: str | None = None) -> Party:
    return Party(priority, pool, {"role": role} if role else {})


@pytest.mark.parametrize(
    ("preemptor", "victim", "policy", "reason"),
    [
        pytest.param(
            party(1, role="train"),
            party(1, role="rollout"),
            Policy(RULES),
            "label",
            id="label_rule_at_equal_priority",
        ),
        pytest.param(
            party(4.5, role="train"),
            party(5, role="reward"),
            Policy(RULES),
            "label",
            id="label_rule_lets_a_preemptor_0.5_below_at_medium",
        ),
        pytest.param(
            party(4.4, role="train"),
            party(5, role="reward"),
            Policy(RULES),
            None,
            id="label_rule_refuses_a_preemptor_more_than_0.5_below_at_medium",
        ),
        pytest.param(
            party(0, role="train"),
            party(9, role="reward"),
            Policy(RULES),
            None,
            id="label_rule_refuses_a_preemptor_far_below",
        ),
        pytest.param(
            party(1, role="rollout"),
            party(1, role="train"),
            Policy(RULES),
            None,
            id="label_rules_are_one_way",
        ),
        pytest.param(
            party(1, role="train"),
            party(1, role="rollout"),
            Policy(RULES, label_preemption=False),
            None,
            id="enable_label_preemption_false_turns_the_rules_off",
        ),
        pytest.param(
            party(2, role="train"),
            party(1, role="rollout"),
            Policy(RULES, label_preemption=False),
            "same_pool",
            id="without_label_rules_the_pool_rule_applies",
        ),
        pytest.param(
            party(5, role="reward"),
            party(4.5, role="reward"),
            Policy(RULES),
            None,
            id="no_rule_and_a_gap_below_the_same_pool_threshold",
        ),
        pytest.param(
            party(5, role="reward"),
            party(4, role="reward"),
            Policy(RULES),
            "same_pool",
            id="no_rule_and_a_gap_of_the_same_pool_threshold",
        ),
        pytest.param(
            party(1, "a", "train"),
            party(1, "b", "rollout"),
            Policy(RULES),
            None,
            id="label_rule_stops_at_the_pool_without_cross_pool",
        ),
        pytest.param(
            party(1, "a", "train"),
            party(1, "b", "rollout"),
            Policy(RULES, cross_pool=True),
            "label",
            id="label_rule_across_pools_counts_as_label_not_cross_pool",
        ),
        pytest.param(
            party(10, "a"),
            party(0, "b"),
            Policy(),
            None,
            id="no_cross_pool_by_default_whatever_the_gap",
        ),
        pytest.param(
            party(10, "a"),
            party(0, "b"),
            Policy(cross_pool=True),
            "cross_pool",
            id="cross_pool_when_allowed",
        ),
        pytest.param(
            party(3, "a"),
            party(0, "b"),
            Policy(cross_pool=True, aggressiveness="high"),
            None,
            id="cross_pool_needs_5_even_at_high",
        ),
        pytest.param(
            party(9, role="train"),
            party(0, "b", "rollout"),
            Policy(RULES, cross_pool=True, protected_pools=frozenset({"b"})),
            None,
            id="protected_pool_is_never_preempted_even_by_a_label_rule",
        ),
        pytest.param(
            party(9),
            party(0),
            Policy(protected_pools=frozenset({"a"})),
            None,
            id="protected_pool_protects_its_own_members_too",
        ),
    ],
)
def test_who_may_preempt_whom(preemptor: Party, victim: Party, policy: Policy, reason: str | None):
    assert preemption_reason(preemptor, victim, policy) == reason


def test_the_thresholds_are_schedulemeshs() -> None:
    """schedulemesh/config/policy.py PREEMPTION_AGGRESSIVENESS_LEVELS, and the controller's
    cross_pool_priority_threshold = 5.0."""
    table = {k: (t.label, t.same_pool, t.cross_pool) for k, t in THRESHOLDS.items()}
    assert table == {
        "high": (0.1, 0.5, 5.0),
        "medium": (0.5, 1.0, 5.0),
        "low": (1.0, 3.0, 5.0),
    }


# (aggressiveness, label threshold, same-pool threshold): each boundary and just past it
LEVELS = [("high", 0.1, 0.5), ("medium", 0.5, 1.0), ("low", 1.0, 3.0)]


@pytest.mark.parametrize(
    ("aggressiveness", "gap", "with_label", "same_pool", "cross_pool"),
    [
        case
        for level, label, same in LEVELS
        for case in [
            pytest.param(level, -label, "label", None, None, id=f"{level}_label_at_-{label}"),
            pytest.param(level, -label - 0.05, None, None, None, id=f"{level}_label_past_-{label}"),
            pytest.param(
                level, same, "label", "same_pool", None, id=f"{level}_same_pool_at_{same}"
            ),
            pytest.param(
                level, same - 0.05, "label", None, None, id=f"{level}_same_pool_below_{same}"
            ),
            pytest.param(
                level, 5.0, "label", "same_pool", "cross_pool", id=f"{level}_cross_pool_at_5"
            ),
            pytest.param(level, 4.95, "label", "same_pool", None, id=f"{level}_cross_pool_below_5"),
        ]
    ],
)
def test_each_aggressiveness_at_its_thresholds(
    aggressiveness: str,
    gap: float,
    with_label: str | None,
    same_pool: str | None,
    cross_pool: str | None,
) -> None:
    policy = Policy(RULES, aggressiveness=aggressiveness, cross_pool=True)
    base = 5.0
    assert preemption_reason(party(base + gap), party(base), policy) == same_pool
    assert preemption_reason(party(base + gap, "a"), party(base, "b"), policy) == cross_pool
    train, rollout = party(base + gap, role="train"), party(base, role="rollout")
    assert preemption_reason(train, rollout, policy) == with_label


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("urgent", "high"),
        ("prod", "high"),
        ("critical", "high"),
        ("HIGH", "high"),
        ("normal", "medium"),
        ("default", "medium"),
        ("batch", "low"),
        ("background", "low"),
        ("low-priority", "low"),
        ("extreme", None),
    ],
)
def test_schedulemeshs_aggressiveness_aliases(name: str, level: str | None) -> None:
    assert aggressiveness_level(name) == level


def cand(
    name: str,
    cpus: float,
    priority: float = 0,
    lost: float = 0,
    elastic: bool = False,
    left: float | None = None,
):
    return Candidate(name, 0, Resources(cpus=cpus), priority, "a", lost, elastic, left)


def frees(cpus: float):  # type: ignore[no-untyped-def]
    return lambda victims: sum(v.resources.cpus for v in victims) >= cpus - 1e-9


@pytest.mark.parametrize(
    ("candidates", "need", "chosen"),
    [
        pytest.param([cand("a", 1), cand("b", 1)], 3, None, id="not_enough_even_with_all"),
        pytest.param(
            [cand("small1", 1), cand("small2", 1), cand("big", 2, priority=1)],
            2,
            ["big"],
            id="one_victim_beats_two_smaller",
        ),
        pytest.param(
            [cand("a", 1), cand("b", 1), cand("c", 1)],
            3,
            ["a", "b", "c"],
            id="several_victims_when_one_is_not_enough",
        ),
        pytest.param(
            [cand("high", 2, priority=5), cand("low", 2, priority=1)],
            2,
            ["low"],
            id="lowest_priority_first",
        ),
        pytest.param(
            [cand("long", 2, lost=100), cand("short", 2, lost=5)],
            2,
            ["short"],
            id="least_work_lost_between_equals",
        ),
        pytest.param(
            [cand("ending", 2, left=5), cand("starting", 2, left=95)],
            2,
            ["starting"],
            id="most_estimated_work_left_between_equals",
        ),
        pytest.param(
            [cand("saved", 2, left=5), cand("unsaved", 2, lost=10, left=95)],
            2,
            ["saved"],
            id="work_lost_before_work_left",
        ),
        pytest.param(
            [cand(f"e{i}", 1, left=10) for i in range(3)] + [cand("long", 1, left=80)],
            2,
            ["long", "e0"],
            id="estimated_work_left_in_a_set_of_two",
        ),
        pytest.param(
            [cand("fixed", 2), cand("extra", 2, elastic=True)],
            2,
            ["extra"],
            id="elastic_replicas_give_way_first",
        ),
        pytest.param(
            [cand("p3", 2, priority=3), cand("p1a", 1, priority=1), cand("p1b", 1, priority=1)],
            2,
            ["p3"],
            id="fewest_victims_before_lowest_priority",
        ),
        pytest.param(
            [cand(f"r{i}", 0.5) for i in range(40)],
            8,
            [f"r{i}" for i in range(16)],
            id="sixteen_small_victims_for_one_big_claim",
        ),
    ],
)
def test_the_smallest_victim_set_that_frees_enough(candidates, need, chosen) -> None:  # type: ignore[no-untyped-def]
    picked = choose_victims(candidates, frees(need))
    if chosen is None:
        assert picked is None
    else:
        assert picked is not None
        assert sorted(str(c.key) for c in picked) == sorted(chosen)


def test_work_left_is_counted_from_estimated_duration_as_schedulemesh_does() -> None:
    assert remaining(100.0, 30.0) == 70.0
    assert remaining(100.0, 130.0) == 0.0
    assert remaining(None, 30.0) is None


# --- the scheduler applies the policy ------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []

    def __call__(self, grant: Grant, reason: str) -> None:
        self.told.append((grant.owner, reason))


def rollout(s: Scheduler, owner: str, told: Recorder) -> Ticket:
    """A 1-CPU rollout of pool "a" that saves its state: a victim train may take by label."""
    return ask(
        s,
        owner,
        Resources(cpus=1),
        1,
        pool="a",
        labels={"role": "rollout"},
        on_preempt=told,
        saves_state=True,
    )


def training(s: Scheduler, owner: str) -> Ticket:
    """A 3-CPU train request of pool "a" that preempts by the label rules."""
    return ask(
        s, owner, Resources(cpus=3), 1, pool="a", labels={"role": "train"}, policy=Policy(RULES)
    )


def test_a_preemptor_takes_several_victims_at_once_and_each_is_counted_by_reason() -> None:
    metrics, told = Metrics(), Recorder()
    s = Scheduler([Resources(cpus=4)], metrics=metrics)
    for i in range(4):
        t = rollout(s, f"rollout{i}", told)
        s.admit()
        assert t.grant is not None
    train = training(s, "train")
    assert s.admit() == []
    assert len(told.told) == 3  # three of the four equal rollouts: no fewer would do
    assert {r for _, r in told.told} == {"label"}
    assert metrics.preemptions == {("a", "label"): 3}
    for g in s.running():
        if (g.owner, "label") in told.told:
            s.release(g)
    assert [t.owner for t in s.admit()] == ["train"]
    assert train.grant is not None and metrics.preempt_latency[0] == 3


def test_alike_victims_on_nodes_with_different_room_are_chosen_for_each_node() -> None:
    """The scheduler remembers a victim choice by what it depends on: the same victims on a
    node with one CPU free need one victim fewer, and the choice made once is made again."""
    told = Recorder()
    s = Scheduler([Resources(cpus=4), Resources(cpus=5)], metrics=Metrics())
    rollouts = [rollout(s, f"rollout{i}", told) for i in range(8)]
    s.admit()
    assert sorted(t.grant.node for t in rollouts if t.grant) == [0] * 4 + [1] * 4

    def train(name: str) -> Ticket:
        ticket = training(s, name)
        assert s.admit() == []
        return ticket

    first = train("train0")
    assert len(told.told) == 2 and first.hold_node == 1  # 1 free + 2 victims, not 3 on node 0
    for t in rollouts:
        if t.grant is not None and (t.owner, "label") in told.told:
            s.release(t.grant)
    assert [t.owner for t in s.admit()] == ["train0"]
    second = train("train1")
    assert len(told.told) == 5 and second.hold_node == 0  # node 0: 3 of its 4


def test_grants_of_requests_not_preemptible_are_never_victims() -> None:
    s = Scheduler([Resources(cpus=2)], metrics=Metrics())
    assert admitted(s, ask(s, "pool-worker", Resources(cpus=2), 0)) is not None
    t = ask(s, "train", Resources(cpus=2), 100, policy=Policy(aggressiveness="high"))
    assert s.admit() == [] and not t.victims


def test_a_waiting_preemptor_keeps_what_its_victims_free_from_lower_requests() -> None:
    told = Recorder()
    s = Scheduler([Resources(cpus=2)], metrics=Metrics())
    victim = ask(s, "low", Resources(cpus=2), 0, on_preempt=told)
    s.admit()
    ask(s, "high", Resources(cpus=2), 5, policy=Policy())
    s.admit()
    ask(s, "small", Resources(cpus=1), 1)
    assert victim.grant is not None
    s.release(victim.grant)
    assert [t.owner for t in s.admit()] == ["high"]


def test_parked_groups_are_reused_by_best_fit_never_big_for_small() -> None:
    s = Scheduler([Resources(cpus=8)], metrics=Metrics())
    big = admitted(s, ask(s, "big", Resources(cpus=4), 0))
    small = admitted(s, ask(s, "small", Resources(cpus=1), 0))
    filler = admitted(s, ask(s, "filler", Resources(cpus=3), 0))
    assert big and small and filler
    s.park(big, "pg:x", Recorder())
    s.park(small, "pg:x", Recorder())
    t = ask(s, "next", Resources(cpus=1), 0, reuse="pg:x")
    s.admit()
    assert t.grant is not None and t.grant.reused is small
    t2 = ask(s, "other-stage", Resources(cpus=2), 0)
    s.admit()
    assert t2.grant is not None and s.free().cpus == 2  # the idle big group was reclaimed


def test_a_pool_quota_holds_and_preemption_frees_quota_within_the_pool() -> None:
    told = Recorder()
    s = Scheduler([Resources(cpus=16)], metrics=Metrics())
    s.set_quota("rl", Resources(cpus=4))
    for i in range(2):
        ask(s, f"r{i}", Resources(cpus=2), 0, pool="rl", on_preempt=told)
    s.admit()
    assert admitted(s, ask(s, "over", Resources(cpus=1), 0, pool="rl")) is None
    ask(s, "train", Resources(cpus=2), 5, pool="rl", policy=Policy())
    s.admit()
    assert [r for _, r in told.told] == ["same_pool"]


def test_a_roles_estimated_duration_spares_the_replica_about_to_finish() -> None:
    """Two equal replicas, started together, both state-saving: the one whose
    `estimated_duration` leaves it the most work is asked to stop; the one about to finish
    keeps running (it frees its resources soon anyway), whichever was submitted first."""
    for first, second, victim in ((12.0, 600.0, "second"), (600.0, 12.0, "first")):
        now, told = [0.0], Recorder()
        s = Scheduler([Resources(cpus=2)], clock=lambda now=now: now[0], metrics=Metrics())
        for name, estimate in (("first", first), ("second", second)):
            ask(s, name, cpus1(), 0, on_preempt=told, saves_state=True, estimated=estimate)
        s.admit()
        now[0] = 10.0
        ask(s, "train", cpus1(), 5, policy=Policy())
        s.admit()
        assert told.told == [(victim, "same_pool")]


def cpus1() -> Resources:
    return Resources(cpus=1)


def test_a_victim_parked_then_reclaimed_leaves_the_others_preemptible() -> None:
    """The rlhf example's order: a rollout preempted, its group parked for reuse, then
    reclaimed by train; a burst replica arriving later may still preempt the other rollout."""
    from runner.scheduler.policy import Policy

    s = Scheduler([Resources(cpus=2)])
    flagged: list[str] = []

    def note(grant: Grant, reason: str) -> None:
        flagged.append(grant.owner)

    low = [admitted(s, ask(s, f"low{i}", Resources(cpus=1), 1.0, on_preempt=note)) for i in (0, 1)]
    assert low[0] is not None and low[1] is not None
    train = ask(s, "train", Resources(cpus=1), 10.0, policy=Policy(), on_preempt=note)
    s.admit()
    assert len(flagged) == 1
    victim, other = (low[0], low[1]) if flagged == ["low0"] else (low[1], low[0])
    s.park(victim, "pg", lambda g, r: None)  # its group kept for reuse ...
    assert s.admit() == [train]  # ... and reclaimed by train
    ask(s, "burst", Resources(cpus=1), 4.0, policy=Policy(), on_preempt=note)
    s.admit()
    assert flagged[1:] == [other.owner]


def test_a_victims_group_parked_as_it_is_killed_is_its_preemptors_alone() -> None:
    """The roles path: a victim's placement group is parked for reuse when it is killed. A
    request with no right to preempt (a gap below the threshold), queued ahead of the
    preemptor by priority, must not reuse or reclaim it."""
    told = Recorder()
    s = Scheduler([Resources(cpus=2)], metrics=Metrics())
    rollouts = [
        ask(s, f"rollout{i}", cpus1(), 1, on_preempt=told, labels={"role": "rollout"})
        for i in (0, 1)
    ]
    s.admit()
    rules = {"role": {"train": ["rollout"]}}
    train = ask(s, "train", cpus1(), 1, labels={"role": "train"}, policy=Policy(rules), reuse="pg")
    s.admit()
    assert len(told.told) == 1
    reward = ask(
        s, "reward", cpus1(), 1.5, labels={"role": "reward"}, policy=Policy(rules), reuse="pg"
    )
    assert s.admit() == []
    victim = next(t.grant for t in rollouts if t.grant and t.grant.owner == told.told[0][0])
    assert victim is not None
    s.park(victim, "pg", Recorder())
    assert s.admit() == [train]
    assert train.grant is not None and train.grant.reused is victim
    assert reward.grant is None and len(told.told) == 1


def test_a_lent_grant_is_preemptible_and_frees_its_lenders_resources_only_with_it() -> None:
    """A reserved group's grant lent to a replica: the replica is a victim by the normal
    rules; its own release gives nothing back, its lender's does."""
    told = Recorder()
    s = Scheduler([Resources(cpus=2)], metrics=Metrics())
    group = admitted(s, ask(s, "reserved", cpus1(), 10))
    assert group is not None
    lent = Request(cpus1(), 5, labels={"role": "reward"}, preemptible=True)
    replica = s.lend(group, lent, "reward", told)
    assert replica.lender is group and replica.resources == group.resources
    train = ask(s, "train", Resources(cpus=2), 10, labels={"role": "train"}, policy=Policy(RULES))
    s.admit()
    assert told.told == [("reward", "label")]
    s.release(replica)
    assert s.admit() == []  # the group still holds its CPU ...
    s.release(group)
    assert s.admit() == [train]  # ... until it goes back to the pool


def test_a_quota_set_while_a_lent_grant_runs_counts_its_resources_once() -> None:
    """A lent grant holds its lender's resources: a pool's quota set while both run counts them
    once (the lent grant's release gives nothing back, so counting it too would never end)."""
    s = Scheduler([Resources(cpus=4)], metrics=Metrics())
    group = admitted(s, ask(s, "reserved", Resources(cpus=2), 10, pool="rl"))
    assert group is not None
    s.lend(group, Request(Resources(cpus=2), 5, pool="rl"), "reward")
    s.set_quota("rl", Resources(cpus=3))
    assert admitted(s, ask(s, "more", cpus1(), 1, pool="rl")) is not None
