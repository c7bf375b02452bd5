"""The keys of a `shard` stage (see `runner.schema` for the field marks: `resource`, `policy`,
limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from runner.schema import StageSpec, limited, policy, resource


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
