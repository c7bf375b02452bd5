"""What a claimant asks the scheduler for: one value, made once, held by reference.

Every claim of a run (a pool worker, a job, a shard, a role replica, a reserved group) is a
`Request`. The scheduler's `Ticket` (waiting) and `Grant` (admitted) hold the request itself,
not copies of its fields, so a new attribute is one field here and the code that reads it.
A request is frozen: many tickets share one (an array's jobs, a stage's workers), so no
holder may change it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from runner.resources import Resources
from runner.scheduler.policy import Policy


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """Resources on one node, at a priority, and how the claim may be placed and preempted.

    Compared by identity (`eq=False`): the scheduler groups requests that ask alike by their
    fields itself, and a policy or labels are mappings, which a value's hash cannot hold."""

    resources: Resources
    priority: float = 0.0
    # the quota pool it counts against ("" : none)
    pool: str = ""
    # what preemption rules match (a role's `role: train`); never changed once asked
    labels: Mapping[str, str] = field(default_factory=dict)
    # set when it may preempt others, by this policy
    policy: Policy | None = None
    # it may be chosen as a victim (its owner is told through `on_preempt` at `submit`)
    preemptible: bool = False
    # a victim that saves its state loses no work; an elastic one is taken first
    saves_state: bool = False
    elastic: bool = False
    # takes over a parked grant (an idle placement group) parked under this tag
    reuse: str | None = None
    # the longest it holds its grant (a job's time limit), if known
    duration: float | None = None
    # when it does not fit, it reserves the node where it could start soonest: requests behind
    # it land there only when their `duration` ends them before then (backfill)
    reserve: bool = False
    # how long it is expected to run in all (a role's `estimated_duration`): victims are
    # chosen by the work they have left
    estimated: float | None = None
    # the only nodes (scheduler indices) it may run on, e.g. a job's partition; None: any
    nodes: frozenset[int] | None = None
    # the node to itself (SCNS's `exclusive`): admitted only on a node where nothing runs, and
    # nothing else is admitted there until it ends
    exclusive: bool = False
    # what preemption rules match, as a key: (priority, pool, labels sorted); made once, for
    # the scheduler counts and looks up victims by it at every grant, release and preemption
    party: tuple[object, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        labels = tuple(sorted(self.labels.items()))
        object.__setattr__(self, "party", (self.priority, self.pool, labels))
