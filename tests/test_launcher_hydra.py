"""`hydra/launcher=runner` for any Hydra app: Hydra's own launcher test suites, the Optuna
sweeper with trials at once, distinct GPUs, resume, a failing job and Ctrl-C.

The in-process suites and tests share the session's Ray (the launcher reuses a Ray already
initialized in the process); the apps run as a user runs them join it by address, except the
Ctrl-C test, which starts its own to see it gone at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from hydra import version
from hydra.core.utils import JobReturn, JobStatus
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.test_utils.test_utils import SweepTaskFunction, TSweepRunner

from tests.conftest import ROOT, wait_until

APP = ROOT / "tests" / "apps" / "trial.py"


@pytest.fixture
def hydra_compat_version(hydra_restore_singletons: None) -> None:
    """Hydra's version base as Hydra's own plugin tests meet it: unspecified, so 1.1. Importing
    `runner.cli` (other test modules do) sets 1.3 for the process as its `hydra.main`
    decorates; `hydra_restore_singletons` puts that back after the test."""
    version.VersionBase.instance().version_base = version._UNSPECIFIED_


@pytest.mark.usefixtures("ray_session", "hydra_compat_version")
@pytest.mark.parametrize("launcher_name, overrides", [("runner", [])])
class TestRunnerLauncher(LauncherTestSuite):
    """Hydra's launcher suite, as Hydra's own launcher plugins run it."""


@pytest.mark.usefixtures("ray_session", "hydra_compat_version")
@pytest.mark.parametrize(
    "launcher_name, overrides",
    [("runner", ["hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])],
)
class TestRunnerLauncherBatched(BatchedSweeperTestSuite):
    """Batches of a sweeper that asks for a few jobs at a time."""


class TestRunnerLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite: apps in their own processes, joining the session's Ray."""


@pytest.fixture
def task_launcher_cfg() -> dict[str, object]:
    return {}


@pytest.fixture
def extra_flags(ray_session: str) -> list[str]:
    return ["-m", "hydra/launcher=runner", f"hydra.launcher.address={ray_session}"]


