"""The seam between the unit loop and the stage kinds: what a kind is (`StageKind`), what a
running stage is given (`RunContext`) and the hooks it fills in (`StageRun`).

A kind is a one-way plugin: its hooks read the stage's units and leases and hand the loop
verdicts and orders (`verdicts.py`) with the remote work described as values (`calls.py`).
It never calls the loop, the scheduler or Ray, so the same kind code runs on a real Ray and in
virtual time (`cluster=sim`).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner import carry
from runner.calls import Call
from runner.cluster import ClusterInfo, RayNode
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.measured import Measured
from runner.plan import PlanContext, StagePlan, StagePlanner, Unit
from runner.progress import Progress
from runner.schema import StageSpec
from runner.spec import KindCheck
from runner.store import Ledger, RunStore, storage_error
from runner.verdicts import Cancel, End, Fail, Failed, Lend, Lost, Stopped, Verdict

# what a hook returns: verdicts, applied by the loop one by one as they come
Verdicts = Iterator[Verdict]


@dataclass
class RunContext:
    """A run's shared services, handed to each stage as it runs."""

    store: RunStore
    ledger: Ledger
    cluster: ClusterInfo
    # set on SIGINT/SIGTERM: admit nothing new, cancel what runs, return promptly
    stop: threading.Event
    progress: Progress
    # the loop's clock (monotonic seconds, or virtual ones) and wall clock (epoch seconds)
    clock: Callable[[], float]
    wall: Callable[[], float]
    # the live nodes, as the loop follows them (a job's partition reads them)
    nodes: list[RayNode] = field(default_factory=list)
    # run.fresh: ignore what an earlier run of this directory left (saved states too)
    fresh: bool = False
    # cluster=sim: nothing runs and nothing is written; units take the times below
    virtual: bool = False
    measured: Measured | None = None
    unit_seconds: float = 1.0

    def stage_dir(self, stage: str) -> Path:
        return self.store.stage_dir(stage)

    def seconds(self, stage: str, unit: str | None, declared: float | None = None) -> float:
        """How long a unit takes in virtual time: as the measured run took it (its stage's
        mean for a unit that run lacks), else as declared, else `sim_unit_seconds`."""
        m = self.measured.stage(stage) if self.measured is not None else None
        if m is not None and m.mean is not None:
            return m.durations.get(unit or "", m.mean)
        return declared if declared is not None else self.unit_seconds


@dataclass
class StageOutcome:
    """How a stage ended, for the summary and the exit code."""

    name: str
    kind: str
    total: int = 0
    done: int = 0
    failed: int = 0
    timeout: int = 0
    cancelled: int = 0
    skipped: int = 0
    wall: float = 0.0
    # CPU seconds the stage's processes used (for utilization)
    cpu_seconds: float = 0.0
    ok: bool = True
    interrupted: bool = False
    # False: the run was stopped before the stage started
    started: bool = True
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    # mean seconds from a lease's grant to its process's start (Ray starting it)
    start_latency: float | None = None
    # ... and each attempt's, by unit, for units with a lease of their own (the first 10,000)
    start_latencies: dict[str, list[float]] = field(default_factory=dict)
    # leases asked for and granted in all, the most held at once, and the shape of one (the
    # simulated run's report)
    asked: int = 0
    leases: int = 0
    peak: int = 0
    shape: str = ""
    requeues: int = 0
    # victims the scheduler chose among its units, by reason
    preempted: dict[str, int] = field(default_factory=dict)


_BAD = (UnitState.failed, UnitState.timeout, UnitState.out_of_memory)


