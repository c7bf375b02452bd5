"""Structured configs: the one statement of every key a spec may hold, its type and its limits.

`spec.py` validates composed YAML against these dataclasses (gathering every problem at once,
which OmegaConf's own merge cannot do); they are also registered in Hydra's ConfigStore under
the `schema` group so `--cfg` users and tools can see them. Field metadata carries the limits:
`ge`/`gt`/`le` for numbers, `choices` for strings, `resource: True` for settings that change
how fast work runs but never its result (they are left out of fingerprints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class Mode(Enum):
    """What `runner` does with the composed spec."""

    run = "run"
    plan = "plan"
    status = "status"
    report = "report"


def resource(default: Any = MISSING, **limits: Any) -> Any:
    """A field that only sets resources or speed: never part of a unit's fingerprint."""
    return field(default=default, metadata={"resource": True, **limits})


def limited(default: Any = MISSING, **limits: Any) -> Any:
    """A field with limits the validator checks (`ge`, `gt`, `le`, `choices`)."""
    return field(default=default, metadata=limits)


@dataclass
class ClusterConfig:
    """Where units run: an embedded local Ray (`local`) or an existing Ray cluster (`ray`)."""

    # local: start (or reuse) an embedded Ray in this process; ray: connect to `address`
    kind: str = limited("local", choices=["local", "ray"])
    # Ray address for kind=ray (`auto`, `ray://host:10001`, `host:6379`); RAY_ADDRESS wins
    address: str | None = None
    # CPUs the embedded Ray declares (null: the CPUs this process may use)
    num_cpus: float | None = limited(None, gt=0)
    # GPUs the embedded Ray declares; logical GPUs are fine (null: what NVML finds)
    num_gpus: int | None = limited(None, ge=0)
    # memory Ray may hand to tasks, in GB (null: Ray's default)
    memory_gb: float | None = limited(None, gt=0)
    # object store size of the embedded Ray, in MB
    object_store_mb: int = limited(256, ge=64)
    # forward worker stdout/stderr to this terminal
    log_to_driver: bool = False


@dataclass
class RunConfig:
    """Where a run keeps its ledger and outputs, and how it resumes."""

    # the run directory: ledger, summary.json, logs and one directory per stage
    dir: str = MISSING
    # ignore what earlier runs finished and run every unit again
    fresh: bool = False
    # progress display: auto (a bar on a terminal, periodic lines otherwise), bar, log, off
    progress: str = limited("auto", choices=["auto", "bar", "log", "off"])


@dataclass
class StageSpec:
    """Keys every stage kind shares."""

    # the stage kind: pool | jobs | roles | shard
    kind: str = MISSING
    # stages that must finish first; their outputs are this stage's inputs
    needs: list[str] = field(default_factory=list)
    # scheduler priority of every unit of the stage (higher runs first)
    priority: float = field(default=0.0, metadata={"resource": True})
    # free-form labels, used by preemption rules
    labels: dict[str, str] = field(default_factory=dict, metadata={"resource": True})


@dataclass
class PoolStage(StageSpec):
    """N long-lived Ray actors that each call a worker object on a stream of items."""

    # how many worker actors to start
    num_workers: int = resource(2, ge=1)
    # CPUs per worker actor: `auto` = clamp(0.9 x total cluster CPUs / num_workers, 0.1, 2.0)
    cpus_per_worker: str | float = resource("auto", choices=["auto"], ge=0.01, le=1024)
    # items one worker runs at the same time (threads in the actor)
    max_concurrency: int = resource(1, ge=1, le=1024)
    # seconds an item may run before it is cancelled, recorded as timeout, and its worker freed
    step_timeout: float | None = limited(None, gt=0)
    # times an item is tried again after an error or a worker crash (not after a timeout)
    retries: int = limited(0, ge=0)
    # item failures (errors + timeouts) the stage tolerates: a count, or a fraction below 1
    max_failures: float = limited(0, ge=0)
    # items per actor call: `auto` sizes batches from measured item time
    batch_size: str | int = resource("auto", choices=["auto"], ge=1)
    # the worker: {_target_: pkg.mod.Class, **kwargs}, built once per actor, called per item
    worker: dict[str, Any] = MISSING
    # one of {range: N | [start, stop]}, {list: [...]}, {glob: PATTERN}, {file: PATH}, {from: STAGE}
    items: dict[str, Any] = MISSING


@dataclass
class PipelineSpec:
    """A named graph of stages."""

    # the pipeline's name; the default run directory is runs/<name>
    name: str = MISSING
    # stages by name
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class RootConfig:
    """The primary config, `conf/config.yaml`."""

    # run | plan | status | report (redraw the timeline picture of the last run)
    mode: Mode = Mode.run
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)


# every stage kind's schema, by the name users write as `kind:`
STAGE_KINDS: dict[str, type[StageSpec]] = {
    "pool": PoolStage,
}


def register_configs() -> None:
    """Publish the schemas in Hydra's ConfigStore (group `schema`) for tools and `--cfg` users."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="cluster", node=ClusterConfig)
    store.store(group="schema", name="run", node=RunConfig)
    for kind, spec_type in STAGE_KINDS.items():
        store.store(group="schema/stage", name=kind, node=spec_type)
