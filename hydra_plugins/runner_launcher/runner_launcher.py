"""`hydra/launcher=runner`: a sweep's jobs side by side on one Ray, admitted by one scheduler.

Registered in Hydra's ConfigStore when Hydra scans `hydra_plugins`; everything heavy (Ray,
the runner's executor) is imported only in `launch` (`runner.launcher`), so the scan stays
cheap for every Hydra app in the environment.
"""

# no `from __future__ import annotations`: Hydra's scan runs this module outside
# `sys.modules`, where dataclasses cannot resolve string annotations
from collections.abc import Sequence
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ResourcesConf:
    """What each job of a Hydra app holds while it runs (a runner pipeline's units ask for
    their own)."""

    cpus: float = 1.0
    # GPUs: distinct devices for distinct jobs; a fraction shares one with other fractions
    gpus: float = 0.0
    # memory as people type it (`8G`); null: Ray's default
    memory: str | None = None


@dataclass
class RunnerLauncherConf:
    _target_: str = "hydra_plugins.runner_launcher.runner_launcher.RunnerLauncher"
    # at most this many jobs at once (null: as many as the cluster fits)
    max_parallel: int | None = None
    resources: ResourcesConf = field(default_factory=ResourcesConf)
    # a runner pipeline's return value: this key of its summary.json (`wall_s`,
    # `stages.square.wall_s`, ...); null: the whole summary
    objective: str | None = None
    # a Hydra app's sweep: the Ray cluster to use (`auto`, `host:6379`; RAY_ADDRESS wins);
    # null: an embedded Ray of `num_cpus` / `num_gpus` (a pipeline uses its `cluster` section)
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: int | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="runner", node=RunnerLauncherConf, provider="runner"
)


class RunnerLauncher(Launcher):
    def __init__(
        self,
        max_parallel: int | None = None,
        resources: DictConfig | None = None,
        objective: str | None = None,
        address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: int | None = None,
    ) -> None:
        self.max_parallel = max_parallel
        self.resources = resources
        self.objective = objective
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from runner import launcher

        return launcher.launch(self, job_overrides, initial_job_idx)
