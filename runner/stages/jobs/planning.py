"""The spec checks and the plan of a jobs stage: one unit per job, fingerprinted from what it
runs (never its resources), and one claim per resource shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from runner.cluster import PARTITION_LABEL, ClusterInfo
from runner.errors import PlanError
from runner.identity import digest
from runner.plan import (
    Claim,
    PlanContext,
    StagePlan,
    StageSizing,
    Unit,
    claim,
    decider,
    kept_keys,
    stage_config,
)
from runner.resources import Resources
from runner.schema import StageSpec
from runner.spec import Problems
from runner.stages.jobs.job import Job, load_jobs, submit_body
from runner.stages.jobs.schema import JobsStage

log = logging.getLogger(__name__)

# per-job keys that only size, place or account the job: left out of the stage config the
# fingerprints hash
RESOURCE_KEYS = (
    "cpus_per_task",
    "memory",
    "gpus",
    "time_limit",
    "ntasks_per_node",
    "memory_per_node",
    "exclusive",
    "partition",
    "account",
    "priority",
)


# the jobs `check` resolved without a problem, by the spec object checked: the plan, made next
# in the same process from the same object, takes them instead of resolving them again (a
# 100,000-task array takes about 0.4 s to resolve)
_checked: dict[int, tuple[JobsStage, list[Job]]] = {}


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Every job readable, named once, runnable (script or command, a cwd that exists)."""
    assert isinstance(spec, JobsStage)
    before = len(problems.items)
    jobs = load_jobs(name, spec, problems)
    if len(problems.items) == before:
        _checked[id(spec)] = (spec, jobs)


def _jobs(name: str, spec: JobsStage) -> list[Job]:
    """The stage's jobs: those its check resolved (this very spec object), else read now."""
    found = _checked.pop(id(spec), None)
    if found is not None and found[0] is spec:
        return found[1]
    problems = Problems(None)
    jobs = load_jobs(name, spec, problems)
    problems.raise_if_any()
    return jobs


def plan(name: str, spec: StageSpec, raw: dict[str, object], ctx: PlanContext) -> StagePlan:
    """One unit per job (fingerprint: what it runs, its env and cwd, its upstream stages),
    one claim per job shape, and a warning when `max_concurrent` asks for more than fits."""
    assert isinstance(spec, JobsStage)
    jobs = _jobs(name, spec)
    _check_partitions(name, jobs, ctx.cluster)
    config = _config(spec, raw)
    upstream = [ctx.upstream[n].fingerprint for n in spec.needs]
    decide = decider(name, config, ctx, kept_keys(spec))
    units = [decide(Unit(j.id, digest(j.identity(), *upstream), j)) for j in jobs]
    to_run = [j for j, u in zip(jobs, units, strict=True) if u.run]
    if warning := _concurrency_warning(name, spec.max_concurrent, to_run, ctx.cluster):
        log.warning(warning)
    fingerprint = digest("jobs", *(u.fingerprint for u in units))
    claims = _claims(to_run, ctx.cluster)
    settings = JobsSettings(tuple(upstream))
    sizing = StageSizing.by_unit({j.id: j.resources for j in jobs})
    return StagePlan(
        name,
        "jobs",
        spec,
        fingerprint,
        config,
        units,
        claims,
        settings=settings,
        sizing=sizing,
        open_ended=spec.follow and spec.jobs_file is not None,
    )


@dataclass(frozen=True)
class JobsSettings:
    """What a jobs stage's run takes from its plan: its upstream stages' fingerprints (a job
    that arrives while the stage runs is fingerprinted as the planned ones are)."""

    upstream: tuple[str, ...]


def _config(spec: JobsStage, raw: dict[str, object]) -> dict[str, object]:
    """The stage's config as the ledger records it, with each inline job's resource keys left
    out (a job's fingerprint never holds its resources)."""
    config = stage_config(spec, raw)
    jobs = config.get("jobs", [])
    flat = [submit_body(job) for job in jobs] if isinstance(jobs, list) else []
    config["jobs"] = [
        {k: v for k, v in job.items() if k not in RESOURCE_KEYS} if isinstance(job, dict) else job
        for job in flat
    ]
    return config


def _check_partitions(name: str, jobs: list[Job], cluster: ClusterInfo) -> None:
    """A job's partition must be one the cluster's nodes have (where they are known)."""
    if cluster.partitions is None:
        return
    none = (
        f"none: no node has a Ray label {PARTITION_LABEL}"
        if cluster.node_partitions
        else "none declared; set cluster.partitions"
    )
    have = ", ".join(cluster.partitions) or none
    wrong = [j for j in jobs if j.partition is not None and j.partition not in cluster.partitions]
    if wrong:
        raise PlanError(
            [
                f"pipeline.stages.{name}: job {j.id!r}: partition = {j.partition!r}: no node of "
                f"the cluster has it (partitions: {have})"
                for j in wrong
            ]
        )


def _shapes(jobs: list[Job]) -> dict[tuple[Resources, bool], list[str]]:
    """Job ids by what they claim: their resources, and whether they need a node to itself."""
    shapes: dict[tuple[Resources, bool], list[str]] = {}
    for job in jobs:
        shapes.setdefault((job.resources, job.exclusive), []).append(job.id)
    return shapes


def _claims(jobs: list[Job], cluster: ClusterInfo) -> list[Claim]:
    """One claim per shape; a shape no node can hold is a plan error naming its jobs."""
    return [_claim(_label(ids), *shape, len(ids), cluster) for shape, ids in _shapes(jobs).items()]


def _claim(
    label: str, resources: Resources, exclusive: bool, count: int, cluster: ClusterInfo
) -> Claim:
    """How many jobs of one shape fit at once: node by node (`claim`); an exclusive job
    (SCNS's `exclusive: true`) takes a whole node, so one on each node that holds it."""
    if not exclusive:
        return claim(label, resources, count, cluster)
    whole = sum(1 for node in cluster.nodes if resources.fits_in(node))
    return Claim(f"exclusive {label} (a whole node each)", resources, count, min(count, whole))


def _label(ids: list[str]) -> str:
    if len(ids) == 1:
        return f"job '{ids[0]}'"
    shown = ", ".join(f"'{i}'" for i in ids[:3])
    return f"job of {shown}" + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def _concurrency_warning(
    name: str, wanted: int | None, jobs: list[Job], cluster: ClusterInfo
) -> str | None:
    """Say how many jobs can really run at once when `max_concurrent` asks for more."""
    if wanted is None or len(jobs) < 2:
        return None
    can = max(_claim("", *shape, wanted, cluster).fit for shape in _shapes(jobs))
    if can >= min(wanted, len(jobs)):
        return None
    return (
        f"{name}: max_concurrent={wanted}, but the cluster holds at most {can} of these jobs "
        f"at once; {can} will run at a time"
    )
