"""Preemption policy: who may preempt whom, and which victims to take. Plain functions.

Rules, in order (docs/architecture.md and README.md show examples):
1. a victim in one of `protected_pools` is never preempted;
2. across pools only when `cross_pool: true`;
3. a label rule (`{role: {train: [reward, rollout]}}`: a `role=train` unit may preempt a
   `role=reward` or `role=rollout` unit) allows it whatever the priority gap; reason `label`;
4. otherwise the priority gap (preemptor − victim) must reach the threshold that
   `aggressiveness` sets, a larger one across pools; reason `same_pool` or `cross_pool`.

When one victim is not enough, the smallest set of victims that frees enough is taken,
preferring the lowest priority, then elastic replicas, then the least work lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from runner.resources import Resources

# minimum priority gap to preempt: (within a pool, across pools), by aggressiveness
THRESHOLDS: dict[str, tuple[float, float]] = {
    "low": (4.0, 8.0),
    "medium": (2.0, 4.0),
    "high": (1.0, 2.0),
}
REASONS = ("label", "same_pool", "cross_pool")
# victim sets are searched exhaustively among this many preferred candidates, up to this size;
# beyond that the largest candidates are taken first and the set is then pruned
EXHAUSTIVE_CANDIDATES, EXHAUSTIVE_SIZE = 16, 4


@dataclass(frozen=True)
class Policy:
    """A stage's `preemption:` settings."""

    # label key -> preemptor's value -> victim values it may preempt
    label_rules: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)
    aggressiveness: str = "medium"
    cross_pool: bool = False
    protected_pools: frozenset[str] = frozenset()
    # seconds a victim has to stop after it is asked before it is killed
    cancel_timeout: float = 5.0


@dataclass(frozen=True)
class Party:
    """A preemptor or a victim, as the policy sees it."""

    priority: float
    pool: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def label_rule_allows(
    rules: Mapping[str, Mapping[str, Sequence[str]]],
    preemptor: Mapping[str, str],
    victim: Mapping[str, str],
) -> bool:
    """True when some label rule lets `preemptor`'s labels preempt `victim`'s."""
    for key, by_value in rules.items():
        mine, theirs = preemptor.get(key), victim.get(key)
        if mine is not None and theirs is not None and theirs in by_value.get(mine, ()):
            return True
    return False


def preemption_reason(preemptor: Party, victim: Party, policy: Policy) -> str | None:
    """`label`, `same_pool` or `cross_pool` when `preemptor` may preempt `victim`, else None."""
    if victim.pool in policy.protected_pools:
        return None
    cross = victim.pool != preemptor.pool
    if cross and not policy.cross_pool:
        return None
    if label_rule_allows(policy.label_rules, preemptor.labels, victim.labels):
        return "label"
    same, across = THRESHOLDS[policy.aggressiveness]
    if preemptor.priority - victim.priority >= (across if cross else same):
        return "cross_pool" if cross else "same_pool"
    return None


@dataclass(frozen=True)
class Candidate:
    """A running unit that the policy allows a preemptor to take."""

    key: object
    node: int
    resources: Resources
    priority: float
    pool: str = ""
    # seconds of work a restart would redo (0 when the unit saves its state)
    work_lost: float = 0.0
    elastic: bool = False


def preference(c: Candidate) -> tuple[float, bool, float]:
    """Victims are taken lowest priority first, then elastic ones, then least work lost."""
    return (c.priority, not c.elastic, c.work_lost)


def set_cost(victims: Sequence[Candidate]) -> tuple[float, float, float, float]:
    """Between victim sets of one size: the lower highest priority wins, then less work lost."""
    size = sum(_weight(v.resources) for v in victims)
    return (
        max(v.priority for v in victims),
        sum(v.work_lost for v in victims),
        sum(v.priority for v in victims) + sum(0 if v.elastic else 0.5 for v in victims),
        size,
    )


def choose_victims(
    candidates: Sequence[Candidate],
    enough: Callable[[Sequence[Candidate]], bool],
) -> list[Candidate] | None:
    """The smallest set of candidates for which `enough(set)` holds, best by `set_cost`;
    None when even all of them are not enough."""
    ordered = sorted(candidates, key=preference)
    if not ordered or not enough(ordered):
        return None
    head = _distinct(ordered)[:EXHAUSTIVE_CANDIDATES]
    largest = sorted(candidates, key=lambda c: -_weight(c.resources))
    for k in range(1, min(EXHAUSTIVE_SIZE, len(head)) + 1):
        if not enough(largest[:k]):
            continue  # not even the k largest are enough: no k-set is (for one bottleneck)
        fitting = [list(c) for c in combinations(head, k) if enough(c)]
        if fitting:
            return min(fitting, key=set_cost)
    return _greedy(ordered, enough)


def _distinct(ordered: Sequence[Candidate]) -> list[Candidate]:
    """At most EXHAUSTIVE_SIZE of each kind of candidate: a k-set never needs more of one
    kind, and identical candidates (a thousand equal rollouts) make the same sets."""
    seen: Counter[tuple[Resources, float, str, float, bool]] = Counter()
    out = []
    for c in ordered:
        kind = (c.resources, c.priority, c.pool, round(c.work_lost, 1), c.elastic)
        seen[kind] += 1
        if seen[kind] <= EXHAUSTIVE_SIZE:
            out.append(c)
    return out


def _greedy(
    ordered: Sequence[Candidate], enough: Callable[[Sequence[Candidate]], bool]
) -> list[Candidate]:
    """Largest first until enough, then drop the least preferred members that are not needed."""
    taken: list[Candidate] = []
    for c in sorted(
        ordered, key=lambda c: (-(c.resources.cpus + 8 * c.resources.gpus), *preference(c))
    ):
        taken.append(c)
        if enough(taken):
            break
    for c in sorted(taken, key=preference, reverse=True):
        rest = [t for t in taken if t is not c]
        if rest and enough(rest):
            taken = rest
    return sorted(taken, key=preference)


def _weight(r: Resources) -> float:
    """One number to compare sizes by: a GPU weighs like 8 CPUs."""
    return r.cpus + 8 * r.gpus
