"""The placement groups of one `roles` stage: reserved ones kept for their roles, dynamic ones
created on demand up to `max_dynamic_pgs` and reused by best fit of shape.

Every group's resources are held through the scheduler, so the scheduler's picture and Ray's
agree: a reserved group by a grant taken when the stage starts; a dynamic group by the grant
of the replica that uses it, and, while idle, by that grant parked in the scheduler. A parked
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

from runner.resources import Resources
from runner.scheduler.core import Grant, Scheduler

log = logging.getLogger(__name__)


def bundle(resources: Resources) -> dict[str, float]:
    """A placement-group bundle for `resources` (Ray rejects zero amounts)."""
    out = {"CPU": resources.cpus, "GPU": resources.gpus, "memory": float(int(resources.memory))}
    out.update(dict(resources.custom))
    return {k: v for k, v in out.items() if v > 0}


@dataclass(eq=False)
class Reserved:
    """A reserved group: created at stage start, kept for the roles that ask for one."""

    shape: Resources
    role: str | None
    grant: Grant
    pg: Any
    busy: bool = False


@dataclass
class PGPool:
    """Creates, lends, reuses and finally removes the placement groups of one stage."""

    stage: str
    scheduler: Scheduler
    max_dynamic: int
    reuse: bool = True
    reserved: list[Reserved] = field(default_factory=list)
    _groups: dict[Grant, Any] = field(default_factory=dict)
    _idle: set[Grant] = field(default_factory=set)
    _doomed: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = 0
    reused: int = 0

    @property
    def tag(self) -> str:
        return f"pg:{self.stage}"

    # reserved groups

    def reserve(
        self,
        shapes: list[tuple[Resources, str | None]],
        priority: float,
        pool: str,
        cancelled: Callable[[], bool],
    ) -> None:
        """Take the resources of every reserved group from the scheduler (within the pool's
        quota, never preemptible) and create the groups."""
        for i, (shape, role) in enumerate(shapes):
            grant = self.scheduler.acquire(
                f"{self.stage}/reserved-{i}", shape, priority, cancelled=cancelled, pool=pool
            )
            if grant is None:
                return
            try:
                pg = _create(shape)
            except BaseException:  # the scheduler is the run's: never keep what we cannot use
                self.scheduler.release(grant)
                raise
            self.reserved.append(Reserved(shape, role, grant, pg))
            self.created += 1

    def take_reserved(self, role: str, need: Resources) -> Reserved | None:
        """A free reserved group for `role`: its own first, else the best fit of shape."""
        free = [r for r in self.reserved if not r.busy and need.fits_in(r.shape)]
        mine = [r for r in free if r.role == role] or [r for r in free if r.role is None]
        if not mine:
            return None
        best = min(mine, key=lambda r: (r.shape.cpus + 8 * r.shape.gpus, r.shape.memory))
        best.busy = True
        return best

    # dynamic groups

    def group_for(self, grant: Grant) -> tuple[Any, bool] | None:
        """(group, reused) for an admitted replica; None when `max_dynamic_pgs` is reached with
        no idle group to give up (the replica then runs as a plain actor on its grant)."""
        with self._lock:
            if grant.reused is not None and grant.reused in self._groups:
                self._idle.discard(grant.reused)
                self._groups[grant] = self._groups.pop(grant.reused)
                self.reused += 1
                return self._groups[grant], True
        if len(self._groups) >= self.max_dynamic and not self._evict_one():
            return None
        pg = _create(grant.resources)
        with self._lock:
            self._groups[grant] = pg
        self.created += 1
        return pg, False

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
            _remove(pg)

    def close(self) -> None:
        """Remove every group of the stage and give every resource back (end, Ctrl-C)."""
        with self._lock:
            groups = list(self._groups.items())
            self._groups.clear()
            self._idle.clear()
        for grant, pg in groups:
            self.scheduler.release(grant)
            _remove(pg)
        for r in self.reserved:
            self.scheduler.release(r.grant)
            _remove(r.pg)
        self.reserved = []
        self.sweep()


def _create(shape: Resources) -> Any:
    from ray.util.placement_group import placement_group

    return placement_group([bundle(shape)], strategy="STRICT_PACK")


def _remove(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception as exc:  # already gone (Ray shut down, or removed twice): nothing held
        log.debug("placement group %s: %s", pg.id, exc)
