"""Inside the Ray task of a Hydra app's sweep job (`runner.launcher`): Hydra's own `run_job`.

Kept apart from the launcher so the Ray worker imports Hydra and nothing of the runner's
driver. The driver's Hydra state (its config search path, plugins, resolvers registered by
the app) comes along as `Singleton.get_state()`, as Hydra's Ray launcher carries it.
"""

from __future__ import annotations

import os

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


def run(
    config: DictConfig,
    context: HydraContext,
    task: TaskFunction,
    state: dict[object, object],
    cwd: str,
) -> JobReturn:
    """The job in its own directory (and working directory, with `hydra.job.chdir`), its
    config snapshot and log there; the task's exception kept in the `JobReturn`. Relative
    paths (a relative `hydra.sweep.dir`, the task's own) mean what they mean to the driver:
    the task runs in the driver's working directory `cwd`, as under Hydra's basic launcher."""
    setup_globals()
    Singleton.set_state(state)
    HydraConfig.instance().set_config(config)
    worker_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        return run_job(
            hydra_context=context,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    finally:
        os.chdir(worker_cwd)
