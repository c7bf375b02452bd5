"""Work the benchmarks hand to runner and to their baselines (importable by Ray workers)."""

from __future__ import annotations

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
