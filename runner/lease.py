"""The loop's objects that a kind reads: a unit in the loop's hands (`Work`), a request for a
lease (`Ask`), and a lease while it lives (`Lease`).

The unit loop (`executor.py`) makes and moves them; a kind holds its own leases and units and
reads them (what a lease carries, whether it started, how many calls it has in flight), and
says what should happen to them by returning verdicts (`verdicts.py`), never by moving them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.lifecycle import UnitState, move
from runner.placement import Placement, Started
from runner.plan import Unit
from runner.scheduler.core import Grant, Ticket
from runner.scheduler.request import Request
from runner.store import UnitRow

if TYPE_CHECKING:
    from runner.kind import StageRun

# seconds Ray may take to start a unit on its granted node before the grant goes back
START_BOUND = 60.0


@dataclass(eq=False, slots=True)
class Work:
    """One unit in the loop's hands: where it is in its life, and what the ledger keeps."""

    stage: str
    unit: Unit
    state: UnitState = UnitState.pending
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    node_id: str | None = None
    node_ip: str | None = None
    worker: str | None = None
    error: str | None = None
    # what it gave (JSON data, as the ledger keeps it)
    result: object = None
    # how the ledger keeps the unit's input (None: its payload)
    record: object = None
    # a preempted unit's state, handed back when it runs again
    saved: object = None
    # held by a worker that died: runs alone, so only the culprit spends its retries
    suspect: bool = False

    @property
    def id(self) -> str:
        return self.unit.id

    def go(self, state: UnitState) -> None:
        self.state = move(self.state, state)

    def row(self) -> UnitRow:
        row = self.unit.row(
            self.stage,
            self.state,
            self.attempts,
            self.started,
            self.ended,
            self.worker,
            self.error,
            self.result,
            self.record,
        )
        row.node_id, row.node_ip = self.node_id, self.node_ip
        return row


@dataclass(eq=False, slots=True)
class Ask:
    """What a kind asks for one lease: the scheduler's `Request` (shared by many asks that ask
    alike), the unit the lease is for, and what the kind remembers with it."""

    request: Request
    # the unit the lease is for; None for a lease that serves many (a pool worker)
    work: Work | None = None
    # what the kind wants to remember with the lease (e.g. a reserved group)
    tag: object = None


@dataclass(eq=False, slots=True)
class Lease:
    """A grant in use: its placement, the calls in flight on it, and the units it carries.

    `handle` and `group` are the backend's (a Ray actor or task and a placement group, or
    their virtual stand-ins): a kind passes them back in values, never looks inside."""

    run: StageRun
    ask: Ask
    ticket: Ticket | None = None
    grant: Grant | None = None
    placement: Placement | None = None
    work: list[Work] = field(default_factory=list)
    # in-flight calls: the backend's reference → what its reply is to the kind (its tag)
    calls: dict[object, object] = field(default_factory=dict)
    handle: object = None
    group: object = None
    # an actor (calls go to it) or a task (its reply is its end)
    actor: bool = False
    started: Started | None = None
    # until when (the loop's clock) Ray may take to start it, or its work to stop
    deadline: float | None = None
    # seconds its start may take from the grant (a kind may allow more, or less)
    start_bound: float = START_BOUND
    # why it is stopping: "preempted: REASON", "interrupted", "cancelled", "retired"
    stopping: str | None = None
    # its node left the cluster: its units go back to the queue without spending a retry
    node_left: bool = False
    closed: bool = False
    # past its grace, its kind's last call (a victim's `state()`) was made
    last_asked: bool = False
    # when the scheduler granted it (wall clock): its start-up latency is measured from here
    granted_at: float = 0.0

    @property
    def node(self) -> str:
        return self.placement.node_ip if self.placement else "?"

    @property
    def preempted(self) -> bool:
        """It is stopping because the scheduler chose it as a victim."""
        return self.stopping is not None and self.stopping.startswith("preempted")
