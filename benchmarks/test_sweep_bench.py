"""A sweep of 8 small pipeline jobs: the runner launcher against Hydra's basic launcher.

`runner -m` (the default `hydra/launcher=runner`) starts one embedded Ray for the sweep and
runs the jobs side by side as the scheduler fits them; Hydra's basic launcher (what
`hydra/launcher=basic` gives, and what `runner -m` ran before) runs them one after another,
each job starting and stopping its own embedded Ray. Same command, same jobs, a fresh process
each round; the goal is <= 0.4x.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

JOBS = ",".join(str(n) for n in range(10, 18))  # 8 jobs: 10 .. 17 items each


def _sweep(sweep_dir: Path, *launcher: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "-m",
            "--config-dir",
            "tests/specs",
            "pipeline=misbehave",
            "pipeline.stages.work.num_workers=1",
            f"pipeline.stages.work.items.range={JOBS}",
            "run.fresh=true",
            "run.progress=off",
            "cluster.num_cpus=2",
            f"hydra.sweep.dir={sweep_dir}",
            *launcher,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def test_sweep_8_jobs_vs_basic_launcher(compare: Callable[..., None], tmp_path: Path) -> None:
    compare(
        lambda: _sweep(tmp_path / "runner"),
        lambda: _sweep(tmp_path / "basic", "hydra/launcher=basic"),
        rounds=2,
    )
