"""`hydra/sweeper=runner`, the `runner` command's default: Hydra's basic sweeper, whose record
of the sweep (`multirun.yaml` in the sweep directory) is written only by a sweep that runs its
jobs.

A runner sweep's directory is stable (`multirun/<pipeline>`, not Hydra's time-stamped one), so
`runner -m ... mode=status` looks at the jobs of the sweep that ran there; Hydra's basic sweeper
would save the look's own config over that sweep's record.
"""

# no `from __future__ import annotations`: Hydra's scan runs this module outside
# `sys.modules`, where dataclasses cannot resolve string annotations
from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn


@dataclass
class RunnerSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.runner_launcher.runner_sweeper.RunnerSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="runner", node=RunnerSweeperConf, provider="runner"
)


class RunnerSweeper(BasicSweeper):
    """The basic sweeper (`a=1,2 b=x,y`: every combination, `max_batch_size` at a time)."""

    def sweep(self, arguments: list[str]) -> Any:
        from runner import sweep  # not at the scan: it stays cheap for every Hydra app

        assert self.config is not None
        if sweep.recorded(self.config):
            return super().sweep(arguments)
        return self._sweep_unrecorded(arguments)

    def _sweep_unrecorded(self, arguments: list[str]) -> list[list[JobReturn]]:
        """`BasicSweeper.sweep` (hydra-core 1.3) without its first step, the save of
        `multirun.yaml`: the batches composed, checked and launched one after another, a
        failed job raised once its batch has ended."""
        assert self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        returns: list[list[JobReturn]] = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = list(self.launcher.launch(batch, initial_job_idx=initial_job_idx))
            for result in results:
                _ = result.return_value  # raises a failed job's error
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
