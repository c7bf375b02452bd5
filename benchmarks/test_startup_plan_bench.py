"""Start-up and planning costs.

Start-up: `python -m runner` on a one-item pipeline (embedded Ray, plan, one unit, summary)
against the floor any Ray program pays: `import ray` + `ray.init` + a Hydra compose + one task.
Planning: `make_plan` for 1k, 10k and 100k units against a plain loop hashing the same items;
the per-unit cost goes into extra_info and must stay flat as the count grows.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BASELINE = """
import ray
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir="{specs}", version_base="1.3"):
    compose(config_name="pipeline/pychecker")
ray.init(num_cpus=2, include_dashboard=False)
@ray.remote
def f(x):
    return x
ray.get(f.remote(1))
ray.shutdown()
"""


def test_startup_to_first_unit(compare: Callable[..., None], tmp_path: Path) -> None:
    def runner() -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "runner",
                "--config-dir",
                "tests/specs",
                "pipeline=misbehave",
                "pipeline.stages.work.items.range=1",
                "pipeline.stages.work.num_workers=1",
                "run.fresh=true",
                f"run.dir={tmp_path}/run",
                "run.progress=off",
                "cluster.num_cpus=2",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )

    def baseline() -> None:
        code = BASELINE.format(specs=ROOT / "runner" / "specs")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)

    # the goal (<= 1.15x) is near 1, and `ray.init` alone takes either about 2.05 s or 3.05 s
    # here (a second more in a quarter of runs, runner's and the floor's alike): enough rounds
    # that each median is of the common case, not of whichever mode five rounds happened on
    compare(runner, baseline, rounds=9)


@pytest.mark.parametrize("units", [1_000, 10_000, 100_000])
def test_planning_cost_per_unit(compare: Callable[..., None], benchmark, units: int) -> None:  # type: ignore[no-untyped-def]
    from runner.cluster import describe_local
    from runner.plan import make_plan
    from runner.schema import ClusterConfig
    from runner.spec import Pipeline
    from runner.stages.pool.schema import PoolStage
    from runner.stages.registry import KINDS

    raw = {
        "kind": "pool",
        "worker": {"_target_": "runner.examples.arith.Power"},
        "items": {"range": units},
    }
    stage = PoolStage(**raw)
    pipeline = Pipeline("bench", {"s": stage}, {"s": {**raw, "needs": []}})
    cluster = describe_local(ClusterConfig(num_cpus=2))
    planners = {k: v.plan for k, v in KINDS.items()}

    def runner() -> None:
        plan = make_plan(pipeline, planners, cluster, None, fresh=False)
        assert len(plan.stages["s"].to_run) == units

    def baseline() -> None:
        for i in range(units):
            hashlib.blake2b(str(i).encode(), digest_size=12).hexdigest()

    compare(runner, baseline, rounds=3)
    benchmark.extra_info["per_unit_us"] = benchmark.stats.stats.median / units * 1e6
