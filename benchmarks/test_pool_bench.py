"""Pool throughput against a hand-written Ray actor pool of the same size and CPU setting.

The baseline is what users write today: `ray.util.ActorPool` over the same worker class, one
item per call. runner's figure includes everything a user gets: planning, the ledger (every
item recorded), the results parquet.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.cli import main

ROOT = Path(__file__).resolve().parent.parent
WORKERS, CPUS = 2, 0.9


class Square:
    def __call__(self, item: int) -> int:
        return item * item


class Nap:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, item: int) -> int:
        import time

        time.sleep(self.seconds)
        return item


def runner_pool(target: str, n: int, *args: str) -> Callable[[], None]:
    def run() -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
        try:
            code = main(
                [
                    "--config-dir",
                    str(ROOT / "tests" / "specs"),
                    "pipeline=misbehave",
                    f"run.dir={run_dir}",
                    "run.progress=off",
                    "hydra/job_logging=disabled",
                    f"pipeline.stages.work.num_workers={WORKERS}",
                    f"pipeline.stages.work.cpus_per_worker={CPUS}",
                    f"pipeline.stages.work.worker._target_={target}",
                    f"pipeline.stages.work.items.range={n}",
                    *args,
                ]
            )
            assert code == 0
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
def test_pool_trivial_items(compare: Callable[..., None]) -> None:
    n = 5000
    compare(runner_pool("benchmarks.test_pool_bench.Square", n), raw_actor_pool(Square, n))


@pytest.mark.usefixtures("ray_session")
def test_pool_20ms_items(compare: Callable[..., None]) -> None:
    n = 100
    compare(
        runner_pool(
            "benchmarks.test_pool_bench.Nap", n, "+pipeline.stages.work.worker.seconds=0.02"
        ),
        raw_actor_pool(Nap, n, 0.02),
    )
