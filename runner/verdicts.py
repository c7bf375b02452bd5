"""What a kind hands back to the unit loop: verdicts on its units and orders for its leases.

A kind's hooks are generators of these; the loop applies each as it comes (so a kind sees a
lease closed right after it yields `End`). Only the loop moves a unit or ends a lease: a kind
says what happened (`Done`, `Failed`, `Lost`, `Back`, `Stopped`...) and what to do next
(`Launch`, `Send`, `End`, `Lend`, `Park`...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from runner.calls import Call, Remote
from runner.errors import StorageError
from runner.lifecycle import UnitState
from runner.resources import Resources
from runner.scheduler.core import Grant, Notify

if TYPE_CHECKING:
    from runner.lease import Ask, Lease, Work


# --- units -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Done:
    """The unit finished with `result` (started and ended at these wall times, when known)."""

    work: Work
    result: object = None
    started: float | None = None
    ended: float | None = None


@dataclass(slots=True)
class DoneAll:
    """Units whose ends were heard together (a pool batch), each after its `seconds`, ending
    at its own `ends` (wall clock)."""

    works: Sequence[Work]
    results: Sequence[object]
    seconds: Sequence[float]
    ends: Sequence[float]


@dataclass(slots=True)
class Running:
    """Units handed to a lease that already runs (a pool batch), from wall time `at`."""

    works: Sequence[Work]
    lease: Lease
    at: float


@dataclass(slots=True)
class Failed:
    """The unit's own failure: it runs again while its retries last, else ends `state`."""

    work: Work
    error: str
    state: UnitState = UnitState.failed


@dataclass(slots=True)
class Ended:
    """A final state the kind decided (a timeout, out of memory: no retry)."""

    work: Work
    state: UnitState
    result: object = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None


@dataclass(slots=True)
class Lost:
    """Its worker or node died: queued again (without spending a retry when its node left)."""

    work: Work
    error: str
    node_left: bool = False


@dataclass(slots=True)
class Back:
    """Handed out but never started by its worker: queued again, no attempt spent."""

    work: Work


@dataclass(slots=True)
class Requeue:
    """It cannot run where it landed, no fault of its own (GPUs short of memory): pending
    again with `reason`, the attempt not counted."""

    work: Work
    reason: str


@dataclass(slots=True)
class Record:
    """Write the unit's row as it is now (a job shown PENDING from the start)."""

    work: Work


@dataclass(slots=True)
class Note:
    """A moment worth drawing on the timeline (`retry`, ...)."""

    work: Work
    kind: str
    detail: str | None = None


# --- leases ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Launch:
    """Start `remote` on the lease (its work runs from its `Started`)."""

    lease: Lease
    remote: Remote


@dataclass(slots=True)
class Send:
    """Make `call` on the lease's actor."""

    lease: Lease
    call: Call


@dataclass(slots=True)
class Cancel:
    """Ask the lease's task to stop (Ray's cancel: its reply then says it was cancelled)."""

    lease: Lease


@dataclass(slots=True)
class End:
    """The lease is over: its calls forgotten, what runs killed when `kill`, its grant given
    back (its placement group removed, unless the kind parks it)."""

    lease: Lease
    kill: bool = False


@dataclass(slots=True)
class Stopped:
    """A stopping lease's work is out (it answered that it stopped): its units end as the
    stop's reason says (preempted: pending again with their saved state; else cancelled)."""

    lease: Lease


@dataclass(slots=True)
class Lend:
    """Run the ask's unit at once on what `lender` holds (a reserved placement group): a
    grant of its own over those resources, preemptible like any other (`Scheduler.lend`)."""

    ask: Ask
    lender: Lease


@dataclass(slots=True)
class Withdraw:
    """An ask the kind no longer wants (not granted yet)."""

    ask: Ask


@dataclass(slots=True)
class Park:
    """Keep the ending lease's grant (and group) as an idle group that asks with `tag` reuse;
    `on_reclaim` is told, under the scheduler's lock, when another request takes it."""

    lease: Lease
    tag: str
    on_reclaim: Notify


@dataclass(slots=True)
class Release:
    """Give back a grant the kind kept (a parked group it no longer wants); its group is
    removed with `RemoveGroup`."""

    grant: Grant


@dataclass(slots=True)
class RemoveGroup:
    """Remove a placement group the backend made for a lease of the kind."""

    group: object


@dataclass(slots=True)
class SetQuota:
    """At most `resources` may be granted at once to requests of `pool`."""

    pool: str
    resources: Resources


@dataclass(slots=True)
class Fail:
    """The run cannot go on (its directory cannot be written): it stops with this error."""

    error: StorageError


UnitVerdict: TypeAlias = (
    Done | DoneAll | Running | Failed | Ended | Lost | Back | Requeue | Record | Note
)
"""What happened to units: the loop moves them through their states."""

LeaseVerdict: TypeAlias = Launch | Send | Cancel | End | Stopped | RemoveGroup
"""Orders for a lease: the loop carries them out on the backend."""

SchedulerVerdict: TypeAlias = Lend | Withdraw | Park | Release | SetQuota
"""Orders for the scheduler: asks, grants and quotas."""

Verdict: TypeAlias = UnitVerdict | LeaseVerdict | SchedulerVerdict | Fail
