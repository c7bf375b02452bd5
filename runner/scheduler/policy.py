"""Preemption policy: who may preempt whom, and which victims to take. Plain functions.

The rule and its numbers are ScheduleMesh's (`schedulemesh/config/policy.py`,
`core/controllers/preemption_controller.py`), so a user who reads its documentation finds the
same behaviour. In order (README.md shows examples):
1. a victim in one of `protected_pools` is never preempted;
2. across pools only when `cross_pool: true`;
3. a label rule (`{role: {train: [reward, rollout]}}`: a `role=train` unit may preempt a
   `role=reward` or `role=rollout` unit) allows it unless the preemptor's priority is *lower*
   than the victim's by more than the label threshold; reason `label`. Off with
   `enable_label_preemption: false`;
4. otherwise the preemptor's priority must exceed the victim's by at least the same-pool
   threshold within a pool, or by the cross-pool threshold (5.0, whatever the
   aggressiveness) across pools; reason `same_pool` or `cross_pool`.

When one victim is not enough, the smallest set of victims that frees enough is taken,
preferring the lowest priority, then elastic replicas, then the least work lost, then the most
estimated work left (ScheduleMesh's κ × remaining_time: the unit that would hold its resources
longest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from runner.resources import Resources


@dataclass(frozen=True)
class Thresholds:
    """Priority gaps of one aggressiveness level (ScheduleMesh's `PreemptionThresholds`)."""

    # how far *below* its victim a preemptor's priority may be under a label rule
    label: float
    # how far above its victim a preemptor's priority must be, within a pool
    same_pool: float
    # ... and across pools (ScheduleMesh's `cross_pool_priority_threshold`, one for all levels)
    cross_pool: float = 5.0


# ScheduleMesh's PREEMPTION_AGGRESSIVENESS_LEVELS
THRESHOLDS: dict[str, Thresholds] = {
    "high": Thresholds(label=0.1, same_pool=0.5),
    "medium": Thresholds(label=0.5, same_pool=1.0),
    "low": Thresholds(label=1.0, same_pool=3.0),
}
# ScheduleMesh's AGGRESSIVENESS_ALIASES (matched without regard to case)
ALIASES: dict[str, str] = {
    **dict.fromkeys(("urgent", "prod", "critical", "high_priority", "high-priority"), "high"),
    **dict.fromkeys(("normal", "default", "medium_priority", "medium-priority"), "medium"),
    **dict.fromkeys(("batch", "background", "low_priority", "low-priority"), "low"),
}
REASONS = ("label", "same_pool", "cross_pool")
# priorities are typed as decimals (0.1): a gap equal to a threshold must count as reaching it
EPSILON = 1e-9
# victim sets are searched exhaustively among this many preferred candidates, up to this size;
# beyond that the largest candidates are taken first and the set is then pruned
EXHAUSTIVE_CANDIDATES, EXHAUSTIVE_SIZE = 16, 4


def aggressiveness_level(value: object) -> str | None:
    """`high`, `medium` or `low` for a level or one of its aliases, any case; None otherwise."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    level = ALIASES.get(text, text)
    return level if level in THRESHOLDS else None


@dataclass(frozen=True)
class Policy:
    """A stage's `preemption:` settings."""

    # label key -> preemptor's value -> victim values it may preempt
    label_rules: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)
    # high | medium | low (aliases resolved when the spec is read)
    aggressiveness: str = "medium"
    cross_pool: bool = False
    protected_pools: frozenset[str] = frozenset()
    # seconds a victim has to stop after it is asked before it is killed
    cancel_timeout: float = 5.0
    # false: the label rules are kept but not applied (ScheduleMesh's enable_label_preemption)
    label_preemption: bool = True

    @property
    def thresholds(self) -> Thresholds:
        return THRESHOLDS[aggressiveness_level(self.aggressiveness) or "medium"]


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
    gap = preemptor.priority - victim.priority
    limits = policy.thresholds
    if policy.label_preemption and label_rule_allows(
        policy.label_rules, preemptor.labels, victim.labels
    ):
        # as in ScheduleMesh, a matching label rule decides: no fallback to the pool rules
        return "label" if gap + EPSILON >= -limits.label else None
    if gap + EPSILON >= (limits.cross_pool if cross else limits.same_pool):
        return "cross_pool" if cross else "same_pool"
    return None


@dataclass(slots=True)
class Candidate:
    """A running unit that the policy allows a preemptor to take (one is made per victim
    looked at, so a plain slotted dataclass: a frozen one's `__init__` costs three times as
    much; never changed once made)."""

    key: object
    node: int
    resources: Resources
    priority: float
    pool: str = ""
    # seconds of work a restart would redo (0 when the unit saves its state)
    work_lost: float = 0.0
    elastic: bool = False
    # seconds of work it has left by its `estimated_duration` (None: not estimated)
    remaining: float | None = None


def remaining(estimated_duration: float | None, elapsed: float) -> float | None:
    """Work left by the estimate, as ScheduleMesh's `TaskState.remaining_time` counts it."""
    return None if estimated_duration is None else max(0.0, estimated_duration - elapsed)


def preference(c: Candidate) -> tuple[float, bool, float, float]:
    """Victims are taken lowest priority first, then elastic ones, then least work lost, then
    most work left (a unit about to finish frees its resources soon anyway)."""
    return (c.priority, not c.elastic, c.work_lost, -(c.remaining or 0.0))


def set_cost(victims: Sequence[Candidate]) -> tuple[float, float, float, float, float]:
    """Between victim sets of one size: the lower highest priority wins, then less work lost,
    then more work left."""
    size = sum(_weight(v.resources) for v in victims)
    return (
        max(v.priority for v in victims),
        sum(v.work_lost for v in victims),
        -sum(v.remaining or 0.0 for v in victims),
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
    seen: Counter[tuple[Resources, float, str, float, bool, float]] = Counter()
    out = []
    for c in ordered:
        left = round(c.remaining or 0.0, 1)
        kind = (c.resources, c.priority, c.pool, round(c.work_lost, 1), c.elastic, left)
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
