"""Resumable Hydra sweeps: a stable directory per job, and a summary table at the end.

Hydra names sweep directories by time, so rerunning a sweep starts over (hydra#3328). Here a
job's run directory is named by its overrides under a sweep directory named by the pipeline,
so the same sweep run again resumes every job. At the end, a table (printed, and
`sweep_summary.csv` in the sweep directory) ranks the jobs best first.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from runner import hydra_job
from runner.snapshot import SNAPSHOTS

SWEEP_SUMMARY = "sweep_summary.csv"
COLUMNS = ("overrides", "ok", "wall_s", "items_per_s", "cpu_utilization", "failures", "run_dir")


def run_dir(default: str) -> str:
    """`run.dir`: the job's own directory in a sweep, else `default` (runs/<pipeline>)."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return default
    if hc.mode is RunMode.MULTIRUN and hc.runtime.output_dir:
        return str(hc.runtime.output_dir)
    return default


def output_dir(mode: str, run_dir: str) -> str:
    """Hydra's output directory: the run directory when running; for plan, status and report
    a scratch directory, so that looking at a run creates nothing in its directory."""
    if mode == "run":
        return run_dir
    return str(Path(tempfile.gettempdir()) / f"runner-{os.getuid()}" / mode)


def snapshot_dir(mode: str) -> str | None:
    """Where Hydra keeps the composed config: one `.hydra/<time>/` per run attempt."""
    if mode != "run":
        return None
    return f"{SNAPSHOTS}/{datetime.now().strftime('%Y-%m-%d_%H-%M-%S_%f')}"


def sweep_args(argv: list[str]) -> list[str]:
    """A sweep (`-m`) with an explicit `run.dir=DIR` runs each job in `DIR/<overrides>`, never
    in one shared directory: `run.dir=DIR` becomes Hydra's sweep directory."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    return [
        f"hydra.sweep.dir={a[len('run.dir=') :]}" if a.startswith("run.dir=") else a for a in argv
    ]


class SweepSummary(Callback):
    """Collects this sweep's jobs and writes their key figures, best first."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Path]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # an unwritable sweep directory (read-only, full): one message and exit 1, not Hydra's
        # traceback
        hydra_job.prepare_sweep(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = HydraConfig.get()
        if hc.mode is RunMode.MULTIRUN:
            hidden = set(hc.job.config.override_dirname.exclude_keys) - {"pipeline"}
            shown = [o for o in job_return.overrides or [] if o.split("=")[0] not in hidden]
            overrides = " ".join(shown)
            self.jobs.append((overrides, Path(HydraConfig.get().runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.jobs:
            return
        rows = sorted((figures(o, d) for o, d in self.jobs), key=_rank)
        out = Path(config.hydra.sweep.dir) / SWEEP_SUMMARY
        hydra_job.writing(out.parent, lambda: _write_summary(out, rows))
        print(format_table(rows))
        print(f"sweep summary: {out}")
        self.jobs = []


def _write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def figures(overrides: str, job_dir: Path) -> dict[str, Any]:
    """A job's key figures from its summary.json (a job that never ran shows as not ok)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(overrides=overrides, ok=False, run_dir=str(job_dir))
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return row
    stages = summary["stages"].values()
    done = sum(s["done"] for s in stages)
    wall = summary["wall_s"] or 0.0
    row.update(
        ok=summary["ok"],
        wall_s=wall,
        items_per_s=round(done / wall, 2) if wall else None,
        cpu_utilization=summary["cpu_utilization"],
        failures=sum(s["failed"] + s["timeout"] for s in stages),
    )
    return row


def _rank(row: dict[str, Any]) -> tuple[bool, float, float]:
    return (not row["ok"], -(row["items_per_s"] or 0.0), row["wall_s"] or float("inf"))


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("#", "overrides", "ok", "wall_s", "items/s", "cpu util", "failures")
    body = [
        (
            str(n),
            r["overrides"],
            "yes" if r["ok"] else "no",
            _num(r["wall_s"]),
            _num(r["items_per_s"]),
            "-" if r["cpu_utilization"] is None else f"{100 * r['cpu_utilization']:.0f}%",
            _num(r["failures"]),
        )
        for n, r in enumerate(rows, 1)
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    )


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
