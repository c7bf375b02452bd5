"""A unit's life: its states and the moves between them, written once for every stage kind.

```
PENDING ─► GRANTED ─► RUNNING ─► DONE | FAILED | TIMEOUT | OUT_OF_MEMORY | CANCELLED
   ▲          │          │
   │          │          └─► PREEMPTED ─┐   (its state saved; admitted again later)
   └──────────┴─────────────────────────┘   (grant not honoured, worker lost, retry)
```

The executor moves units; the ledger, `mode=status`, the timeline and the summary read the
same states. Only DONE is skipped on resume.
"""

from __future__ import annotations

from enum import Enum


class UnitState(Enum):
    """Where a unit is in its life (the ledger keeps the value)."""

    pending = "pending"
    granted = "granted"
    running = "running"
    done = "done"
    failed = "failed"
    timeout = "timeout"
    out_of_memory = "out_of_memory"
    cancelled = "cancelled"
    preempted = "preempted"

    # a member is equal only to itself, so its identity is its hash: Enum's own `__hash__`
    # is a Python call, paid per unit wherever states are counted or sets are asked
    __hash__ = object.__hash__

    @property
    def final(self) -> bool:
        """No further move in this run."""
        return self in FINAL

    @property
    def label(self) -> str:
        """The name users see (Slurm's, where Slurm has one)."""
        return "COMPLETED" if self is UnitState.done else self.value.upper()


FINAL = frozenset(
    {
        UnitState.done,
        UnitState.failed,
        UnitState.timeout,
        UnitState.out_of_memory,
        UnitState.cancelled,
    }
)

_S = UnitState
TRANSITIONS: dict[UnitState, frozenset[UnitState]] = {
    # cancelled before it ran; done when a committed output is adopted without running
    _S.pending: frozenset({_S.granted, _S.cancelled, _S.done}),
    # running once Ray really started it; back to pending when Ray cannot honour the grant
    _S.granted: frozenset({_S.running, _S.pending, _S.failed, _S.cancelled, _S.preempted}),
    # pending again after a lost worker or a retry
    _S.running: frozenset(FINAL | {_S.preempted, _S.pending}),
    _S.preempted: frozenset({_S.pending, _S.cancelled}),
    **{s: frozenset() for s in FINAL},
}


class IllegalMove(RuntimeError):
    """A unit was asked to move where its life does not go (a bug in the executor or a kind)."""


def move(current: UnitState, to: UnitState) -> UnitState:
    """`to`, when the lifecycle allows it from `current`."""
    if to not in TRANSITIONS[current]:
        raise IllegalMove(f"a unit cannot go from {current.value} to {to.value}")
    return to
