"""The keys of a `jobs` stage and of each of its jobs (`JobSpec`, checked by the same
validator as stage keys; see `runner.schema` for the field marks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from runner.schema import StageSpec, limited, policy, resource


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
