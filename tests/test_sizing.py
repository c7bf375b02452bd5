"""Auto CPU sizing from total cluster CPUs, its precedence, and the plan's fit table."""

from __future__ import annotations

import pytest

from runner.sizing import (
    CONCURRENCY_ENV,
    CPUS_ENV,
    Sizing,
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


@pytest.mark.parametrize(
    ("env", "cpus", "threads"),
    [
        pytest.param({"PYCHECKER_WORKER_CPUS": "0.2"}, 0.2, 3, id="pychecker_cpus"),
        pytest.param({"PYCHECKER_WORKER_CONCURRENCY": "2"}, 0.4, 2, id="pychecker_concurrency"),
        pytest.param(
            {"PYCHECKER_WORKER_CPUS": "0.2", CPUS_ENV: "0.3"}, 0.3, 3, id="runner_cpus_wins"
        ),
        pytest.param(
            {"PYCHECKER_WORKER_CONCURRENCY": "2", CONCURRENCY_ENV: "5"},
            0.4,
            5,
            id="runner_concurrency_wins",
        ),
        pytest.param({"PYCHECKER_WORKER_CPUS": "auto"}, 0.35, 3, id="pychecker_auto"),
    ],
)
def test_pychecker_variables_mean_what_the_runner_ones_mean(
    env: dict[str, str], cpus: float, threads: int
) -> None:
    assert cpus_per_worker(0.4, 512, 200, env=env).cpus == cpus
    assert max_concurrency(3, env=env) == threads


def test_the_auto_line_is_pycheckers_log_line() -> None:
    sizing = cpus_per_worker("auto", 512, 200.0, env={})
    assert sizing == Sizing(0.35, "auto")
    assert sizing.describe("check", 200.0, 512, env={}) == (
        "check: Auto-calculated num_cpus_per_worker: 0.35 (total_cpus=200, num_workers=512)"
    )


def test_the_plan_names_the_variable_that_set_each_value() -> None:
    base = ("pipeline=pychecker", "mode=plan", "cluster.num_cpus=200")
    env = {"PYCHECKER_WORKER_CPUS": "0.2", "PYCHECKER_WORKER_CONCURRENCY": "4"}
    res = run_runner(*base, env=env)
    assert res.code == 0, res.text
    assert (
        "check: cpus_per_worker=0.2 (from PYCHECKER_WORKER_CPUS); "
        "max_concurrency=4 (from PYCHECKER_WORKER_CONCURRENCY)" in res.out
    )
    both = run_runner(*base, env={**env, CPUS_ENV: "0.25"})
    assert "check: cpus_per_worker=0.25 (from RUNNER_CPUS_PER_WORKER)" in both.out
    bad = run_runner(*base, env={"PYCHECKER_WORKER_CONCURRENCY": "many"})
    assert bad.code == 2
    assert "PYCHECKER_WORKER_CONCURRENCY='many': expected a positive integer" in bad.err


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
    assert (
        "check: Auto-calculated num_cpus_per_worker: 0.1 (total_cpus=200, num_workers=1800)"
        in auto.out
    )

    for workers, cpus in ((512, "0.35"), (100, "1.8")):
        res = run_runner(
            "pipeline=pychecker",
            "mode=plan",
            "cluster.num_cpus=200",
            f"pipeline.stages.check.num_workers={workers}",
        )
        assert (
            f"check: Auto-calculated num_cpus_per_worker: {cpus} "
            f"(total_cpus=200, num_workers={workers})" in res.out
        )


def test_a_bad_env_override_is_a_clear_error() -> None:
    result = run_runner("pipeline=pychecker", "mode=plan", env={CPUS_ENV: "lots"})
    assert result.code == 2
    assert "RUNNER_CPUS_PER_WORKER='lots': expected a positive number or auto" in result.err
