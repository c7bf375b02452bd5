"""The `jobs` stage on 200 trivial shell jobs against `concurrent.futures` at the same
concurrency.

runner: the real CLI on `specs/pipeline/bench_jobs.yaml`: 200 × `true`, half a CPU each, so
four run at once on the 2-CPU Ray. Each job is admitted by the scheduler, runs as a Ray task in
its worker's jobs group (guarded by the watcher that kills the group if the worker dies), its
stdout and stderr go to log files, and every start and end is a ledger row. Baseline: a thread
pool of four running `subprocess.run(["true"])`, output to /dev/null: the least any runner of
these commands can do, and what a user would write without one.

The table's row is the whole CLI (Hydra's compose, the plan, the run artifacts included: fixed
costs a user pays). Three more rows, against the same baseline, say where the stage itself is:
`[stage]` is the stage's wall from the run's summary.json, and `[ray tasks]` is Ray's own floor
for one task per job, measured in the same test: 200 Ray tasks with the jobs' options (half a
CPU, pinned to the node, no retries), four in flight, each a `subprocess.run(["true"])`.
`[ray tasks, argv]` is the same floor with the one thing a task per job cannot do without: its
command, passed as the task's argument (`subprocess.run(argv)`), as a user writing raw Ray
would; a task with an argument costs Ray more than one without (its arguments bound to the
function's signature and serialized by the driver, read back by the worker).
`extra_info` also keeps the ledger's span (first job start to last job end).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from benchmarks.runs import run_cli
from runner.store import Ledger

JOBS, CONCURRENCY = 200, 4
ROUNDS = 7


def plain_pool() -> None:
    def one(_: int) -> int:
        return subprocess.run(["true"], stdout=subprocess.DEVNULL, check=True).returncode

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        assert sum(pool.map(one, range(JOBS))) == 0


def true_task() -> int:
    """One job as a bare Ray task: the command and nothing around it."""
    return subprocess.run(["true"], stdout=subprocess.DEVNULL, check=True).returncode


def argv_task(argv: list[str]) -> int:
    """One job as a Ray task told its command: the least a task per job must be given."""
    return subprocess.run(argv, stdout=subprocess.DEVNULL, check=True).returncode


def ray_tasks(with_argv: bool = False) -> None:
    """JOBS bare Ray tasks with the jobs' options, a new one as soon as one of the
    CONCURRENCY in flight ends (as the stage submits); `with_argv`: each told its command."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    task = ray.remote(argv_task if with_argv else true_task).options(
        num_cpus=0.5,
        max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    )
    pending: list[Any] = []
    sent = codes = 0
    while sent < JOBS or pending:
        while len(pending) < CONCURRENCY and sent < JOBS:
            pending.append(task.remote(["true"]) if with_argv else task.remote())
            sent += 1
        ready, pending = ray.wait(pending, num_returns=1)
        codes += sum(ray.get(ready))
    assert codes == 0


def file_create_us(where: Path, count: int = 200) -> float:
    """Microseconds to make one empty file in `where`: the machine's disk as the jobs find it
    (the stage makes two log files per job, its floors none). The files are kept: ext4
    without a journal scans the inodes removed in the last minutes at every create, which is
    why a file under /tmp took 20 us on a fresh VM and 300-400 us after a few runs that
    removed their run directories."""
    where.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for n in range(count):
        os.close(os.open(where / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return 1e6 * (time.perf_counter() - t0) / count


def stage_times(run_dir: Path) -> tuple[float, float]:
    """(the stage's wall from summary.json, the ledger's first job start to last job end)."""
    wall = json.loads((run_dir / "summary.json").read_text())["stages"]["work"]["wall_s"]
    ledger = Ledger(run_dir / "ledger.sqlite", readonly=True)
    try:
        spans = [(r["started"], r["ended"]) for r in ledger.spans("work", 0.0)]
    finally:
        ledger.close()
    return wall, max(e for _, e in spans) - min(s for s, _ in spans)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@pytest.mark.usefixtures("ray_session")
def test_jobs_200_trivial(
    compare: Callable[..., None],
    extra_row: Callable[[str, float, float], None],
    benchmark: Any,
    tmp_path: Path,
) -> None:
    created = file_create_us(tmp_path / "disk")
    count = iter(range(100))
    found: list[tuple[float, float]] = []
    floor: list[float] = []
    argv_floor: list[float] = []

    def floors() -> tuple[tuple[()], dict[str, Any]]:
        """Before each round of runner (untimed for it): Ray's two floors, so the three
        alternate and a drift of the machine's speed moves them alike."""
        for with_argv, times in ((False, floor), (True, argv_floor)):
            t0 = time.perf_counter()
            ray_tasks(with_argv)
            times.append(time.perf_counter() - t0)
        return (), {}

    def runner() -> None:
        run_dir = tmp_path / f"run-{next(count)}"
        run_cli("bench_jobs", run_dir)
        found.append(stage_times(run_dir))

    # the first floor also starts the Ray workers the half-CPU tasks need (the max in the
    # JSON); the medians are the steady state
    compare(runner, plain_pool, rounds=ROUNDS, setup=floors)
    base = benchmark.extra_info["baseline_median_s"]
    stage, span = (statistics.median(x) for x in zip(*found, strict=True))
    ray_floor, ray_argv_floor = statistics.median(floor), statistics.median(argv_floor)
    benchmark.extra_info.update(
        file_create_us=created,
        stage_wall_s=spread([w for w, _ in found]),
        ledger_span_s=spread([s for _, s in found]),
        ray_tasks_floor_s=spread(floor),
        stage_ratio=stage / base,
        ledger_span_ratio=span / base,
        ray_tasks_argv_floor_s=spread(argv_floor),
        ray_tasks_floor_ratio=ray_floor / base,
        stage_over_ray_floor=stage / ray_floor,
        stage_over_ray_argv_floor=stage / ray_argv_floor,
    )
    extra_row(f"{benchmark.name}[stage]", stage, base)
    extra_row(f"{benchmark.name}[ray tasks]", ray_floor, base)
    extra_row(f"{benchmark.name}[ray tasks, argv]", ray_argv_floor, base)
