"""Benchmark plumbing: one local Ray for the session, and a ratio table at the end.

Each benchmark times runner with pytest-benchmark and its baseline (raw Ray or plain Python)
in the same test, on the same machine, in the same minute, and records both in `extra_info`,
so the ratio holds on a noisy shared machine where absolute times do not.
"""

from __future__ import annotations

import compileall
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import runner

_rows: list[tuple[str, float, float]] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    """runner's bytecode made first, as pip makes it when it installs the wheel: an editable
    install under `PYTHONDONTWRITEBYTECODE` (this workplace sets it) has none, so every
    process (a run's, each Ray worker's) compiled runner's modules again, about 0.2 s, while
    the baselines' Ray and Hydra came with theirs."""
    compileall.compile_dir(Path(runner.__file__).parent, quiet=1)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(
        address="local",  # our own, even when another Ray runs on the host
        num_cpus=2,
        object_store_memory=128 << 20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture
def compare(benchmark: Any) -> Callable[..., None]:
    """compare(runner_fn, baseline_fn, rounds, setup): time both, record the ratio
    runner/baseline; `setup` (untimed, before each round of runner_fn) returns its arguments,
    for a runner that uses up what it is given (a plan is run once)."""

    def run(
        runner_fn: Callable[..., Any],
        baseline_fn: Callable[[], Any],
        rounds: int = 3,
        setup: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    ) -> None:
        baseline = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            baseline_fn()
            baseline.append(time.perf_counter() - t0)
        benchmark.pedantic(runner_fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        ours = benchmark.stats.stats.median
        base = statistics.median(baseline)
        benchmark.extra_info.update(baseline_median_s=base, ratio=ours / base)
        _rows.append((benchmark.name, ours, base))

    return run


@pytest.fixture
def extra_row() -> Callable[[str, float, float], None]:
    """extra_row(name, seconds, baseline_seconds): one more line for the ratio table, for a
    part of a benchmark (a stage's own wall, a floor measured beside it) against the same
    baseline as its whole."""

    def add(name: str, ours: float, base: float) -> None:
        _rows.append((name, ours, base))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    tr = terminalreporter
    tr.section("runner vs baseline (median seconds; ratio < 1 means runner is faster)")
    tr.write_line(f"{'benchmark':<52} {'runner':>10} {'baseline':>10} {'ratio':>7}")
    for name, ours, base in _rows:
        tr.write_line(f"{name:<52} {ours:>10.4f} {base:>10.4f} {ours / base:>7.2f}")
