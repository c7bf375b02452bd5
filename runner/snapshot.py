"""The composed config each run attempt saved in its run directory, `<run.dir>/.hydra/<time>/`.

Hydra writes it (`config.yaml`, `hydra.yaml`, `overrides.yaml`) as an attempt starts. The
modes that only read a run (status, report, cancel) take the run's pipeline from the latest
one, so they need neither the run's inputs nor the overrides it was started with, nor even
`pipeline=NAME` when `run.dir` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the folder of the snapshots in a run directory: one `<time>/` in it per attempt, named so
# that the names sort as the attempts ran (see `sweep.snapshot_dir`)
SNAPSHOTS = ".hydra"
CONFIG = "config.yaml"
OVERRIDES = "overrides.yaml"


@dataclass(frozen=True)
class Snapshot:
    """The config an attempt ran with: where it is kept, and its pipeline's name."""

    path: Path
    pipeline: str


def latest(run_dir: Path) -> Snapshot | None:
    """The last attempt's saved config that can be read, or None (no attempt ran here)."""
    try:
        found = sorted((run_dir / SNAPSHOTS).glob(f"*/{CONFIG}"), reverse=True)
    except OSError:
        return None
    for path in found:
        try:
            name = OmegaConf.select(OmegaConf.load(path), "pipeline.name", default=None)
        except (OSError, yaml.YAMLError, OmegaConfBaseException):
            continue
        if isinstance(name, str) and name:
            return Snapshot(path, name)
    return None


def latest_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides of the last attempt that saved them (Hydra's
    `overrides.yaml`), or None: how a sweep names a job of an earlier batch."""
    for path in sorted((run_dir / SNAPSHOTS).glob(f"*/{OVERRIDES}"), reverse=True):
        try:
            found = yaml.safe_load(path.read_text())
        except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML
            continue
        if isinstance(found, list):
            return [str(o) for o in found]
    return None
