"""Structured configs: the one statement of every key a spec may hold, its type and its limits.

`spec.py` validates composed YAML against these dataclasses (gathering every problem at once,
which OmegaConf's own merge cannot do); `compose.py` puts their defaults into the composed
config, so `--cfg job` shows every key. Field metadata carries the limits:
`ge`/`gt`/`le` for numbers, `choices` for strings, `resource: True` for settings that change
how fast work runs but never its result, `policy: True` for how failures are handled (retries,
timeouts, tolerated failures): both are left out of fingerprints, so changing them reruns no
finished unit (the plan says "policy changed, kept").
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
    # copy workers' print/logging (always in <run.dir>/<stage>/logs/worker-N.log) to their
    # own streams, which Ray forwards to this terminal with cluster.log_to_driver=true
    show_output: bool = resource(False)
    # seconds an item may run before it is cancelled, recorded as timeout, and its worker freed
    step_timeout: float | None = policy(None, gt=0)
    # times an item is tried again after an error or a worker crash (not after a timeout)
    retries: int = policy(0, ge=0)
    # item failures (errors + timeouts) the stage tolerates: a count, or a fraction below 1
    max_failures: float = policy(0, ge=0)
    # items per actor call: `auto` sizes batches from measured item time
    batch_size: str | int = resource("auto", choices=["auto"], ge=1)
    # the worker: {_target_: pkg.mod.Class, **kwargs}, built once per actor, called per item
    worker: dict[str, object] = MISSING
    # one of {range: N | [start, stop]}, {list: [...]}, {glob: PATTERN}, {file: PATH}, {from: STAGE}
    items: dict[str, object] = MISSING


@dataclass
class PipelineSpec:
    """A named graph of stages."""

    # the pipeline's name; the default run directory is runs/<name>
    name: str = MISSING
    # stages by name
    stages: dict[str, object] = field(default_factory=dict)


@dataclass
class RootConfig:
    """The primary config, `conf/config.yaml`."""

    # run | plan | status | report (redraw the last run's timeline.png, trace.json, report.html)
    # | cancel (stop `units` of the run in progress, with their stage's grace)
    mode: Mode = Mode.run
    # mode=cancel: the units to cancel, by name
    units: list[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)


@dataclass
class ShardStage(StageSpec):
    """A dataset split into id ranges, each run by a command or a function on its own GPUs."""

    # the dataset: a .csv or .parquet file
    input: str = MISSING
    # the column of ids the shards are ranges of (ranges over the sorted unique ids)
    id_column: str = "id"
    # how many id ranges to cut the dataset into (a range is in each shard's fingerprint)
    num_shards: int = resource(4, ge=1)
    # GPUs per shard, set by Ray in CUDA_VISIBLE_DEVICES (0: CPU; a fraction shares a GPU)
    gpus_per_shard: float = resource(0, ge=0)
    # a GPU is eligible when it has at least this much free memory, in GB
    min_gpu_memory_gb: float = resource(0, ge=0)
    # CPUs each shard's Ray task holds
    cpus_per_shard: float = resource(1, ge=0)
    # at most this many shards at once (null: as many as the resources allow)
    max_parallel: int | None = resource(None, ge=1)
    # times a failed shard is tried again
    retries: int = policy(0, ge=0)
    # argv (no shell) with {input} {output} | {output_dir} {low} {high} (half-open) {last}
    # {gpus} {shard} {done}
    command: list[str] | None = None
    # or a function DataFrame -> DataFrame: {_target_: pkg.mod.fn, **kwargs}, run in a Ray task
    fn: dict[str, object] | None = None
    # what a shard's output must hold: one_per_id (a row per input row), subset (ids of its
    # range, an id may repeat; fewer rows are fine), any (no id column needed)
    outputs: str = limited("subset", choices=["one_per_id", "subset", "any"])
    # {sort_by: COLUMN | [COLUMNS] (default: id_column), format: parquet | csv}
    merge: dict[str, object] = field(default_factory=dict)
    # stream each shard's output lines to the terminal, prefixed [shard LOW-HIGH]
    show_output: bool = resource(True)


@dataclass
class JobSpec:
    """One job of a `jobs` stage; a key it leaves unset takes the stage's value."""

    # unique in its stage (letters, digits, `_.-`); an array's jobs are NAME[1], NAME[2], ...
    name: str = MISSING
    # a bash script (give this or `command`)
    script: str | None = None
    # an argv list run without a shell (give this or `script`)
    command: list[str] | None = None
    # CPUs the job holds while it runs
    cpus_per_task: float | None = limited(None, gt=0)
    # memory the job holds while it runs: 512M, 8G (a plain number is megabytes)
    memory: str | int | None = None
    # GPUs the job holds while it runs; Ray sets CUDA_VISIBLE_DEVICES
    gpus: float | None = limited(None, ge=0)
    # killed (whole process group) after this long: 90s, 10m, 2h (a plain number is minutes)
    time_limit: str | int | float | None = None
    # environment variables, added to the stage's `env`
    env: dict[str, object] = field(default_factory=dict)
    # working directory (must exist); null: the stage's `cwd`
    cwd: str | None = None
    # `1-100`, `0-30:10` or `1,3,5`: one job per index, RUNNER_ARRAY_INDEX and {index} set
    array: str | int | None = None
    # SCNS-Conductor's submit fields, as its API takes them (also nested: {job: {...}, script})
    # the account the job is charged to, recorded with it
    account: str | None = None
    # only nodes of this partition run the job (cluster.partitions on the embedded cluster)
    partition: str | None = None
    # tasks of the job on its node: it holds ntasks_per_node x cpus_per_task CPUs
    ntasks_per_node: int | None = limited(None, ge=1)
    # SCNS's name for `memory`: 8G (a plain number is megabytes)
    memory_per_node: str | int | None = None
    # the job wants a node to itself
    exclusive: bool = False
    # SCNS's name for `env` (both are applied)
    environment: dict[str, object] = field(default_factory=dict)
    # SCNS's name for `cwd`
    current_working_directory: str | None = None
    # files for the job's stdout / stderr, relative to its cwd (null: <run.dir>/<stage>/JOB.out)
    standard_output: str | None = None
    standard_error: str | None = None
    # admission order among waiting jobs, higher first (null: the stage's priority)
    priority: float | None = None


