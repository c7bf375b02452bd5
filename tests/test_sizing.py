"""Auto CPU sizing from total cluster CPUs, its precedence, and the plan's fit table."""

from __future__ import annotations

import pytest

from runner.sizing import (
    CONCURRENCY_ENV,
    CPUS_ENV,
    auto_cpus,
    cpus_per_worker,
    fits,
    max_concurrency,
)
from tests.conftest import run_runner


@pytest.mark.parametrize(
    ("total", "workers", "cpus"),
    [
        pytest.param(200, 512, 0.35, id="512_workers_on_200"),
        pytest.param(200, 100, 1.8, id="100_workers_on_200"),
        pytest.param(200, 1800, 0.1, id="1800_workers_clamped_low"),
        pytest.param(200, 10, 2.0, id="10_workers_clamped_high"),
        pytest.param(2, 4, 0.45, id="laptop"),
    ],
)
def test_auto_cpus_follows_the_rule(total: float, workers: int, cpus: float) -> None:
    assert auto_cpus(total, workers) == cpus


def test_env_beats_spec_beats_auto() -> None:
    assert cpus_per_worker(0.4, 10, 200, env={CPUS_ENV: "0.25"}).cpus == 0.25
    assert cpus_per_worker(0.4, 10, 200, env={}).cpus == 0.4
    assert cpus_per_worker("auto", 10, 200, env={}).source == "auto"
    assert max_concurrency(1, env={CONCURRENCY_ENV: "8"}) == 8
    assert max_concurrency(3, env={}) == 3


def test_fixed_0_4_cpus_fit_500_workers_on_200_cpus() -> None:
    assert fits(200, 0.4) == 500


def test_plan_shows_the_200_cpu_sizing_table_without_starting_workers() -> None:
    base = (
        "pipeline=pychecker",
        "mode=plan",
        "cluster.num_cpus=200",
        "pipeline.stages.check.num_workers=1800",
    )
    fixed = run_runner(*base, "pipeline.stages.check.cpus_per_worker=0.4")
    assert fixed.code == 0, fixed.text
    assert "worker: 0.4 CPU each; 1800 wanted, 500 fit at once" in fixed.out
    assert "only 500 of 1800 workers fit at once" in fixed.out

    auto = run_runner(*base)
    assert "worker: 0.1 CPU each; 1800 wanted, 1800 fit at once" in auto.out
    assert "check: cpus_per_worker=0.1 (auto: total_cpus=200, num_workers=1800)" in auto.out

    for workers, cpus in ((512, "0.35"), (100, "1.8")):
        res = run_runner(
            "pipeline=pychecker",
            "mode=plan",
            "cluster.num_cpus=200",
            f"pipeline.stages.check.num_workers={workers}",
        )
        assert (
            f"check: cpus_per_worker={cpus} (auto: total_cpus=200, num_workers={workers})"
            in res.out
        )


def test_a_bad_env_override_is_a_clear_error() -> None:
    result = run_runner("pipeline=pychecker", "mode=plan", env={CPUS_ENV: "lots"})
    assert result.code == 2
    assert "RUNNER_CPUS_PER_WORKER='lots': expected a positive number or auto" in result.err
