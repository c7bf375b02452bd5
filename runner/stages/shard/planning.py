"""How a shard stage plans: one unit per id range, decided by the ledger and by the shard's
committed files, a claim per shard, and a GPU check against the cluster (and NVML, on a local
cluster) before anything starts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runner import gpus
from runner.cluster import ClusterInfo
from runner.errors import PlanError
from runner.identity import code_digest, digest
from runner.plan import (
    PlanContext,
    StagePlan,
    Unit,
    claim,
    decider,
    kept_keys,
    result_config,
    stage_config,
)
from runner.plan import stage_fingerprint as fingerprint_of
from runner.resources import Resources
from runner.schema import StageSpec
from runner.stages.shard.files import SHARDS, contract, shard_files
from runner.stages.shard.merge import manifest_of
from runner.stages.shard.ranges import Shard, input_identity, recorded, split
from runner.stages.shard.schema import ShardStage

# why a shard's files overrule the ledger (see `_on_disk`)
OUTPUT_MISSING = "output missing"
COMMITTED = "committed"


def plan(name: str, spec: StageSpec, raw: dict[str, object], ctx: PlanContext) -> StagePlan:
    """One unit per id range; a claim of CPUs and GPUs per shard; a GPU check against the
    cluster (and NVML, on a local cluster)."""
    assert isinstance(spec, ShardStage)
    code = code_digest(str(spec.fn.get("_target_", ""))) if spec.fn else ""
    source = input_identity(spec.input, ctx.ledger)
    own, fp = fingerprint_of(
        result_config(spec, raw, code), [ctx.upstream[n].fingerprint for n in spec.needs]
    )
    config = stage_config(spec, raw, code)
    fp = digest(fp, source)
    shards = recorded(ctx.ledger, name, spec, source) or split(
        Path(spec.input), spec.id_column, spec.num_shards, f"pipeline.stages.{name}.input"
    )
    _check_high(name, spec, shards)
    decide = decider(name, config, ctx, kept_keys(spec))
    base = {
        "input": source,
        "id_column": spec.id_column,
        "num_shards": spec.num_shards,
        "contract": contract(spec.command, spec.outputs),
    }
    units = [
        decide(
            Unit(
                s.label,
                digest(own, json.dumps([s.low, s.high, s.rows], default=str), source),
                {
                    **base,
                    "index": s.index,
                    "low": s.low,
                    "high": s.high,
                    "rows": s.rows,
                    "end": s.end,
                    "ids": s.ids,
                    "count": len(shards),
                },
            )
        )
        for s in shards
    ]
    _on_disk(name, spec, shards, units, ctx)
    notes, groups = _gpu_groups(name, spec, ctx)
    if len(shards) < spec.num_shards:
        notes.append(f"{name}: {len(shards)} shard(s): the input has only {len(shards)} ids")
    resources = Resources(cpus=spec.cpus_per_shard, gpus=spec.gpus_per_shard)
    shard_claim = claim("shard", resources, len(shards), ctx.cluster)
    if spec.max_parallel is not None and shard_claim.fit > spec.max_parallel:
        notes.append(f"{name}: max_parallel {spec.max_parallel} of {shard_claim.fit} that fit")
    settings = ShardSettings(groups or None)
    return StagePlan(
        name, "shard", spec, fp, config, units, [shard_claim], notes, settings=settings
    )


def _on_disk(
    name: str, spec: ShardStage, shards: list[Shard], units: list[Unit], ctx: PlanContext
) -> None:
    """A done shard whose committed output is gone runs again (`OUTPUT_MISSING`); a shard
    committed by a run that died before its ledger write is done without running (`COMMITTED`,
    the run records it; not on a fresh run, which runs every shard). Decided here rather than
    when the stage starts, so `mode=plan` and the run's header say what the run then does. Only
    each shard's manifest is read and its output's existence checked, never the data: a resume
    stays cheap."""
    if ctx.run_dir is None or ctx.fresh:
        return
    root = ctx.run_dir / name / SHARDS
    for shard, unit in zip(shards, units, strict=True):
        files = shard_files(root, spec, shard.index, len(shards))
        committed = manifest_of(files.committed(unit.id, unit.fingerprint)) is not None
        if not unit.run and not committed:
            unit.run, unit.reason = True, OUTPUT_MISSING
        elif unit.run and committed:
            unit.run, unit.reason = False, COMMITTED


@dataclass(frozen=True)
class ShardSettings:
    """What a shard stage's run takes from its plan: the GPU groups (NVML indices) it asks for
    by name, where the cluster names its GPUs (None: Ray picks a node's GPUs)."""

    gpu_groups: list[list[int]] | None


def _check_high(name: str, spec: ShardStage, shards: list[Shard]) -> None:
    """`{high}` is the half-open bound; past the last of non-integer ids there is none."""
    if not any("{high}" in arg for arg in spec.command or []) or not shards:
        return
    last = shards[-1]
    if last.end is None:
        raise PlanError(
            [
                f"pipeline.stages.{name}.command: {{high}} is the first id after a shard's range "
                f"([{{low}}, {{high}}), half-open), but the ids in {spec.id_column!r} are not "
                f"integers, so the last shard ({last.low!r}..{last.high!r}) has none: use "
                "{last}, the last id of the range (included)"
            ]
        )


def _gpu_groups(name: str, spec: ShardStage, ctx: PlanContext) -> tuple[list[str], list[list[int]]]:
    """Stop at plan time when the cluster cannot hold one shard's GPUs; say what was found.
    With NVML here (the embedded cluster), also the eligible GPUs' groups by topology (their
    indices): the shards then run on exactly these (see slots.py)."""
    need = spec.gpus_per_shard
    if need <= 0:
        return [], []
    key = f"pipeline.stages.{name}.gpus_per_shard"
    group_size = max(1, int(need))
    local = ctx.cluster.where.startswith("local")
    found = gpus.inventory() if local else []
    if found:
        ok = gpus.eligible(found, spec.min_gpu_memory_gb)
        if len(ok) < group_size:
            listed = ", ".join(g.describe() for g in found)
            raise PlanError(
                [
                    f"{key}: each shard needs {need:g} GPU(s) with at least "
                    f"{spec.min_gpu_memory_gb:g} GB free; NVML found {len(ok)} such GPU(s) "
                    f"of {len(found)}: {listed}"
                ]
            )
        made = gpus.groups(ok, group_size, gpus.topology())
        indices = [[g.index for g in grp] for grp in made]
        shown = " ".join("[" + ",".join(map(str, grp)) + "]" for grp in indices)
        note = f"{name}: {len(ok)} of {len(found)} GPU(s) eligible; groups by topology: {shown}"
        return [note], indices
    have = ctx.cluster.largest.gpus
    if have >= need:
        _declared_gpu_memory(key, spec, ctx.cluster)
        return [], []
    if ctx.cluster.total.gpus == 0:
        raise PlanError(
            [
                f"{key}: each shard needs {need:g} GPU(s) but none were found: NVML reports no "
                "GPU on this machine and the cluster declares 0 GPUs (run on CPU with "
                "gpus_per_shard: 0, or declare logical GPUs with cluster.num_gpus)"
            ]
        )
    raise PlanError(
        [f"{key}: each shard needs {need:g} GPU(s); the largest node has {have:g} GPU(s)"]
    )


def _declared_gpu_memory(key: str, spec: ShardStage, cluster: ClusterInfo) -> None:
    """Stop at plan time when no node of a cluster that declares its GPUs' memory (simulated:
    `cluster.nodes`' `gpu_memory_gb`) has a shard's GPUs with `min_gpu_memory_gb` each, as a
    real run's task would refuse every GPU it is given."""
    nodes = cluster.gpu_memory_nodes(spec.gpus_per_shard, spec.min_gpu_memory_gb)
    if nodes is None or nodes:
        return
    most = max(m for n, m in zip(cluster.nodes, cluster.gpu_memory_gb, strict=True) if n.gpus)
    raise PlanError(
        [
            f"{key}: each shard needs {spec.gpus_per_shard:g} GPU(s) with at least "
            f"{spec.min_gpu_memory_gb:g} GB (min_gpu_memory_gb); the simulated nodes' GPUs "
            f"have at most {most:g} GB (cluster.nodes: gpu_memory_gb)"
        ]
    )
