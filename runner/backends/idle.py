"""The unit loop's backend for a run with nothing to launch: a rerun whose every unit was done
last time (`plan.launches_nothing`). It is answered from the ledger without starting Ray, in
about the time `mode=plan` takes, where an embedded Ray's start and shutdown would add seconds.

The loop runs as for any run (each stage opens, finds nothing to run and concludes; the
attempt is recorded and the report kept), so only the cluster is left out: nothing is placed,
so nothing can be started, and asking this backend to is a bug in the plan's promise.
"""

from __future__ import annotations

import threading
import time

from runner.backend import Happened
from runner.calls import Call, Remote
from runner.cluster import RayNode
from runner.lease import Lease

# the longest single wait, as on Ray: signals and deadlines are looked at this often
WAIT_SECONDS = 0.1


class IdleBackend:
    """No cluster: real time, and nothing to start (`backend.Backend`)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def clock(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def launch(self, lease: Lease, remote: Remote) -> None:
        raise _nothing_to(f"launch {remote.target!r}")

    def call(self, lease: Lease, call: Call) -> None:
        raise _nothing_to(f"call {call.method!r}")

    def cancel(self, lease: Lease) -> None:
        raise _nothing_to("cancel a task")

    def kill(self, lease: Lease) -> None:
        raise _nothing_to("kill a process")

    def remove_group(self, group: object) -> None:
        raise _nothing_to("remove a placement group")

    def wait(self, until: float) -> list[Happened]:
        # nothing will happen: the loop comes back for its own deadlines and the stop event
        self.stop.wait(max(0.0, min(until - time.monotonic(), WAIT_SECONDS)))
        return []

    def nodes(self, force: bool = False) -> list[RayNode] | None:
        return None  # the nodes the plan was made for stay

    def alive(self) -> bool:
        return True

    def orphan(self, lease: Lease) -> None:
        """Nothing was started, so nothing is left running."""

    def close(self) -> None:
        """Nothing was made."""


def _nothing_to(what: str) -> AssertionError:
    return AssertionError(f"a run planned with nothing to launch was asked to {what}")