def _sweep_app(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python tests/apps/trial.py -m ARGS` with the runner launcher, as a user runs it."""
    return subprocess.Popen(
        [sys.executable, str(APP), "-m", "hydra/launcher=runner", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _trials(sweep_dir: Path) -> dict[str, dict[str, object]]:
    """What each job of the sweep saw, by its directory's name."""
    return {
        found.parent.name: json.loads(found.read_text()) for found in sweep_dir.glob("*/trial.json")
    }


def test_optuna_runs_n_jobs_trials_at_once_and_every_value_reaches_the_study(
    ray_session: str, tmp_path: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    proc = _sweep_app(
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=3",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=3",
        "hydra.sweeper.max_failure_rate=1.0",
        "x=int(interval(-20, 20))",
        "fail_below=-5",
        "seconds=3",
        "hydra.launcher.resources.cpus=0.5",  # three at once on the session's 2 CPUs
        f"hydra.launcher.address={ray_session}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    seen = _trials(sweep_dir)
    # every point ran once (a point the sampler suggests again gets its kept value, no job)
    assert len(seen) == len({t["x"] for t in seen.values()}) >= 4, seen
    # the first batch's three trials ran at the same time (each job's own directory: its number)
    first = [seen[str(n)] for n in range(3)]
    assert max(float(str(t["start"])) for t in first) < min(float(str(t["end"])) for t in first)
    # the study got every trial's outcome: each failure told as failed, the best of the values
    failed = [t for t in seen.values() if t["failed"]]
    assert failed and len(failed) < 6, seen
    assert (out + err).count("Failed experiment: x=") >= len(failed)
    best = min(float(str(t["value"])) for t in seen.values() if not t["failed"])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == best


@pytest.mark.usefixtures("ray_session", "hydra_restore_singletons")
def test_two_one_gpu_jobs_get_different_devices(
    hydra_sweep_runner: TSweepRunner, tmp_path: Path
) -> None:
    sweep = _in_process(
        hydra_sweep_runner,
        tmp_path,
        "x=1,3",
        "seconds=2",
        "hydra.launcher.resources.gpus=1",
    )
    with sweep:  # (its directory is removed when it ends)
        assert sweep.returns is not None
        assert [r.status for r in sweep.returns[0]] == [JobStatus.COMPLETED] * 2
        devices = [str(t["devices"]) for t in _trials(tmp_path).values()]
    assert len(devices) == 2 and all(d.isdigit() for d in devices), devices
    assert devices[0] != devices[1]


@pytest.mark.usefixtures("ray_session", "hydra_restore_singletons")
def test_a_rerun_returns_finished_jobs_values_without_running_them(
    hydra_sweep_runner: TSweepRunner, tmp_path: Path
) -> None:
    # (a sweep's directory is removed when its `with` ends: the rerun runs inside it)
    by_overrides = "hydra.sweep.subdir=${hydra.job.override_dirname}"
    with _in_process(hydra_sweep_runner, tmp_path, "x=1,3", by_overrides) as first:
        assert first.returns is not None
        assert [r.return_value for r in first.returns[0]] == [1.0, 1.0]
        written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/trial.json")}
        assert len(written) == 2

        # known by overrides, not by number: the same points in another order, and a new one
        with _in_process(hydra_sweep_runner, tmp_path, "x=5,3,1", by_overrides) as again:
            assert again.returns is not None
            rets: list[JobReturn] = again.returns[0]
            assert [r.return_value for r in rets] == [9.0, 1.0, 1.0]
            assert {p: p.stat().st_mtime_ns for p in written} == written  # not run again
            assert len(list(tmp_path.glob("*/trial.json"))) == 3


@pytest.mark.usefixtures("ray_session", "hydra_restore_singletons")
def test_a_failing_job_fails_alone(hydra_sweep_runner: TSweepRunner, tmp_path: Path) -> None:
    sweep = _in_process(hydra_sweep_runner, tmp_path, "x=-1,3", "fail_below=0", "seconds=2")
    # Hydra's basic sweeper raises the failed job's own exception once its batch has ended
    with pytest.raises(ValueError, match="x=-1 fails"), sweep:
        pass
    seen = sorted(_trials(tmp_path).values(), key=lambda t: float(str(t["x"])))
    assert [(t["x"], t["failed"]) for t in seen] == [(-1, True), (3, False)]


def _in_process(
    hydra_sweep_runner: TSweepRunner, sweep_dir: Path, *overrides: str
) -> SweepTaskFunction:
    # imported here: `hydra.main` sets the process's version base (1.3) as it decorates, which
    # Hydra's own suites, run in this process too, must not meet
    from tests.apps.trial import trial

    return hydra_sweep_runner(
        calling_file=str(APP),
        calling_module=None,
        task_function=trial.__wrapped__,  # type: ignore[attr-defined]
        config_path=".",
        config_name="config",
        overrides=["hydra/launcher=runner", *overrides],
        temp_dir=sweep_dir,
    )


def test_ctrl_c_stops_every_job_with_its_grace_and_leaves_nothing(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = _sweep_app(
        "x=1,3",
        "seconds=600",
        "hydra.launcher.num_cpus=2",  # its own embedded Ray, to see it gone at the end
        f"hydra.sweep.dir={sweep_dir}",
        env={"RAY_ADDRESS": ""},
    )
    try:
        # both jobs started: Hydra has written each one's config in its directory
        wait_until(
            lambda: len(list(sweep_dir.glob("*/.hydra/config.yaml"))) == 2,
            timeout=120,
            what="both jobs started",
        )
        ray_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    # both had started and neither finished
    assert len(list(sweep_dir.glob("*/.hydra/config.yaml"))) == 2
    assert not _trials(sweep_dir)
    wait_until(
        lambda: not any(psutil.pid_exists(p) for p in ray_pids),
        timeout=30,
        what="the sweep's Ray processes gone",
    )
