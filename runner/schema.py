"""Structured configs: the keys every spec holds (`run`, `cluster`, the pipeline, the keys every
stage shares), their types and limits, and the marks a stage kind's own schema uses (each kind
states its keys in its package: `runner/stages/KIND/schema.py`).

`spec.py` validates composed YAML against these dataclasses (gathering every problem at once,
which OmegaConf's own merge cannot do); `compose.py` puts their defaults into the composed
config, so `--cfg job` shows every key. Field metadata carries the limits:
`ge`/`gt`/`le` for numbers, `choices` for strings, `nonempty: True` for a string that must not
be blank, `resource: True` for settings that change how fast work runs but never its result,
`policy: True` for how failures are handled (retries, timeouts, tolerated failures): both are
left out of fingerprints, so changing them reruns no finished unit (the plan says "policy
changed, kept").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from omegaconf import MISSING

T = TypeVar("T")


class Mode(Enum):
    """What `runner` does with the composed spec."""

    run = "run"
    plan = "plan"
    status = "status"
    report = "report"
    cancel = "cancel"


def resource(default: T, **limits: object) -> T:
    """A field that only sets resources or speed: never part of a unit's fingerprint."""
    return field(default=default, metadata={"resource": True, **limits})


def policy(default: T, **limits: object) -> T:
    """A field about failures (retries, timeouts): never part of a unit's fingerprint."""
    return field(default=default, metadata={"policy": True, **limits})


def limited(default: T, **limits: object) -> T:
    """A field with limits the validator checks (`ge`, `gt`, `le`, `choices`)."""
    return field(default=default, metadata=limits)


@dataclass
class ClusterConfig:
    """Where units run: an embedded local Ray (`local`), an existing Ray cluster (`ray`), or a
    simulated cluster in virtual time (`sim`)."""

    # local: start (or reuse) an embedded Ray in this process; ray: connect to `address`;
    # sim: run the plan through the scheduler in virtual time on the declared `nodes`
    kind: str = limited("local", choices=["local", "ray", "sim"])
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
    # ray: seconds to wait for an unreachable address before giving up
    connect_timeout: float = limited(60.0, gt=0)
    # show Ray's own start-up messages and warnings
    verbose: bool = False
    # local: serve the Ray dashboard on 127.0.0.1 (needs the `dashboard` extra: ray[default])
    dashboard: bool = False
    # sim: nodes as [{count, cpus, gpus, gpu_memory_gb, memory (GB)}]
    nodes: list[dict[str, object]] = field(default_factory=list)
    # sim: seconds a unit (a pool item, a role step) takes when its spec declares no duration
    sim_unit_seconds: float = limited(1.0, gt=0)
    # sim: a finished run's directory; units take the time they took there (`runner.measured`)
    sim_durations_from: str | None = None
    # local / sim: the partitions the cluster's nodes belong to (a job's `partition` must be one)
    partitions: list[str] = field(default_factory=list)
    # serve scheduler metrics for Prometheus on 127.0.0.1:PORT during a run (0: any free port)
    metrics_port: int | None = limited(None, ge=0, le=65535)
    # every node sees the run directory at the same path (one machine, NFS): tasks announce
    # their start through it; false: through a Ray actor on the runner's node. null: true for
    # local (one node), false for ray (a cluster's nodes may not share a filesystem)
    shared_fs: bool | None = None

    @property
    def shares_fs(self) -> bool:
        """`shared_fs`, with its default for the cluster kind."""
        return self.kind != "ray" if self.shared_fs is None else self.shared_fs


@dataclass
class RunConfig:
    """Where a run keeps its ledger and outputs, and how it resumes."""

    # the run directory: ledger, summary.json, logs and one directory per stage (empty would be
    # the working directory, the run's files strewn among the user's)
    dir: str = limited(MISSING, nonempty=True)
    # ignore what earlier runs finished and run every unit again
    fresh: bool = False
    # progress display: auto (a bar on a terminal, periodic lines otherwise), bar, log, off
    progress: str = limited("auto", choices=["auto", "bar", "log", "off"])


@dataclass
class StageSpec:
    """Keys every stage kind shares."""

    # the stage kind: pool | jobs | roles | shard, or one registered from outside `runner/`
    kind: str = MISSING
    # stages that must finish first; their outputs are this stage's inputs
    needs: list[str] = field(default_factory=list)
    # scheduler priority of every unit of the stage (higher runs first)
    priority: float = field(default=0.0, metadata={"resource": True})
    # free-form labels, used by preemption rules
    labels: dict[str, str] = field(default_factory=dict, metadata={"resource": True})


@dataclass
class PipelineSpec:
    """A named graph of stages."""

    # the pipeline's name; the default run directory is runs/<name>
    name: str = MISSING
    # stages by name
    stages: dict[str, object] = field(default_factory=dict)
