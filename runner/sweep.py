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
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

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
    if hc.mode is not RunMode.MULTIRUN:
        return default
    # not yet set while a sweeper composes (HydraConfig is then the sweep's, or in a process
    # that ran a sweep before, the last one's)
    runtime = hc.runtime
    assert isinstance(runtime, DictConfig)  # the typed node Hydra keeps, not a dataclass
    output_dir = None if OmegaConf.is_missing(runtime, "output_dir") else runtime.output_dir
    return str(output_dir) if output_dir else default


def output_dir(mode: str, run_dir: str, cluster: str) -> str:
    """Hydra's output directory: the run directory when running; for plan, status, report and
    a simulated run (`cluster=sim`) a scratch directory, so that looking at a run, or
    simulating one, creates nothing in its directory (a simulation's snapshot there would be
    taken for the last attempt's config by `mode=status`)."""
    if _attempt(mode, cluster):
        return run_dir
    return str(Path(tempfile.gettempdir()) / f"runner-{os.getuid()}" / mode)


def snapshot_dir(mode: str, cluster: str) -> str | None:
    """Where Hydra keeps the composed config: one `.hydra/<time>/` per run attempt."""
    if not _attempt(mode, cluster):
        return None
    return f"{SNAPSHOTS}/{datetime.now().strftime('%Y-%m-%d_%H-%M-%S_%f')}"


def _attempt(mode: str, cluster: str) -> bool:
    """Whether the command is an attempt of the run in its directory (a run on Ray)."""
    return mode == "run" and cluster != "sim"


def recorded(config: DictConfig) -> bool:
    """Whether a sweep (its composed config) is saved as its directory's `multirun.yaml`,
    Hydra's record of the sweep: only one that runs its jobs. A look at them (plan, status,
    report, cancel) or a simulation leaves the record of the sweep that ran as it was."""
    mode = OmegaConf.select(config, "mode", default="run")
    cluster = OmegaConf.select(config, "cluster.kind", default="local")
    return _attempt(str(mode), str(cluster))


def sweep_args(argv: list[str]) -> list[str]:
    """A sweep (`-m`) with an explicit `run.dir=DIR` runs each job in `DIR/<overrides>`, never
    in one shared directory: `run.dir=DIR` becomes Hydra's sweep directory."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    return [
        f"hydra.sweep.dir={a[len('run.dir=') :]}" if a.startswith("run.dir=") else a for a in argv
    ]


def blank_run_dir(argv: list[str]) -> str | None:
    """Why a sweep's `run.dir=` that names no directory is refused (worded as the spec's own
    check words it in a single run), or None: `sweep_args` would make it Hydra's sweep
    directory, and the jobs' directories would land in the working directory."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "run.dir" and value.strip() in ("", "''", '""'):
            return f"command line '{arg}': run.dir: = {value!r}: must not be empty"
    return None


def job_name(overrides: Sequence[str], exclude_keys: Sequence[str]) -> str:
    """A sweep job as the summary names it: its overrides but those its directory's name
    leaves out (`hydra.job.config.override_dirname.exclude_keys`), the pipeline shown."""
    hidden = set(exclude_keys) - {"pipeline"}
    return " ".join(o for o in overrides if o.split("=")[0].lstrip("+~") not in hidden)


class SweepSummary(Callback):
    """Collects this sweep's jobs and writes their key figures, best first."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Path]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # an unwritable sweep directory (read-only, full): one message and exit 1, not Hydra's
        # traceback; a look at the sweep's jobs writes no record of its own
        if recorded(config):
            hydra_job.prepare_sweep(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = HydraConfig.get()
        if hc.mode is RunMode.MULTIRUN:
            overrides = job_name(
                job_return.overrides or [], hc.job.config.override_dirname.exclude_keys
            )
            self.jobs.append((overrides, Path(HydraConfig.get().runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs, self.jobs = self.jobs, []
        if jobs and not str(config.hydra.launcher.get("_target_", "")).endswith(RUNNER_LAUNCHER):
            summarize(Path(config.hydra.sweep.dir), jobs)


# the runner's own launcher writes the summary after each batch (`runner.launcher`), failed
# jobs too: the sweeper raises a failed job before `on_multirun_end` is called
RUNNER_LAUNCHER = ".RunnerLauncher"


def summarize(sweep_dir: Path, jobs: list[tuple[str, Path]]) -> None:
    """Rank the jobs best first: print the table and write `sweep_summary.csv`."""
    rows = sorted((figures(o, d) for o, d in jobs), key=_rank)
    out = sweep_dir / SWEEP_SUMMARY
    hydra_job.writing(out.parent, lambda: _write_summary(out, rows))
    print(format_table(rows))
    print(f"sweep summary: {out}")


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
