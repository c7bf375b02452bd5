"""Run the real `runner` CLI in-process on a benchmark pipeline of `benchmarks/specs/`."""

from __future__ import annotations

from pathlib import Path

from runner.cli import main

SPECS = Path(__file__).resolve().parent / "specs"


def run_cli(pipeline: str, run_dir: Path, *overrides: str) -> None:
    """One `runner pipeline=NAME` run in `run_dir` (joins the session's Ray); must exit 0."""
    code = main(
        [
            "--config-dir",
            str(SPECS),
            f"pipeline={pipeline}",
            f"run.dir={run_dir}",
            "run.progress=off",
            "hydra/job_logging=disabled",
            *overrides,
        ]
    )
    assert code == 0, f"runner pipeline={pipeline} exited {code}"
