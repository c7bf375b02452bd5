"""The dynamic placement groups of one `roles` stage: created on demand up to
`max_dynamic_pgs`, pinned to the node the scheduler chose, and reused by best fit of shape.
(Reserved groups are leases of the roles kind itself.)

Every group's resources are held through the scheduler, so the scheduler's picture and Ray's
agree: a dynamic group by the grant of the replica that uses it, and, while idle, by that grant
parked in the scheduler. A parked
group is taken over whole by the next replica of this stage that fits it (the scheduler picks
the best fit, never a big group for a small replica when a fitting one exists) or reclaimed by
anyone who needs its resources, in which case it is removed here. Creating a group after
removing one costs Ray about a second; reusing one costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.scheduler.core import Grant, Scheduler

log = logging.getLogger(__name__)


@dataclass
class PGPool:
    """Creates, lends, reuses and finally removes the placement groups of one stage."""

    stage: str
    scheduler: Scheduler
    max_dynamic: int
    reuse: bool = True
    _groups: dict[Grant, Any] = field(default_factory=dict)
    _idle: set[Grant] = field(default_factory=set)
    _doomed: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = 0
    reused: int = 0
    # most groups in use at once (`stats`)
    peak: int = 0

    @property
    def tag(self) -> str:
        return f"pg:{self.stage}"

    # dynamic groups

    def group_for(self, grant: Grant, make: Callable[[], Any]) -> tuple[Any, bool] | None:
        """(group, reused) for an admitted replica: an idle group it took over, else a new one
        from `make` (pinned to the grant's node); None when `max_dynamic_pgs` is reached with
        no idle group to give up (the replica then runs as a plain actor on its grant's node)."""
        with self._lock:
            if grant.reused is not None and grant.reused in self._groups:
                self._idle.discard(grant.reused)
                self._groups[grant] = self._groups.pop(grant.reused)
                self.reused += 1
                return self._groups[grant], True
        if len(self._groups) >= self.max_dynamic and not self._evict_one():
            return None
        pg = make()
        with self._lock:
            self._groups[grant] = pg
            self.peak = max(self.peak, len(self._groups) - len(self._idle))
        self.created += 1
        return pg, False

    def stats(self) -> dict[str, int]:
        """ScheduleMesh's `pg_pool_stats()` counts for these dynamic groups: made, reused, in
        use now (and at most at once)."""
        with self._lock:
            in_use = len(self._groups) - len(self._idle)
        return {
            "created": self.created,
            "reused": self.reused,
            "in_use": in_use,
            "peak_in_use": self.peak,
        }

    def give_back(self, grant: Grant) -> None:
        """A replica is done with its grant: park its group for reuse, or remove it."""
        with self._lock:
            has_group = grant in self._groups
            if has_group and self.reuse:
                self._idle.add(grant)
        if has_group and self.reuse:
            self.scheduler.park(grant, self.tag, self._reclaimed)
            return
        self.scheduler.release(grant)
        with self._lock:
            pg = self._groups.pop(grant, None)
            if pg is not None:
                self._doomed.append(pg)
        self.sweep()

    def _reclaimed(self, hold: Grant, reason: str) -> None:
        """Told by the scheduler (under its lock) that an idle group's resources were taken."""
        with self._lock:
            self._idle.discard(hold)
            pg = self._groups.pop(hold, None)
            if pg is not None:
                self._doomed.append(pg)

    def _evict_one(self) -> bool:
        """Remove one idle group to stay within `max_dynamic_pgs`; False when none is idle."""
        with self._lock:
            if not self._idle:
                return False
            hold = next(iter(self._idle))
        self.scheduler.release(hold)
        self._reclaimed(hold, "evicted")
        self.sweep()
        return True

    def sweep(self) -> None:
        """Remove the groups whose resources were reclaimed."""
        with self._lock:
            doomed, self._doomed = self._doomed, []
        for pg in doomed:
            remove(pg)

    def close(self) -> None:
        """Remove every group of the stage and give every resource back (end, Ctrl-C)."""
        with self._lock:
            groups = list(self._groups.items())
            self._groups.clear()
            self._idle.clear()
        for grant, pg in groups:
            self.scheduler.release(grant)
            remove(pg)
        self.sweep()


def remove(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception as exc:  # already gone (Ray shut down, or removed twice): nothing held
        log.debug("placement group %s: %s", pg.id, exc)
