"""Auto CPU sizing for pool workers, from the cluster's *total* CPUs.

PyChecker sized workers from the CPUs that happened to be free at start, so a busy cluster
got starved workers for the whole run. Here the size depends only on the cluster's total and
the worker count: clamp(0.9 × total / num_workers, 0.1, 2.0), floored to 0.01 so the workers
never ask for more than the cluster has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from runner.errors import SpecError

CPUS_ENV = "RUNNER_CPUS_PER_WORKER"
CONCURRENCY_ENV = "RUNNER_WORKER_CONCURRENCY"
MIN_CPUS, MAX_CPUS, SHARE = 0.1, 2.0, 0.9
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Sizing:
    """CPUs per worker and where that number came from, for the plan and the log."""

    cpus: float
    source: str  # env | spec | auto

    def describe(self, stage: str, total_cpus: float, num_workers: int) -> str:
        if self.source == "auto":
            why = f"auto: total_cpus={total_cpus:g}, num_workers={num_workers}"
        elif self.source == "env":
            why = f"from {CPUS_ENV}"
        else:
            why = "from the spec"
        return f"{stage}: cpus_per_worker={self.cpus:g} ({why})"


def auto_cpus(total_cpus: float, num_workers: int) -> float:
    """clamp(0.9 × total / num_workers, 0.1, 2.0), floored to hundredths."""
    share = min(max(SHARE * total_cpus / num_workers, MIN_CPUS), MAX_CPUS)
    return math.floor(share * 100 + 1e-9) / 100


def cpus_per_worker(
    setting: str | float,
    num_workers: int,
    total_cpus: float,
    env: Mapping[str, str] = os.environ,
) -> Sizing:
    """Precedence: env RUNNER_CPUS_PER_WORKER, then a number in the spec, then auto."""
    if env.get(CPUS_ENV):
        text = env[CPUS_ENV]
        if text == "auto":
            return Sizing(auto_cpus(total_cpus, num_workers), "auto")
        return Sizing(_positive(CPUS_ENV, text, float), "env")
    if setting != "auto":
        return Sizing(float(setting), "spec")
    return Sizing(auto_cpus(total_cpus, num_workers), "auto")


def max_concurrency(setting: int, env: Mapping[str, str] = os.environ) -> int:
    """Threads per worker actor: env RUNNER_WORKER_CONCURRENCY, then the spec."""
    if env.get(CONCURRENCY_ENV):
        return _positive(CONCURRENCY_ENV, env[CONCURRENCY_ENV], int)
    return setting


def _positive(name: str, text: str, kind: type[N]) -> N:
    try:
        value = kind(text)
    except ValueError:
        value = kind(0)
    if value <= 0:
        what = "a positive integer" if kind is int else "a positive number or auto"
        raise SpecError([f"environment: {name}={text!r}: expected {what}"])
    return value


def fits(capacity: float, need: float) -> int:
    """How many units of `need` fit in `capacity` (tolerant of float noise)."""
    if need <= 0:
        return 1 << 30
    return math.floor(capacity / need + 1e-9)
