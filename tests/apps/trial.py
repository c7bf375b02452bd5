"""A small Hydra app (not a runner pipeline) swept by the runner launcher in the tests: it
records when it ran and what it saw, then returns its objective."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def trial(cfg: DictConfig) -> float:
    out = Path(HydraConfig.get().runtime.output_dir)  # the job's own directory
    start = time.time()
    time.sleep(float(cfg.seconds))
    failed = cfg.fail_below is not None and cfg.x < cfg.fail_below
    value = float((cfg.x - 2) ** 2)
    seen = {
        "failed": failed,
        "x": cfg.x,
        "start": start,
        "end": time.time(),
        "value": value,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    (out / "trial.json").write_text(json.dumps(seen))
    if failed:
        raise ValueError(f"x={cfg.x} fails")
    return value


if __name__ == "__main__":
    trial()
