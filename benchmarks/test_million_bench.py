"""A million units: a pool of 1,000,000 trivial items and a jobs stage of 100,000 array tasks.

Each runs as `python -m runner` in a child process with its own embedded 2-CPU Ray, so the
runner's peak RSS is the child's (`os.wait4`; it includes Ray's own processes that the runner
reaped, so it is an upper bound). Then `mode=status` and `mode=plan` of the finished run are
timed as a user runs them, and the ledger's write rate is measured on the same number of rows,
batched as the executor batches them (`FLUSH_ROWS`), into a fresh ledger.

Goals (issue 14): plan, run, ledger and results complete; peak RSS <= 1 GiB; ledger writes
>= 50,000 units/s; status and plan of the finished run each <= 2 s. The figures go into
`extra_info`; there is no baseline to divide by.

These take minutes, so they are skipped unless asked for:

    RUNNER_BENCH_MILLION=1 python -m pytest benchmarks/test_million_bench.py --benchmark-only

`RUNNER_BENCH_ITEMS` and `RUNNER_BENCH_JOBS` scale them down (e.g. 100000 and 10000) to try
the benchmark quickly; the ledger-rate test always runs (a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.executor import FLUSH_ROWS
from runner.lifecycle import UnitState
from runner.store import Ledger, UnitRow

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"
ITEMS = int(os.environ.get("RUNNER_BENCH_ITEMS", "1000000"))
JOBS = int(os.environ.get("RUNNER_BENCH_JOBS", "100000"))
LEDGER_ROWS = 1_000_000

million = pytest.mark.skipif(
    os.environ.get("RUNNER_BENCH_MILLION") != "1",
    reason="takes minutes: set RUNNER_BENCH_MILLION=1 to run",
)


def cli(pipeline: str, run_dir: Path, *overrides: str) -> tuple[float, int, str]:
    """`python -m runner` in a child process: (wall seconds, peak RSS in bytes, stdout)."""
    argv = [
        sys.executable,
        "-m",
        "runner",
        "--config-dir",
        str(SPECS),
        f"pipeline={pipeline}",
        f"run.dir={run_dir}",
        "run.progress=off",
        "cluster.num_cpus=2",
        *overrides,
    ]
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert child.stdout is not None
    out = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, f"runner pipeline={pipeline} exited {child.returncode}:\n{out}"
    return wall, usage.ru_maxrss * 1024, out


def run_and_inspect(pipeline: str, run_dir: Path, units: int, *overrides: str) -> dict[str, Any]:
    """Run the pipeline, check the ledger and the summary, then time status and plan."""
    wall, rss, _ = cli(pipeline, run_dir, *overrides)
    summary = json.loads((run_dir / "summary.json").read_text())
    stage = summary["stages"]["work"]
    assert stage["done"] == units, stage
    ledger = Ledger(run_dir / "ledger.sqlite", readonly=True)
    assert ledger.counts("work") == {"done": units}
    ledger.close()
    status_s, _, status = cli(pipeline, run_dir, "mode=status", *overrides)
    assert str(units) in status
    plan_s, _, plan = cli(pipeline, run_dir, "mode=plan", *overrides)
    assert "0 unit(s) to run" in plan
    return {
        "units": units,
        "wall_s": wall,
        "stage_wall_s": stage["wall_s"],
        "peak_rss_mib": rss / 2**20,
        "status_s": status_s,
        "plan_s": plan_s,
    }


@million
def test_pool_of_a_million_items(benchmark: Any, tmp_path: Path) -> None:
    found: dict[str, Any] = {}

    def run() -> None:
        found.update(
            run_and_inspect(
                "bench_million",
                tmp_path / "run",
                ITEMS,
                f"pipeline.stages.work.items.range={ITEMS}",
            )
        )
        results = tmp_path / "run" / "work" / "results.parquet"
        import pyarrow.parquet as pq

        assert pq.read_metadata(results).num_rows == ITEMS

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(found)


@million
def test_jobs_of_100k_array_tasks(benchmark: Any, tmp_path: Path) -> None:
    found: dict[str, Any] = {}
    array = f"pipeline.stages.work.jobs.0.array=1-{JOBS}"

    def run() -> None:
        found.update(run_and_inspect("bench_million_jobs", tmp_path / "run", JOBS, array))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(found)


def test_ledger_write_rate(benchmark: Any, tmp_path: Path) -> None:
    """A million finished pool items written as the executor writes them: rows of
    `FLUSH_ROWS`, one transaction each, into a fresh ledger."""
    now = time.time()
    rows = [
        UnitRow(
            "work",
            str(i),
            "0123456789abcdef01234567",
            UnitState.done,
            1,
            now,
            now + 1e-5,
            1e-5,
            "host:1234",
            None,
            i,
            i * i,
            "f" * 56,
            "10.0.0.1",
        )
        for i in range(LEDGER_ROWS)
    ]
    count = iter(range(100))

    def write() -> None:
        ledger = Ledger(tmp_path / f"ledger-{next(count)}.sqlite")
        for start in range(0, len(rows), FLUSH_ROWS):
            ledger.write(rows[start : start + FLUSH_ROWS])
        ledger.close()

    benchmark.pedantic(write, rounds=2, iterations=1, warmup_rounds=0)
    rate = LEDGER_ROWS / benchmark.stats.stats.median
    benchmark.extra_info.update(units=LEDGER_ROWS, ledger_units_per_s=rate)
    assert rate > 0
