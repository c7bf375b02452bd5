"""Auto CPU sizing for pool workers, from the cluster's *total* CPUs.

PyChecker sized workers from the CPUs that happened to be free at start, so a busy cluster
got starved workers for the whole run. Here the size depends only on the cluster's total and
the worker count: clamp(0.9 × total / num_workers, 0.1, 2.0), floored to 0.01 so the workers
never ask for more than the cluster has.

PyChecker users already have `PYCHECKER_WORKER_CPUS` / `PYCHECKER_WORKER_CONCURRENCY` in their
environment; they mean what the `RUNNER_` names mean (which win when both are set), and the
plan prints PyChecker's own log line for an auto-sized worker, so its documentation still reads
true.
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
# Each setting's variables, the first set one winning: runner's own name, then PyChecker's.
CPUS_VARS = (CPUS_ENV, "PYCHECKER_WORKER_CPUS")
CONCURRENCY_VARS = (CONCURRENCY_ENV, "PYCHECKER_WORKER_CONCURRENCY")
MIN_CPUS, MAX_CPUS, SHARE = 0.1, 2.0, 0.9
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Sizing:
    """CPUs per worker and where that number came from, for the plan and the log."""

    cpus: float
    source: str  # auto | spec | the environment variable that set it

    def describe(
        self,
        stage: str,
        total_cpus: float,
        num_workers: int,
        env: Mapping[str, str] = os.environ,
    ) -> str:
        """The plan's sizing line, naming an environment variable that set the concurrency."""
        if self.source == "auto":
            # PyChecker's log line, word for word (`0.35`, `total_cpus=200`).
            line = (
                f"Auto-calculated num_cpus_per_worker: {self.cpus:g} "
                f"(total_cpus={total_cpus:g}, num_workers={num_workers})"
            )
        else:
            why = "from the spec" if self.source == "spec" else f"from {self.source}"
            line = f"cpus_per_worker={self.cpus:g} ({why})"
        found = _lookup(env, CONCURRENCY_VARS)
        if found is not None:
            name, text = found
            line += f"; max_concurrency={_positive(name, text, int)} (from {name})"
        return f"{stage}: {line}"


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
    """Precedence: RUNNER_CPUS_PER_WORKER, PYCHECKER_WORKER_CPUS, a number in the spec, auto."""
    found = _lookup(env, CPUS_VARS)
    if found is not None:
        name, text = found
        if text == "auto":
            return Sizing(auto_cpus(total_cpus, num_workers), "auto")
        return Sizing(_positive(name, text, float), name)
    if setting != "auto":
        return Sizing(float(setting), "spec")
    return Sizing(auto_cpus(total_cpus, num_workers), "auto")


def max_concurrency(setting: int, env: Mapping[str, str] = os.environ) -> int:
    """Threads per worker actor: RUNNER_WORKER_CONCURRENCY, PYCHECKER_WORKER_CONCURRENCY, spec."""
    found = _lookup(env, CONCURRENCY_VARS)
    if found is not None:
        return _positive(*found, int)
    return setting


def _lookup(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of `names` set (non-empty) in `env`, with its text."""
    for name in names:
        if env.get(name):
            return name, env[name]
    return None


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
