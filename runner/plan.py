"""Spec → plan: units with fingerprints and run/skip decisions, resource claims, a fit check.

A unit's fingerprint hashes what changes its result (its stage's config without resource and
policy keys, the source of its worker's module, its input's identity, its upstream units'
fingerprints) and never how fast it runs or how failures are handled, so changing
`num_workers` or `retries` reruns nothing ("policy changed, kept"), while changing a worker
argument or the worker's code reruns exactly the stage and everything downstream. Decisions
compare fingerprints with the ledger.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from itertools import repeat
from pathlib import Path

from runner.cluster import ClusterInfo
from runner.errors import PlanError
from runner.identity import digest
from runner.lifecycle import UnitState
from runner.resources import Resources
from runner.schema import StageSpec
from runner.sizing import fits
from runner.spec import Pipeline
from runner.store import Ledger, Prior, PriorUnit, UnitRow


def units_digest(ids: Sequence[str], fingerprints: Sequence[str]) -> str:
    """One digest of a stage's units (ids and fingerprints in plan order): equal to the
    ledger's record of a stage whose units all finished, no unit of it needs deciding. Two
    joins and one hash: a million units take a few hundredths of a second."""
    h = hashlib.blake2b(digest_size=16)
    h.update("\0".join(ids).encode())
    h.update(b"\1")
    h.update("\0".join(fingerprints).encode())
    return h.hexdigest()


@dataclass(slots=True)
class Unit:
    """One unit of work: what the ledger keys, what runs, and whether (and why) it runs."""

    id: str
    fingerprint: str
    payload: object
    run: bool = True
    reason: str = "new"

    def row(
        self,
        stage: str,
        state: UnitState,
        attempts: int,
        started: float | None = None,
        ended: float | None = None,
        worker: str | None = None,
        error: str | None = None,
        result: object = None,
        record: object = None,
    ) -> UnitRow:
        """This unit's ledger row: its duration is the span once both ends are known, its
        input the payload unless `record` says how the ledger keeps it."""
        duration = None if started is None or ended is None else ended - started
        return UnitRow(
            stage,
            self.id,
            self.fingerprint,
            state,
            attempts,
            started,
            ended,
            duration,
            worker,
            error,
            self.payload if record is None else record,
            result,
        )


@dataclass(frozen=True)
class Claim:
    """A group of identical resource requests (pool workers, jobs of one shape, shards)."""

    label: str
    resources: Resources
    count: int
    # how many of them the cluster can hold at once
    fit: int


@dataclass(frozen=True)
class StageSizing:
    """What a unit of a stage holds while it runs (its kind says: a job its own shape, a role
    replica its role's). A pool's items share long-lived workers, so its resources are charged
    per worker lane (`per_lane`), not per item."""

    per_lane: bool
    default: Resources | None
    units: dict[str, Resources] = field(default_factory=dict)

    def of(self, unit: str) -> Resources | None:
        return self.units.get(unit, self.default)

    @staticmethod
    def by_unit(per_unit: Mapping[str, Resources]) -> StageSizing:
        """Each unit's own shape: the commonest as the default, the others by unit."""
        shapes = Counter(per_unit.values())
        if not shapes:
            return StageSizing(False, None)
        default = shapes.most_common(1)[0][0]
        return StageSizing(False, default, {u: r for u, r in per_unit.items() if r != default})


@dataclass
class StagePlan:
    """A stage compiled for one cluster and one ledger."""

    name: str
    kind: str
    spec: StageSpec
    fingerprint: str
    # the config the fingerprint hashed, kept in the ledger to explain later changes
    config: dict[str, object]
    # None while the units depend on an upstream stage that has not run yet
    units: list[Unit] | None
    claims: list[Claim] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # for deferred stages: the reason every unit will get (e.g. "input changed")
    pending_reason: str = ""
    # the kind's own settings resolved at plan time (a dataclass of the kind's: CPUs per
    # worker, a roles stage's typed roles), handed to its run
    settings: object = None
    # what each unit holds while it runs (None: the stage's first claim, one per unit)
    sizing: StageSizing | None = None
    # each unit drawn on a track of its own across its attempts (a role replica), not on the
    # worker that ran it: its kind's `StageKind.unit_tracks`, kept in `plan.json` for the
    # picture and the trace
    unit_tracks: bool = False
    # units may arrive while it runs (a followed jobs_file): never known to have none to run
    open_ended: bool = False

    @property
    def to_run(self) -> list[Unit]:
        return [u for u in self.units or [] if u.run]

    def reasons(self) -> Counter[str]:
        return Counter(u.reason for u in self.units or [])


@dataclass
class Plan:
    """Every stage of a pipeline, in dependency order."""

    pipeline: str
    cluster: ClusterInfo
    stages: dict[str, StagePlan]


def launches_nothing(plan: Plan) -> bool:
    """Whether the run has nothing to start: every stage's units known, none to run, none
    open-ended (a rerun with nothing to do, answered from the ledger without a cluster)."""
    return all(
        s.units is not None and not s.open_ended and not s.to_run for s in plan.stages.values()
    )


@dataclass
class PlanContext:
    """What a stage kind needs to plan one stage."""

    cluster: ClusterInfo
    ledger: Ledger | None
    fresh: bool
    upstream: Mapping[str, StagePlan]
    # the run directory, for a kind whose units leave files there (a shard's committed output):
    # what is on disk decides a unit as the run will, so a plan says what the run then does;
    # None where nothing was written (a simulated run)
    run_dir: Path | None = None


# how a stage kind plans one stage: (name, spec, raw keys, context) -> StagePlan
StagePlanner = Callable[[str, StageSpec, dict[str, object], PlanContext], StagePlan]


# the key of a stage config that holds the digest of its worker's source
CODE = "_code"


def kept_keys(spec: StageSpec) -> frozenset[str]:
    """Keys that change how units run (resources, speed, failure policy), never their results."""
    return frozenset(
        name
        for f in fields(spec)
        if f.metadata.get("resource") or f.metadata.get("policy")
        for name in (f.name, *f.metadata.get("aliases", ()))
    )


def stage_config(spec: StageSpec, raw: dict[str, object], code: str = "") -> dict[str, object]:
    """What the ledger records of a stage to explain the next plan: every key but `needs`, and
    the digest of the worker's source when it has one."""
    config = {k: v for k, v in raw.items() if k != "needs"}
    if code:
        config[CODE] = code
    return config


def result_config(spec: StageSpec, raw: dict[str, object], code: str = "") -> dict[str, object]:
    """The keys of a stage that change its results: resource and policy keys and `needs` left
    out, the digest of the worker's source in."""
    kept = kept_keys(spec)
    return {k: v for k, v in stage_config(spec, raw, code).items() if k not in kept}


def stage_fingerprint(config: dict[str, object], upstream: list[str]) -> tuple[str, str]:
    """(fingerprint of the config alone, fingerprint of config + upstream stages)."""
    own = digest(json.dumps(config, sort_keys=True, default=str))
    return own, digest(own, *upstream)


def changed_paths(old: object, new: object, prefix: str) -> list[str]:
    """Dotted key paths whose values differ between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            paths += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return paths
    return [] if old == new else [prefix]


@dataclass
class Decider:
    """Decides run or skip for the units of one stage against the ledger."""

    # what the ledger remembers of the units (read when first needed, by `load`)
    prior: Prior | Mapping[str, PriorUnit] | None
    fresh: bool
    # why a unit whose fingerprint changed runs again: `changed: <path>`, `code changed` or
    # `input changed`
    changed: str
    # why a finished unit is skipped: `done`, or `policy changed, kept` when only keys that
    # never change results (retries, timeouts, resources) differ from the ledger's record
    kept: str = "done"
    load: Callable[[], Prior | Mapping[str, PriorUnit]] | None = None
    # the ledger's `units_digest` of the stage: all of these units are done
    finished: str | None = None

    def _prior(self) -> Prior | Mapping[str, PriorUnit]:
        if self.prior is None:
            self.prior = self.load() if self.load is not None else {}
        return self.prior

    def __call__(self, unit: Unit) -> Unit:
        if self.fresh:
            unit.run, unit.reason = True, "fresh run"
            return unit
        before = self._prior().get(unit.id)
        if before is None:
            unit.run, unit.reason = True, "new"
        elif before.fingerprint != unit.fingerprint:
            unit.run, unit.reason = True, self.changed
        elif before.state is UnitState.done:
            unit.run, unit.reason = False, self.kept
        elif before.state in (UnitState.failed, UnitState.timeout):
            unit.run, unit.reason = True, "failed last time"
        else:
            unit.run, unit.reason = True, "not finished last time"
        return unit

    def units(
        self, ids: Sequence[str], fingerprints: Sequence[str], payloads: Sequence[object]
    ) -> list[Unit]:
        """Units of parallel ids, fingerprints and payloads, each decided as a call would
        decide it, with the commonest case of a resumed stage (done, same fingerprint) in the
        loop itself."""
        finished = self.finished is not None and not self.fresh
        if finished and units_digest(ids, fingerprints) == self.finished:  # no unit to read
            n = len(ids)
            return list(
                map(Unit, ids, fingerprints, payloads, repeat(False, n), repeat(self.kept, n))
            )
        prior = self._prior()
        if self.fresh or not isinstance(prior, Prior):
            return [self(Unit(*entry)) for entry in zip(ids, fingerprints, payloads, strict=True)]
        done, kept = prior.done.get, self.kept
        out: list[Unit] = []
        add = out.append
        for uid, fp, payload in zip(ids, fingerprints, payloads, strict=True):
            if done(uid) == fp:
                add(Unit(uid, fp, payload, False, kept))
            else:
                add(self(Unit(uid, fp, payload)))
        return out


def decider(
    name: str,
    config: dict[str, object],
    ctx: PlanContext,
    kept: frozenset[str] = frozenset(),
) -> Decider:
    """The decider for stage `name`, knowing what changed since the ledger's record of it;
    `config` is what the ledger records (`stage_config`), `kept` the keys that never rerun."""
    ledger = ctx.ledger
    record = ledger.stage(name) if ledger else None
    load = (lambda: ledger.prior(name)) if ledger is not None and not ctx.fresh else None
    changed, skipped = "input changed", "done"
    if record is not None:
        old = {k: v for k, v in record.config.items() if k not in kept}
        new = {k: v for k, v in config.items() if k not in kept}
        code = old.pop(CODE, None) != new.pop(CODE, None)
        paths = changed_paths(old, new, f"pipeline.stages.{name}")
        if paths:
            changed = "changed: " + ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")
            changed += ", code" if code else ""
        elif code:
            changed = "code changed"
        if any(record.config.get(k) != config.get(k) for k in kept):
            skipped = "policy changed, kept"
    finished = record.units if record is not None and record.state == "done" else None
    return Decider(None, ctx.fresh, changed, skipped, load, finished)


def claim(label: str, resources: Resources, count: int, cluster: ClusterInfo) -> Claim:
    """A claim and how many of it fit at once, node by node."""
    per_node = 0
    for node in cluster.nodes:
        limits = [fits(node.cpus, resources.cpus), fits(node.gpus, resources.gpus)]
        if resources.memory:
            limits.append(fits(node.memory, resources.memory))
        per_node += min(limits)
    return Claim(label, resources, count, min(count, per_node))


@contextmanager
def no_collection() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: planning a million units makes millions of
    objects that all live on, and each collection pass over them frees nothing (a third of
    the plan's time); reference counting still frees what dies."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def make_plan(
    pipeline: Pipeline,
    planners: Mapping[str, StagePlanner],
    cluster: ClusterInfo,
    ledger: Ledger | None,
    fresh: bool,
    run_dir: Path | None = None,
) -> Plan:
    """Plan every stage in dependency order, against the ledger and the files in `run_dir`;
    raise PlanError for claims that can never fit."""
    plans: dict[str, StagePlan] = {}
    with no_collection():
        for name, spec in pipeline.stages.items():
            upstream = {n: plans[n] for n in spec.needs}
            ctx = PlanContext(cluster, ledger, fresh, upstream, run_dir)
            plans[name] = planners[spec.kind](name, spec, pipeline.raw[name], ctx)
    problems = [
        f"pipeline.stages.{name}: one {c.label} needs {c.resources.describe()}, more than any "
        f"node has: {c.resources.shortfall(cluster.largest)} on the largest node"
        for name, sp in plans.items()
        for c in sp.claims
        if c.count and c.fit == 0
    ]
    if problems:
        raise PlanError(problems)
    return Plan(pipeline.name, cluster, plans)
