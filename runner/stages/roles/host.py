"""What runs inside a replica's Ray actor: the host around the user's role actor, and the
context its `run(ctx)` polls.

The host is a two-thread actor so that `cancel()` and `state()` reach it while `run` works.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from runner.build import build
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


class RoleHost:
    """Runs inside a Ray actor (two threads: `run` and `cancel` / `state` beside it)."""

    def __init__(self, actor: dict[str, Any], role: str, replica: int, steps: int) -> None:
        self._flag = threading.Event()
        self.obj: Any = build(actor)  # the user's role object: run(ctx), maybe state()/restore()
        self.ctx = RoleContext(role, replica, steps, self._flag)

    def ready(self) -> Started:
        return here()

    def run(self, saved: Any) -> dict[str, Any]:
        if saved is not None and hasattr(self.obj, "restore"):
            self.obj.restore(saved)
        result = self.obj.run(self.ctx)
        return {"cancelled": self._flag.is_set(), "state": self.state(), "result": result}

    def cancel(self) -> None:
        self._flag.set()

    def state(self) -> Any:
        return self.obj.state() if hasattr(self.obj, "state") else None


def saves_state(target: str) -> bool:
    """Whether the actor class has `state()` (its preemption then loses no work)."""

    module, _, attr = target.rpartition(".")
    try:
        return hasattr(getattr(importlib.import_module(module), attr), "state")
    except (ImportError, AttributeError):
        return False
