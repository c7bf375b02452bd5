"""The dynamic placement groups of one `roles` stage: made on demand up to `max_dynamic_pgs`,
pinned to the node the scheduler chose, and reused by best fit of shape. (Reserved groups are
leases of the roles kind itself.)

Every group's resources are held through the scheduler, so the scheduler's picture and the
cluster's agree: a dynamic group by the grant of the replica that uses it, and, while idle, by
that grant parked in the scheduler. A parked group is taken over whole by the next replica of
this stage that fits it (the scheduler picks the best fit, never a big group for a small replica
when a fitting one exists) or reclaimed by anyone who needs its resources, in which case it is
removed here. Creating a group after removing one costs Ray about a second; reusing one costs
nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from runner.calls import NEW_GROUP
from runner.lease import Lease
from runner.scheduler.core import Grant
from runner.verdicts import Park, Release, RemoveGroup, Verdict


@dataclass
class DynamicGroups:
    """Lends, reuses and finally removes the dynamic placement groups of one stage."""

    stage: str
    max_dynamic: int
    reuse: bool = True
    # every group (in use or idle) by the grant that holds it, and the idle ones
    _groups: dict[Grant, object] = field(default_factory=dict)
    _idle: set[Grant] = field(default_factory=set)
    # groups whose idle grants another request reclaimed: to remove
    _doomed: list[object] = field(default_factory=list)
    # told under the scheduler's lock (`_reclaimed`): guarded
    _lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = 0
    reused: int = 0
    # most groups in use at once
    peak: int = 0

    @property
    def tag(self) -> str:
        return f"pg:{self.stage}"

    def group_for(self, grant: Grant) -> tuple[object | None, list[Verdict]]:
        """For an admitted replica: the group it took over (the scheduler's reuse), else
        `NEW_GROUP` (an idle group removed first when `max_dynamic_pgs` are made), else None
        (all in use: it waits for one); and what must happen first."""
        with self._lock:
            if grant.reused is not None and grant.reused in self._groups:
                self._idle.discard(grant.reused)
                group = self._groups[grant] = self._groups.pop(grant.reused)
                self.reused += 1
                return group, []
            first: list[Verdict] = []
            if len(self._groups) >= self.max_dynamic:
                if not self._idle:
                    return None, []
                idle = self._idle.pop()
                first = [Release(idle), RemoveGroup(self._groups.pop(idle))]
            return NEW_GROUP, first

    def made(self, lease: Lease) -> None:
        """The backend made the group of a replica started with `NEW_GROUP`."""
        assert lease.grant is not None
        with self._lock:
            self._groups[lease.grant] = lease.group
            self.peak = max(self.peak, len(self._groups) - len(self._idle))
        self.created += 1

    def give_back(self, lease: Lease) -> list[Verdict]:
        """A replica is done with its grant: park its group for reuse, or remove it."""
        grant = lease.grant
        with self._lock:
            if grant is None or grant not in self._groups:
                return []
            if self.reuse:
                self._idle.add(grant)
                return [Park(lease, self.tag, self._reclaimed)]
            group = self._groups.pop(grant)
        return [RemoveGroup(group)]

    def _reclaimed(self, hold: Grant, reason: str) -> None:
        """Told by the scheduler (under its lock) that an idle group's resources were taken."""
        with self._lock:
            self._idle.discard(hold)
            group = self._groups.pop(hold, None)
            if group is not None:
                self._doomed.append(group)

    def sweep(self) -> list[Verdict]:
        """Remove the groups whose resources were reclaimed (looked at before every launch:
        none, mostly, seen without the lock; one told meanwhile is swept at the next look)."""
        if not self._doomed:
            return []
        with self._lock:
            doomed, self._doomed = self._doomed, []
        return [RemoveGroup(group) for group in doomed]

    def close(self) -> list[Verdict]:
        """Remove every group left (idle ones: their parked grants given back too)."""
        with self._lock:
            groups = list(self._groups.items())
            idle = set(self._idle)
            self._groups.clear()
            self._idle.clear()
        out: list[Verdict] = []
        for grant, group in groups:
            if grant in idle:
                out.append(Release(grant))
            out.append(RemoveGroup(group))
        return out + self.sweep()

    def stats(self) -> dict[str, int]:
        """ScheduleMesh's `pg_pool_stats()` counts for these groups: made, reused, in use now
        (and at most at once)."""
        with self._lock:
            in_use = len(self._groups) - len(self._idle)
        return {
            "created": self.created,
            "reused": self.reused,
            "in_use": in_use,
            "peak_in_use": self.peak,
        }
