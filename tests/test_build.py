"""Worker specs build as Hydra's `instantiate` builds them, and a worker process stays light.

Every pool worker and role replica is a fresh Ray worker process; what its module imports is
paid at each start, replacement and preemption. These tests hold both halves of that bargain:
the fast path gives Hydra's result, and the worker-side modules do not import the driver's.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from hydra.utils import instantiate

from runner.build import build
from runner.examples.rlhf import Rollout

FLAT = {"_target_": "runner.examples.rlhf.Rollout", "step_seconds": 0.25}


def test_flat_spec_builds_what_hydra_builds() -> None:
    ours, hydras = build(FLAT), instantiate(FLAT, _convert_="all")
    assert isinstance(ours, Rollout) and isinstance(hydras, Rollout)
    assert vars(ours).keys() == vars(hydras).keys()
    assert ours.step_seconds == hydras.step_seconds == 0.25


def test_partial_of_a_function() -> None:
    fn = build({"_target_": "os.path.join", "_partial_": True})
    assert isinstance(fn, functools.partial) and fn("a", "b") == "a/b"


def test_nested_targets_go_to_hydra() -> None:
    spec = {"_target_": "builtins.dict", "inner": {"_target_": "runner.examples.rlhf.Train"}}
    built = build(spec)
    assert isinstance(built, dict) and type(built["inner"]).__name__ == "Train"


def test_unknown_target_fails_as_hydra_does() -> None:
    with pytest.raises(ImportError):
        build({"_target_": "runner.examples.no_such_module.Thing"})


def test_worker_side_modules_import_nothing_of_the_driver() -> None:
    """What a fresh pool worker, job task, role replica or shard task imports."""
    code = (
        "import sys\n"
        "import runner.stages.pool.worker, runner.stages.jobs.task, runner.stages.roles.host\n"
        "import runner.stages.shard.task, runner.build\n"
        "runner.build.build({'_target_': 'runner.examples.rlhf.Rollout'})\n"
        "heavy = ('hydra', 'omegaconf', 'runner.executor', 'runner.scheduler', 'runner.plan')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