@dataclass
class JobsStage(StageSpec):
    """Heterogeneous shell jobs, each with its own resources and time limit, run as they fit."""

    # the jobs: {name, script | command, cpus_per_task, memory, gpus, time_limit, env, cwd, array}
    jobs: list[object] = field(default_factory=list)
    # more jobs with the same keys, from a YAML/JSON list or a JSONL file
    jobs_file: str | None = None
    # keep reading lines appended to the JSONL `jobs_file`, running them as they come, until
    # a line {"close": true}
    follow: bool = resource(False)
    # defaults for every job: CPUs, memory, GPUs and time limit per job
    cpus_per_task: float = resource(1.0, gt=0)
    memory: str | int | None = resource(None)
    gpus: float = resource(0.0, ge=0)
    time_limit: str | int | float | None = resource(None)
    # environment variables of every job
    env: dict[str, object] = field(default_factory=dict)
    # working directory of every job (null: where runner was started)
    cwd: str | None = None
    # at most this many jobs of the stage at once (null: as many as resources allow)
    max_concurrent: int | None = resource(None, ge=1)
    # times a job whose Ray worker died is started again (a job's own failure is final)
    retries: int = policy(0, ge=0)
    # seconds between SIGTERM and SIGKILL when a job is cancelled (mode=cancel, Ctrl-C)
    cancel_grace: float = policy(10.0, gt=0)
    # print each job's stdout/stderr lines on the terminal as they come, prefixed [job NAME]
    # (above the progress bars); they are always in the job's .out/.err files
    show_output: bool = resource(False)


@dataclass
class RolesStage(StageSpec):
    """Long-running role replicas with priorities, placement-group pools and preemption."""

    # the quota these roles share: {name, resources: {cpus, gpus, memory (8G; MB) | memory_gb}}
    pool: dict[str, object] = field(default_factory=dict, metadata={"resource": True})
    # {reserved: [{role: NAME, count} | {resources: {...}, count, min_priority}],
    # max_dynamic_pgs, reuse, enable, enable_dynamic_pgs, pg_creation_timeout}; ScheduleMesh's
    # `pg_pool_config` (with `high_priority_pg_specs`, `enable_pg_reuse`) is read as it
    pg_pool: dict[str, object] = field(
        default_factory=dict, metadata={"resource": True, "aliases": ("pg_pool_config",)}
    )
    # {label_rules, enable_label_preemption, aggressiveness: low|medium|high (or ScheduleMesh's
    # aliases), cancel_timeout, cross_pool, protected_pools}
    preemption: dict[str, object] = field(default_factory=dict, metadata={"resource": True})
    # scale every role's resources down in proportion when the cluster is smaller than the spec
    autoscale_to_cluster: bool = resource(False)
    # NAME: {priority, replicas: N | {min, max}, resources, labels, pg, start_after, actor, steps}
    roles: dict[str, object] = field(default=MISSING, metadata={"resource": True})


# every stage kind's schema, by the name users write as `kind:`
STAGE_KINDS: dict[str, type[StageSpec]] = {
    "pool": PoolStage,
    "roles": RolesStage,
    "shard": ShardStage,
    "jobs": JobsStage,
}
