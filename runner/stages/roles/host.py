"""What runs inside a replica's Ray actor: the host around the user's role actor, and the
context its `run(ctx)` polls.

The host is a two-thread actor so that `cancel()` and `state()` reach it while `run` works.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol, TypedDict, runtime_checkable

from runner.build import build, locate
from runner.placement import Started, here


class RoleContext:
    """What a role actor's `run(ctx)` sees: who it is, its steps, and whether to stop."""

    def __init__(self, role: str, replica: int, steps: int, flag: threading.Event) -> None:
        self.role, self.replica, self.steps = role, replica, steps
        self._flag = flag

    @property
    def cancelled(self) -> bool:
        """True once the runner asks the replica to stop (preemption or Ctrl-C)."""
        return self._flag.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, cut short by a stop request; True when cut short. For work
        a stop may drop (a rollout's batch, generated again after `restore`), so that a
        preemptor does not wait for it: ScheduleMesh's advice that `cancel()` return at once."""
        return self._flag.wait(seconds)


@runtime_checkable
class Role(Protocol):
    """The user's role object: it runs, polling its context."""

    def run(self, ctx: RoleContext) -> object: ...


@runtime_checkable
class SavesState(Protocol):
    """A role object that keeps its progress (`state()`), so a preempted replica resumes."""

    def state(self) -> object: ...


@runtime_checkable
class Restores(Protocol):
    """A role object that takes back a state it saved."""

    def restore(self, state: object) -> None: ...


class HostReply(TypedDict):
    """What `RoleHost.run` answers: whether it was asked to stop, its state, its result."""

    cancelled: bool
    state: object
    result: object


class RoleHost:
    """Runs inside a Ray actor (two threads: `run` and `cancel` / `state` beside it)."""

    def __init__(self, actor: Mapping[str, object], role: str, replica: int, steps: int) -> None:
        self._flag = threading.Event()
        self.obj = build(actor)  # a Role, maybe SavesState and Restores
        self.ctx = RoleContext(role, replica, steps, self._flag)

    def ready(self) -> Started:
        return here()

    def run(self, saved: object) -> HostReply:
        if saved is not None and isinstance(self.obj, Restores):
            self.obj.restore(saved)
        if not isinstance(self.obj, Role):
            raise AttributeError(f"{type(self.obj).__name__!r} object has no attribute 'run'")
        result = self.obj.run(self.ctx)
        return HostReply(cancelled=self._flag.is_set(), state=self.state(), result=result)

    def cancel(self) -> None:
        self._flag.set()

    def state(self) -> object:
        return self.obj.state() if isinstance(self.obj, SavesState) else None


def saves_state(target: str) -> bool:
    """Whether the actor class has `state()` (its preemption then loses no work)."""
    return hasattr(_actor_class(target), "state")


def drops_step(target: str) -> bool:
    """Whether the actor class says `drops_step = True`: asked to stop, it drops the step in
    progress (`ctx.wait` cut short) rather than finishing it, which `cluster=sim` models."""
    return bool(getattr(_actor_class(target), "drops_step", False))


def _actor_class(target: str) -> object:
    """The class `target` names, found as the actor is built (None when it cannot be here)."""
    try:
        return locate(target)
    except Exception:  # not importable in the driver: the actor's own process says why
        return None
