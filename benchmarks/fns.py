"""Work the benchmarks hand to runner and to their baselines (importable by Ray workers).

A module of its own, light as a user's worker module is: a Ray worker imports it before its
first item, so a test module's imports (the runner's CLI) would count as worker start-up.
"""

from __future__ import annotations

import random
import time
from typing import Any


def same_frame(frame: Any) -> Any:
    """A shard function that does no work: the benchmark measures the stage around it."""
    return frame


class Stepper:
    """The raw-Ray twin of `runner.examples.rlhf.RoleActor`: steps of `step_seconds`, no
    cooperative stop (a raw Ray user preempts with `ray.kill`)."""

    def ready(self) -> bool:
        return True

    def run(self, steps: int, step_seconds: float) -> int:
        for _ in range(steps):
            time.sleep(step_seconds)
        return steps


def square(item: int) -> int:
    """A pool item that does almost nothing: the benchmark measures the pool around it."""
    return item * item


class Square:
    def __call__(self, item: int) -> int:
        return item * item


class Nap:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, item: int) -> int:
        time.sleep(self.seconds)
        return item


class Burn:
    """A PyChecker-like item: 20-200 ms of CPU work, the same for the same item."""

    def __call__(self, item: int) -> int:
        seconds = 0.02 + 0.18 * random.Random(item).random()
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return item