class StageRun:
    """One stage while it runs: a kind subclasses this and fills in the hooks; the loop calls
    them and applies what they return. The base serves kinds whose every unit gets a lease of
    its own."""

    # how many times a unit that failed by its own fault runs again
    retries: int = 0
    # seconds a unit asked to stop gets before it is killed
    grace: float = 5.0
    # write a ledger row when a unit starts (coarse units) or only when it ends (pool items)
    running_rows: bool = True
    # what the stage's units are called in messages
    noun: str = "unit"

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        self.stage, self.ctx = stage, ctx
        self.name = stage.name
        units = stage.to_run
        self.works = self.make_works(units)
        self.queue: deque[Work] = deque(self.works)
        self.leases: set[Lease] = set()
        self.asked: int = 0
        self.cap: int | None = None
        # units to run, and those not yet in a final state
        self.size = len(units)
        self.left = len(units)

    # --- the stage's units --------------------------------------------------------------

    def make_works(self, units: list[Unit]) -> list[Work]:
        """The units in the loop's hands from the start (a kind that feeds a million units
        lazily keeps them as plan units until they run, and makes none here)."""
        return [Work(self.name, u) for u in units]

    def counts(self) -> Counter[UnitState]:
        """The stage's units to run by state (the metrics gauges, the stage's outcome)."""
        return Counter(w.state for w in self.works)

    def unfinished(self) -> list[Work]:
        """Units not yet in a final state (cancelled when the stage closes early)."""
        return [w for w in self.works if not w.state.final]

    def find(self, unit: str) -> Work | None:
        """The unit named `unit`, to cancel it (None when it is not one to run)."""
        return next((w for w in self.works if w.id == unit), None)

    def ended(self, work: Work) -> None:
        """A unit reached its final state."""
        self.left -= 1

    def ended_all(self, works: Sequence[Work]) -> None:
        """Units that reached their final state together (a pool batch)."""
        for work in works:
            self.ended(work)

    def landed(self, lease: Lease, files: Mapping[str, bytes]) -> list[Verdict]:
        """Write the files a task brought back in its reply (no shared filesystem) where they
        belong; what follows when the runner's side cannot take them (none when it could):
        the run stops with the one storage message and the lease's unit is left for a rerun."""
        try:
            carry.land(files)
        except OSError as exc:
            where = Path(exc.filename) if isinstance(exc.filename, str) else None
            return [Fail(storage_error(self.ctx.store.root, exc, where)), Stopped(lease)]
        return []

    # --- what a kind fills in ----------------------------------------------------------

    def prepare(self) -> Iterator[Verdict]:
        """Before the first ask: files to write, groups to reserve."""
        yield from ()

    def ask_for(self, work: Work) -> Ask:
        """The lease one unit needs."""
        raise NotImplementedError

    def asks(self) -> Iterable[Ask | Lend]:
        """New asks: one per queued unit, as far as `cap` allows."""
        while self.queue and (self.cap is None or self.asked < self.cap):
            work = self.queue.popleft()
            if work.state.final:
                continue
            self.asked += 1
            yield self.ask_for(work)

    def launch(self, lease: Lease) -> Iterator[Verdict]:
        """Start the lease's work on `lease.placement` (`Launch`); nothing yet to wait."""
        raise NotImplementedError

    def on_start(self, lease: Lease) -> Iterator[Verdict]:
        """The lease's process started (its units are RUNNING now)."""
        yield from ()

    def on_reply(self, lease: Lease, tag: object, value: object) -> Iterator[Verdict]:
        """A call on the lease (or its task) answered `value`."""
        raise NotImplementedError

    def on_failure(self, lease: Lease, tag: object, error: str, lost: bool) -> Iterator[Verdict]:
        """A call raised (`lost`: its worker or node died, no fault of the unit)."""
        yield End(lease)
        for work in list(lease.work):
            yield Lost(work, error, lease.node_left) if lost else Failed(work, error)

    def on_preempt(self, lease: Lease, reason: str) -> Iterator[Verdict]:
        """The scheduler chose the lease as a victim (it is asked to stop next)."""
        yield from ()

    def stop(self, lease: Lease) -> Iterator[Verdict]:
        """Ask what runs on the lease to stop (it answers, or is killed at the deadline)."""
        if not lease.actor:
            yield Cancel(lease)

    def last_call(self, lease: Lease) -> tuple[Call, float] | None:
        """A last call to a stopping lease that did not stop in time, and how long to wait for
        its answer before it is killed: a victim's `state()`."""
        return None

    def saved_state(self, lease: Lease) -> object:
        """The state a preempted lease's unit saved, as the kind heard it."""
        return None

    def release(self, lease: Lease) -> Iterator[Verdict]:
        """One of the stage's leases ends: what the kind keeps of it (`Park`) or ends with it."""
        yield from ()

    def requeue(self, work: Work) -> None:
        """A unit is pending again (retry, preempted, lost): ask for it again."""
        self.queue.appendleft(work)

    def lease_ended(self, lease: Lease) -> None:
        """Bookkeeping when one of this stage's leases ends."""
        if lease.ask.work is not None:
            self.asked -= 1

    def tick(self) -> Iterator[Verdict]:
        """Once per turn of the loop: output to show, work to hand out."""
        yield from ()

    def due(self) -> float | None:
        """When (the loop's clock) the stage next needs a turn of its own, if it does: a role
        that arrives at a time. The loop wakes then, in virtual time too."""
        return None

    def busy(self) -> bool:
        """Any unit not finished (idle leases left then are closed with the stage)."""
        return self.left > 0

    def close(self) -> Iterator[Verdict]:
        """The stage is over (its leases are gone): remove what it made for itself."""
        yield from ()

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        """Results, merges, the stage's verdict: by default, failed by `failure_budget` (a
        kind that adds nothing here still fails a stage whose units failed)."""
        problem = self.failure_budget()
        if problem:
            outcome.ok, outcome.message = False, problem
        return outcome

    def failure_budget(self) -> str | None:
        """Why the stage fails, by its units' end states (None: it succeeded)."""
        bad = [w for w in self.works if w.state in _BAD]
        if not bad:
            return None
        shown = ", ".join(f"{w.id} ({w.error})" for w in bad[:5]) + (" ..." if len(bad) > 5 else "")
        return f"{len(bad)} {self.noun}(s) did not complete: {shown}"


# how a kind starts running one stage: (plan, context) -> its StageRun
StageOpener = Callable[[StagePlan, RunContext], StageRun]


@dataclass(frozen=True)
class StageKind:
    """A stage kind: its schema, its own spec checks, how it plans and how it runs, and what
    the core needs to know of it without naming it."""

    spec_type: type[StageSpec]
    check: KindCheck
    planner: StagePlanner
    open: StageOpener
    # the spec's keys that hold paths, relative to the spec's directory (`*`: every item)
    path_keys: tuple[tuple[str, ...], ...] = ()
    # the keys of its free-form mappings (by path in the stage, `*`: any name), so that one
    # the YAML leaves out is still overridden as KEY=VALUE and a misspelt one is named
    mapping_keys: Mapping[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)
    # what its units are called in reports (a pool's leases are its workers)
    noun: str = "unit"
    # each unit drawn on a track of its own (a role replica), not packed into a worker's
    unit_tracks: bool = False
    # many units share one lease (a pool's worker): the simulator scales their times
    shared_leases: bool = False
    # `mode=status` lists its units as a batch system lists jobs: state, exit code or signal,
    # start, end, node, stdout and stderr
    job_table: bool = False

    def plan(
        self, name: str, spec: StageSpec, raw: dict[str, object], ctx: PlanContext
    ) -> StagePlan:
        """The kind's plan of one stage (`planner`), marked with what a reader of the run
        without the kinds' registry needs of the kind (`plan.json` keeps it)."""
        stage = self.planner(name, spec, raw, ctx)
        stage.unit_tracks = self.unit_tracks
        return stage
