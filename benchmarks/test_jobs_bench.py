"""The `jobs` stage on 200 trivial shell jobs against `concurrent.futures` at the same
concurrency.

runner: the real CLI on `specs/pipeline/bench_jobs.yaml`: 200 × `true`, half a CPU each, so
four run at once on the 2-CPU Ray. Each job is admitted by the scheduler, runs as a Ray task in
its own process group (with the watcher that kills the group if the worker dies), its stdout
and stderr go to log files, and every start and end is a ledger row. Baseline: a thread pool of
four running `subprocess.run(["true"])`, output to /dev/null: the least any runner of these
commands can do, and what a user would write without one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.runs import run_cli

JOBS, CONCURRENCY = 200, 4


def plain_pool() -> None:
    def one(_: int) -> int:
        return subprocess.run(["true"], stdout=subprocess.DEVNULL, check=True).returncode

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        assert sum(pool.map(one, range(JOBS))) == 0


@pytest.mark.usefixtures("ray_session")
def test_jobs_200_trivial(compare: Callable[..., None], tmp_path: Path) -> None:
    count = iter(range(100))
    compare(
        lambda: run_cli("bench_jobs", tmp_path / f"run-{next(count)}"),
        plain_pool,
        # the first round also starts the Ray workers the half-CPU tasks need (the max in the
        # JSON); the median is the steady state
        rounds=5,
    )
