"""What the unit loop needs of a cluster: start work on a placement, stop it, kill it, hear
what happened, follow the nodes, tell the time.

`backends/ray.py` does it on Ray; `backends/virtual.py` answers in virtual time after the
times the kinds expect (`cluster=sim`); `backends/idle.py` has no cluster, for a run that has
nothing to launch. The loop (`executor.py`) is the same for all, so a simulated run cannot
drift from a real one. Like Ray's `ray.air.execution` resource managers, a backend never
decides where anything runs: the lease's placement (the scheduler's grant) says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

from runner.calls import Call, Remote
from runner.cluster import RayNode
from runner.lease import Lease
from runner.placement import Started


@dataclass(slots=True)
class Began:
    """The lease's process really runs, there (`where`): an actor answered `ready()`, a task
    announced its start, a placement group is ready. Not `said`: a task that raised, or lost
    its worker, before it said where it ran ran all the same (its start is when that was
    heard: no start-up latency to measure)."""

    lease: Lease
    where: Started
    said: bool = True


@dataclass(slots=True)
class Replied:
    """A call on the lease (or its task) answered `value`. `ref` is the call's key in
    `lease.calls`: the loop takes it out as it hands the reply on, so a kind counting its
    calls in flight never sees a reply before it was told of it."""

    lease: Lease
    ref: object
    tag: object
    value: object


@dataclass(slots=True)
class Raised:
    """A call on the lease (or its task) raised: `cancelled` (it was asked to stop and did),
    `lost` (its worker or node died: `node_died` when the node did), else the unit's own
    error (`error`, one line)."""

    lease: Lease
    ref: object
    tag: object
    error: str
    cancelled: bool = False
    lost: bool = False
    node_died: bool = False


Happened: TypeAlias = Began | Replied | Raised


class Backend(Protocol):
    """A cluster as the unit loop uses it."""

    def clock(self) -> float:
        """Seconds, for deadlines and waits (monotonic, or virtual)."""
        ...

    def wall(self) -> float:
        """Epoch seconds, for the ledger (real, or the virtual run's)."""
        ...

    def launch(self, lease: Lease, remote: Remote) -> None:
        """Start `remote` on the lease's placement; its start comes as `Began`."""
        ...

    def call(self, lease: Lease, call: Call) -> None:
        """Make `call` on the lease's actor; its answer comes as `Replied` or `Raised`."""
        ...

    def cancel(self, lease: Lease) -> None:
        """Ask the lease's task to stop (unless it has answered already)."""
        ...

    def kill(self, lease: Lease) -> None:
        """End what runs on the lease now (its placement group stays: `remove_group`)."""
        ...

    def remove_group(self, group: object) -> None:
        """Remove a placement group made for a lease."""
        ...

    def wait(self, until: float) -> list[Happened]:
        """What happened, waiting at most until `until` (the loop's clock) for something to."""
        ...

    def nodes(self, force: bool = False) -> list[RayNode] | None:
        """The live nodes, when it is time to look again (or `force`d); None otherwise."""
        ...

    def alive(self) -> bool:
        """Whether the cluster may still be asked anything (a signal to the whole process
        group takes an embedded Ray down with the run)."""
        ...

    def orphan(self, lease: Lease) -> None:
        """The cluster is gone: end what the lease's unit left running, by its pid."""
        ...

    def close(self) -> None:
        """The run is over: remove what the backend made for itself."""
        ...
