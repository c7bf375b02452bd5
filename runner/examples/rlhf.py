"""Toy RLHF role actors for the `roles` stage: train, reward and rollout.

Each runs `ctx.steps` steps of `step_seconds`, checks `ctx.cancelled` between steps, and keeps
its progress in `state()` so a preempted replica resumes where it stopped (`restore`). A train
or reward step is finished before it stops (an update half made is no state to keep); a
rollout drops the step it is in (`ctx.wait`: its batch is generated again after restore), so
its preemptor does not wait for it. The result records the steps done and where each restore
resumed from.
"""

from __future__ import annotations

import time
from typing import Protocol, TypedDict


class Context(Protocol):
    """What the runner hands to `run`."""

    role: str
    replica: int
    steps: int

    @property
    def cancelled(self) -> bool: ...

    def wait(self, seconds: float) -> bool: ...


class Progress(TypedDict):
    """A replica's result: the steps done, and the step each restore resumed from."""

    steps: int
    restored_from: list[int]


class Saved(TypedDict):
    """A replica's state: the step it reached, and the steps it resumed from before."""

    step: int
    restored_from: list[int]


class RoleActor:
    """A role replica that works in steps. `ignore_cancel` makes it a badly behaved one that
    never looks at `ctx.cancelled` (the runner then kills it after `cancel_timeout`)."""

    #: a stop request drops the step in progress (done again after restore) instead of
    #: waiting for its end; the runner reads it too, so `cluster=sim` stops it at once (the
    #: simulation does not model `ignore_cancel`)
    drops_step = False

    def __init__(self, step_seconds: float = 0.1, ignore_cancel: bool = False) -> None:
        self.step_seconds = step_seconds
        self.ignore_cancel = ignore_cancel
        self.step = 0
        self.restored_from: list[int] = []

    def run(self, ctx: Context) -> Progress:
        while self.step < ctx.steps:
            if ctx.cancelled and not self.ignore_cancel:
                break
            if self.drops_step and not self.ignore_cancel:
                if ctx.wait(self.step_seconds):
                    break
            else:
                time.sleep(self.step_seconds)
            self.step += 1
        return Progress(steps=self.step, restored_from=list(self.restored_from))

    def state(self) -> Saved:
        return Saved(step=self.step, restored_from=list(self.restored_from))

    def restore(self, state: Saved) -> None:
        self.step = int(state["step"])
        self.restored_from = [*state["restored_from"], self.step]


class Train(RoleActor):
    """The policy update: highest priority."""


class Reward(RoleActor):
    """The reward model: scores rollouts."""


class Rollout(RoleActor):
    """Generation: lowest priority, elastic, first to give way: a stop drops the batch in
    progress."""

    drops_step = True
