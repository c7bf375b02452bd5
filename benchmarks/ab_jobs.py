"""The jobs stage against Ray's task-per-job floor in alternating rounds, in one Ray session.

The benchmark's jobs row moves about ±5% from one whole run to the next on a shared 2-core
machine, more than a change to the per-job path is worth, so a change is judged here: N rounds
of the stage (its wall from summary.json) each followed by one of each floor
(`test_jobs_bench.ray_tasks`, bare and told its command), after one round of warm-up. Run it
before and after the change, on a quiet machine, and compare the ratios of medians. Leave a few
minutes between two runs: the run directories one removes slow the next one's log files on an
ext4 without a journal (benchmarks/README.md, "The disk").

    python -m benchmarks.ab_jobs [ROUNDS]     # 12 rounds by default, about 25 s
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runs import run_cli
from benchmarks.test_jobs_bench import ray_tasks, stage_times


def _timed(floor: bool) -> float:
    start = time.perf_counter()
    ray_tasks(with_argv=floor)
    return time.perf_counter() - start


def main(rounds: int = 12) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    stage: list[float] = []
    bare: list[float] = []
    argv: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="ab-jobs-") as scratch:
            for n in range(rounds + 1):
                with contextlib.redirect_stdout(io.StringIO()):
                    run_cli("bench_jobs", Path(scratch) / str(n))
                times = stage_times(Path(scratch) / str(n))[0], _timed(False), _timed(True)
                if n:  # the first round warms Ray's workers up
                    for kept, value in zip((stage, bare, argv), times, strict=True):
                        kept.append(value)
    finally:
        ray.shutdown()
    ours = statistics.median(stage)
    for name, floor in (("ray tasks", bare), ("ray tasks, argv", argv)):
        print(
            f"stage {ours:.3f} s against [{name}] {statistics.median(floor):.3f} s: "
            f"{ours / statistics.median(floor):.3f}x (median of {rounds} rounds)"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
