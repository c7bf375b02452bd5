"""Pool throughput against a hand-written Ray actor pool of the same size and CPU setting.

The baseline is what users write today: `ray.util.ActorPool` over the same worker class, one
item per call. runner's figure includes everything a user gets: planning, the ledger (every
item recorded), the results parquet.

Steady state, from the ledger's end times of the middle 80% of items (start-up and tail left
out): for trivial items the per-item cost against a `multiprocessing.Pool` (fork, created
before timing) mapping the same items with runner's own batch size; for 20 ms items the
throughput against the ideal, workers / 20 ms. Utilization: a PyChecker-like pool (items of
20-200 ms of CPU work), busy worker time / (granted CPUs x wall).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.fns import Nap, Square, square
from runner.cli import main
from runner.store import Ledger

ROOT = Path(__file__).resolve().parent.parent
WORKERS, CPUS = 2, 0.9


def ledger_times(run_dir: Path) -> list[tuple[float, float]]:
    """(started, ended) of every unit of the run's `work` stage, by end."""
    ledger = Ledger(run_dir / "ledger.sqlite", readonly=True)
    try:
        spans = [(r["started"], r["ended"]) for r in ledger.spans("work", 0.0)]
    finally:
        ledger.close()
    return sorted(spans, key=lambda s: s[1])


def middle(ends: list[float]) -> tuple[int, float]:
    """(items, seconds) between the ends of the 10th and the 90th percentile item."""
    lo, hi = len(ends) // 10, len(ends) - 1 - len(ends) // 10
    return hi - lo, ends[hi] - ends[lo]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_pool(
    run_dir: Path, target: str, n: int, *args: str, workers: int = WORKERS, cpus: float = CPUS
) -> None:
    """One CLI run of a pool of `workers` x `cpus` over `n` items (in the session's Ray)."""
    code = main(
        [
            "--config-dir",
            str(ROOT / "tests" / "specs"),
            "pipeline=misbehave",
            f"run.dir={run_dir}",
            "run.progress=off",
            "hydra/job_logging=disabled",
            f"pipeline.stages.work.num_workers={workers}",
            f"pipeline.stages.work.cpus_per_worker={cpus}",
            f"pipeline.stages.work.worker._target_={target}",
            f"pipeline.stages.work.items.range={n}",
            *args,
        ]
    )
    assert code == 0


def runner_pool(
    target: str,
    n: int,
    *args: str,
    times: list[list[tuple[float, float]]] | None = None,
    walls: list[float] | None = None,
) -> Callable[[], None]:
    """One CLI run of the pool; with `times`, each run's ledger (started, ended) pairs; with
    `walls`, each run's stage wall (summary.json: workers' start-up to the last item's end and
    the workers' release, without the CLI's compose, plan and run artifacts)."""

    def run() -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
        try:
            run_pool(run_dir, target, n, *args)
            if times is not None:
                times.append(ledger_times(run_dir))
            if walls is not None:
                summary = json.loads((run_dir / "summary.json").read_text())
                walls.append(summary["stages"]["work"]["wall_s"])
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    return run


def raw_actor_pool(cls: type, n: int, *init: object) -> Callable[[], None]:
    def run() -> None:
        import ray
        from ray.util import ActorPool

        remote = ray.remote(cls)
        actors = [remote.options(num_cpus=CPUS).remote(*init) for _ in range(WORKERS)]
        pool = ActorPool(actors)
        out = list(pool.map(lambda a, v: a.__call__.remote(v), range(n)))
        assert len(out) == n
        for a in actors:
            ray.kill(a)

    return run


@pytest.mark.usefixtures("ray_session")
def test_pool_trivial_items(compare: Callable[..., None], benchmark: Any) -> None:
    n = 5000
    times: list[list[tuple[float, float]]] = []
    compare(runner_pool("benchmarks.fns.Square", n, times=times), raw_actor_pool(Square, n))
    # steady state: runner's cost per item in the middle 80%, against a multiprocessing.Pool
    # mapping the same items in runner's own batches (items that ended together)
    per_item = []
    batches = []
    for run in times:
        count, seconds = middle([end for _, end in run])
        per_item.append(seconds / count)
        # the batch each item travelled in (items of one reply share their end time)
        batches += [size for size in Counter(end for _, end in run).values() for _ in range(size)]
    batch = max(1, round(statistics.median(batches)))
    pool = multiprocessing.get_context("fork").Pool(WORKERS)
    try:
        pool.map(square, range(WORKERS))  # its workers are up before timing
        plain = []
        for _ in range(len(times)):
            t0 = time.perf_counter()
            assert len(pool.map(square, range(n), chunksize=batch)) == n
            plain.append((time.perf_counter() - t0) / n)
    finally:
        pool.terminate()
    benchmark.extra_info.update(
        steady_per_item_us=spread([1e6 * x for x in per_item]),
        mp_pool_per_item_us=spread([1e6 * x for x in plain]),
        batch_size=batch,
        steady_ratio_vs_mp_pool=statistics.median(per_item) / statistics.median(plain),
    )


@pytest.mark.usefixtures("ray_session")
def test_pool_20ms_items(
    compare: Callable[..., None],
    extra_row: Callable[[str, float, float], None],
    benchmark: Any,
) -> None:
    """The table's row is the whole CLI; `[stage]` is the stage alone (its workers' start-up,
    every item, its tail) against the same `ActorPool` run (its actors' start-up, every item,
    their kill): the one-loop issue's "whole stage", where "steady" leaves start-up and tail
    out."""
    n, seconds = 100, 0.02
    times: list[list[tuple[float, float]]] = []
    walls: list[float] = []
    compare(
        runner_pool(
            "benchmarks.fns.Nap",
            n,
            f"+pipeline.stages.work.worker.seconds={seconds}",
            times=times,
            walls=walls,
        ),
        raw_actor_pool(Nap, n, seconds),
        rounds=5,
    )
    ideal = WORKERS / seconds
    fractions = []
    for run in times:
        count, span = middle([end for _, end in run])
        fractions.append(count / span / ideal)
    base = benchmark.extra_info["baseline_median_s"]
    stage = statistics.median(walls)
    benchmark.extra_info.update(
        steady_fraction_of_ideal=spread(fractions),
        stage_wall_s=spread(walls),
        stage_ratio=stage / base,
    )
    extra_row(f"{benchmark.name}[stage]", stage, base)


@pytest.mark.usefixtures("ray_session")
def test_pool_utilization_cpu_items(benchmark: Any, tmp_path: Path) -> None:
    """Busy worker time (the items' durations in the ledger) over granted CPUs x wall: the
    stage's wall from the summary, and the span from the first start to the last end."""
    n, workers, cpus = 120, 2, 1.0
    found: list[tuple[float, float]] = []
    count = iter(range(100))

    def run() -> None:
        run_dir = tmp_path / f"run-{next(count)}"
        run_pool(run_dir, "benchmarks.fns.Burn", n, workers=workers, cpus=cpus)
        spans = ledger_times(run_dir)
        busy = sum(end - start for start, end in spans)
        wall = json.loads((run_dir / "summary.json").read_text())["stages"]["work"]["wall_s"]
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        found.append((busy / (workers * cpus * wall), busy / (workers * cpus * (last - first))))

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        utilization_of_stage_wall=spread([f for f, _ in found]),
        utilization_first_start_to_last_end=spread([f for _, f in found]),
    )
