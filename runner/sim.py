"""The simulated cluster (`cluster=sim`): the same plan through the same scheduler core and
the same kinds' asks, in virtual time, so behaviour at hundreds of nodes can be checked on a
laptop.

Nothing starts: an event queue advances a virtual clock that the scheduler reads. Each stage
kind says how it is simulated (`StageKind.simulate`: its asks, how long its units hold their
grants, what a preempted unit does); this module is only the engine: the clock, the queue of
events, the scheduler, and the numbers a real run's summary carries (units admitted, how many
ran at once, preemptions by reason, waiting time by priority, utilization, the makespan).

Units take the time a previous run measured (`cluster.sim_durations_from=RUN_DIR`, see
`runner.measured`), else what their spec declares, else `cluster.sim_unit_seconds`.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.measured import Measured, StageMeasure, measure
from runner.plan import Plan, StagePlan, StagePlanner, Unit, make_plan
from runner.resources import Resources
from runner.scheduler.core import Grant, Notify, Scheduler, Ticket
from runner.scheduler.metrics import Metrics
from runner.scheduler.policy import REASONS
from runner.scheduler.request import Request
from runner.spec import Spec

if TYPE_CHECKING:
    from runner.kind import StageKind

# a plan of at most this many units gets the order its units started in the report
SHOWN_STARTS = 20


class Events:
    """What is due when: actions by virtual time, each time's in the order they were added.

    Units that start together end together, so many events share a time: a heap of
    (time, sequence) tuples would compare down a long run of equal times on every push and pop;
    here the heap holds each distinct time once, and a time's actions are a list."""

    def __init__(self) -> None:
        self._times: list[float] = []
        self._due: dict[float, list[Callable[[], None]]] = {}

    def __bool__(self) -> bool:
        return bool(self._times)

    def add(self, when: float, action: Callable[[], None]) -> None:
        due = self._due.get(when)
        if due is None:
            self._due[when] = [action]
            heapq.heappush(self._times, when)
        else:
            due.append(action)

    def next_time(self) -> float:
        return self._times[0]

    def run_until(self, now: float) -> None:
        """Run every action due at `now` or before, in time order, and those they add on the
        way: for the time being run, after the ones already there (an action that adds one for
        an earlier time, which none should, sees it run once the time being run is done)."""
        times, due = self._times, self._due
        while times and times[0] <= now:
            when = heapq.heappop(times)
            actions = due[when]
            i = 0
            while i < len(actions):  # an action may add more for this time
                actions[i]()
                i += 1
            del due[when]


class VirtualClock:
    """The scheduler's clock in a simulation: moved only by the event queue."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StageStats:
    """What the simulation observed of one stage."""

    kind: str
    units: int = 0
    admitted: int = 0
    running: int = 0
    peak: int = 0
    finished: float | None = None
    requeues: int = 0
    preemptions: Counter[str] = field(default_factory=Counter)
    unit_label: str = "unit"
    shape: Resources = field(default_factory=Resources)


@dataclass
class Simulation:
    """Runs a plan's stages in dependency order in virtual time, each by its kind's hook."""

    plan: Plan
    needs: Mapping[str, list[str]]
    unit_seconds: float
    kinds: Mapping[str, StageKind] | None = None
    measured: Measured | None = None
    clock: VirtualClock = field(default_factory=VirtualClock)
    scheduler: Scheduler = field(init=False)
    stats: dict[str, StageStats] = field(default_factory=dict)
    # virtual times of the first unit's start and the last unit's end
    first_start: float | None = None
    last_end: float = 0.0
    _events: Events = field(default_factory=Events)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _on_grant: dict[Ticket, Callable[[Grant], None]] = field(default_factory=dict)
    _busy: Resources = field(default_factory=Resources)
    _last: float = 0.0
    _pending: set[str] = field(default_factory=set)
    # a small plan's units as they start: (virtual time, order of telling, stage/unit)
    shown_starts: bool = field(init=False)
    _starts: list[tuple[float, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        units = sum(len(s.units or []) for s in self.plan.stages.values())
        self.shown_starts = units <= SHOWN_STARTS
        self.scheduler = Scheduler(
            list(self.plan.cluster.nodes), clock=self.clock, metrics=Metrics(collectors=False)
        )
        if self.kinds is None:
            from runner.stages.registry import KINDS

            self.kinds = KINDS

    # the event loop

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._events.add(when, action)

    def submit(
        self,
        owner: str,
        request: Request,
        then: Callable[[Grant], None],
        on_preempt: Notify | None = None,
    ) -> Ticket:
        """Queue a request with the scheduler as the executor does (`Executor.submit`); `then`
        is called with the grant once it is admitted."""
        (ticket,) = self.scheduler.submit(request, (owner,), on_preempt)
        self._on_grant[ticket] = then
        return ticket

    def submit_all(
        self, owners: Sequence[str], request: Request, thens: Sequence[Callable[[Grant], None]]
    ) -> None:
        """`submit` for many owners of one request that nobody preempts (a stage's units that
        ask alike), `thens[i]` told when `owners[i]` is granted: one batch for the scheduler,
        not a call each."""
        tickets = self.scheduler.submit(request, owners)
        self._on_grant.update(zip(tickets, thens, strict=True))

    def forget(self, ticket: Ticket) -> bool:
        """Withdraw a waiting request; False when it was already granted."""
        if self._on_grant.pop(ticket, None) is None:
            return False
        self.scheduler.withdraw(ticket)
        return True

    def run(self) -> None:
        """Until no event is left. Python's cyclic garbage collector is off meanwhile: a big
        simulation makes millions of short-lived objects, and each collection walks every
        object of the plan again (a quarter of the time, measured); the cycles are collected
        once at the end."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._pending = set(self.plan.stages)
            self._start_ready()
            self._admit()
            while self._events:
                now = self._events.next_time()
                self._account(now)
                self._events.run_until(now)
                self._admit()
        finally:
            if collecting:
                gc.enable()

    def _admit(self) -> None:
        """Admit until nothing moves: a grant's follow-up may ask for more (arrivals)."""
        admit, then = self.scheduler.admit, self._on_grant.pop
        while granted := admit():
            for ticket in granted:
                assert ticket.grant is not None
                then(ticket)(ticket.grant)

    def _account(self, now: float) -> None:
        """Integrate the resources in use over the time that just passed."""
        if now > self._last:
            used = self.plan.cluster.total - self.scheduler.free()
            self._busy = self._busy + used.scale(now - self._last)
        self._last = self.clock.now = now

    def stage_done(self, name: str) -> None:
        self.stats[name].finished = self.clock.now
        self._start_ready()

    def _start_ready(self) -> None:
        finished = {n for n, s in self.stats.items() if s.finished is not None}
        assert self.kinds is not None
        for name in sorted(self._pending):
            if set(self.needs.get(name, [])) <= finished:
                self._pending.discard(name)
                stage = self.plan.stages[name]
                self.kinds[stage.kind].simulate(stage, self).start()

    # what units take

    def measure_of(self, stage: str) -> StageMeasure | None:
        return self.measured.stage(stage) if self.measured is not None else None

    def duration(self, stage: str, unit: str | None, declared: float | None = None) -> float:
        """A unit's time: as measured (the stage's mean for a unit the measured run lacks),
        else as declared, else `sim_unit_seconds`."""
        m = self.measure_of(stage)
        if m is not None and m.mean is not None:
            return m.durations.get(unit or "", m.mean)
        return declared if declared is not None else self.unit_seconds

    def latency(self, stage: str, unit: str | None = None, attempt: int = 0) -> float:
        """Seconds from a grant to its unit's start (a process or actor starting): as measured
        for that attempt of the unit, else the stage's mean; without a measured run, none."""
        m = self.measure_of(stage)
        if m is None:
            return 0.0
        each = m.latencies.get(unit or "")
        return each[attempt] if each and attempt < len(each) else m.latency

    def starts(self, stage: str, unit: str | None, at: float) -> None:
        """A unit starts at `at` (a small run's report lists them in order)."""
        if self.shown_starts and unit is not None:
            self._starts.append((at, next(self._seq), f"{stage}/{unit}"))

    def started_in_order(self) -> list[str]:
        return [name for _, _, name in sorted(self._starts)]

    def ran(self, start: float, end: float) -> None:
        """A unit ran from `start` to `end` (for the makespan)."""
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = max(self.last_end, end)

    # the numbers

    def makespan(self) -> float:
        """From the first unit's start to the last unit's end, as a measured run counts it."""
        return self.last_end - (self.first_start or 0.0)

    def utilization(self) -> dict[str, float | None]:
        total, span = self.plan.cluster.total, self._last
        return {
            "cpu": self._busy.cpus / (total.cpus * span) if total.cpus and span else None,
            "gpu": self._busy.gpus / (total.gpus * span) if total.gpus and span else None,
        }


@dataclass
class SimStage:
    """A stage in a simulation: a kind's `simulate` hook returns one; `start` asks for what
    its units need."""

    sim: Simulation
    stage: StagePlan

    def start(self) -> None:
        raise NotImplementedError

    @property
    def st(self) -> StageStats:
        return self.sim.stats[self.stage.name]

    def granted(self) -> None:
        st = self.st
        st.admitted += 1
        st.running += 1
        st.peak = max(st.peak, st.running)

    def ended(self, grant: Grant) -> None:
        self.st.running -= 1
        self.sim.scheduler.release(grant)


@dataclass
class SimUnits(SimStage):
    """Units that each hold their own lease for their time (jobs, shards): the kind's `ask`
    for each unit, a start-up latency after the grant, then the unit's duration."""

    ask: Callable[[Unit], Request] = field(default=lambda u: Request(Resources()))
    label: str = "unit"
    # at most this many asked for or running at once (a stage's `max_concurrent`)
    cap: int | None = None
    live: int = 0
    _queue: list[tuple[Unit, Request]] = field(default_factory=list)

    def start(self) -> None:
        units = self.stage.to_run
        asks = [self.ask(u) for u in units]
        shape = asks[0].resources if asks else Resources()
        self.sim.stats[self.stage.name] = StageStats(
            self.stage.kind, len(units), unit_label=self.label, shape=shape
        )
        self.live = len(units)
        if not units:
            self.sim.stage_done(self.stage.name)
        # highest priority first, as the kinds queue them (popped from the end); one priority
        # (the usual) needs no sort, which would call its key once a unit
        ordered = list(zip(units, asks, strict=True))
        if len({a.priority for a in asks}) > 1:
            ordered.sort(key=lambda ua: -ua[1].priority)
        self._queue = ordered[::-1]
        self._ask(len(units) if self.cap is None else self.cap)

    def _ask(self, n: int) -> None:
        """The next `n` units ask, the runs that share an ask (most: `ask` may give units that
        ask alike one object) as one batch each."""
        queue, name = self._queue, self.stage.name
        taken = [queue.pop() for _ in range(min(n, len(queue)))]
        for ask, run in itertools.groupby(taken, key=itemgetter(1)):
            ids = [unit.id for unit, _ in run]
            self.sim.submit_all([f"{name}/{i}" for i in ids], ask, [_Hold(self, i) for i in ids])

    def end(self, grant: Grant) -> None:
        self.ended(grant)
        self.live -= 1
        if self.live == 0:
            self.sim.stage_done(self.stage.name)
        elif self.cap is not None:
            self._ask(1)


@dataclass(eq=False, slots=True)
class _Hold:
    """A granted unit of `SimUnits`: starts after the latency, ends after its duration."""

    run: SimUnits
    unit: str
    grant: Grant | None = None

    def __call__(self, grant: Grant) -> None:
        run, sim = self.run, self.run.sim
        run.granted()
        self.grant = grant
        start = sim.clock.now + sim.latency(run.stage.name, self.unit)
        end = start + sim.duration(run.stage.name, self.unit)
        sim.starts(run.stage.name, self.unit, start)
        sim.ran(start, end)
        sim.at(end, self.done)

    def done(self) -> None:
        assert self.grant is not None
        self.run.end(self.grant)


# --- running and reporting -----------------------------------------------------------------


def simulate(
    spec: Spec,
    planners: Mapping[str, StagePlanner],
    cluster: Any,
    kinds: Mapping[str, StageKind] | None = None,
) -> dict[str, Any]:
    """Plan for the simulated cluster (every unit runs: no ledger) and run it in virtual time."""
    started = time.perf_counter()
    source = spec.cluster.sim_durations_from
    measured = measure(Path(source)) if source else None
    plan = make_plan(spec.pipeline, planners, cluster, None, True)
    needs = {n: list(s.needs) for n, s in spec.pipeline.stages.items()}
    sim = Simulation(plan, needs, spec.cluster.sim_unit_seconds, kinds, measured)
    sim.run()
    return summarize(sim, time.perf_counter() - started)


def summarize(sim: Simulation, wall: float) -> dict[str, Any]:
    """The totals a real run's summary carries, for the simulated run."""
    waited = {
        f"{p:g}": {"units": int(n), "mean_s": round(total / n, 3) if n else 0.0}
        for p, (n, total) in sorted(sim.scheduler.metrics.waited_by_priority.items())
    }
    return {
        "pipeline": sim.plan.pipeline,
        "cluster": sim.plan.cluster.where,
        "virtual_s": round(sim._last, 3),
        "makespan_s": round(sim.makespan(), 3),
        "measured_makespan_s": (
            None
            if sim.measured is None or sim.measured.makespan is None
            else round(sim.measured.makespan, 3)
        ),
        "wall_s": round(wall, 3),
        "utilization": sim.utilization(),
        "started_in_order": sim.started_in_order(),
        "waiting_s_by_priority": waited,
        "stages": {
            name: {
                "kind": st.kind,
                "units": st.units,
                "admitted": st.admitted,
                "peak_at_once": st.peak,
                "unit": st.unit_label,
                "shape": st.shape.describe(),
                "preemptions": {k: st.preemptions[k] for k in REASONS},
                "requeues": st.requeues,
                "finished_at_s": st.finished,
            }
            for name, st in sim.stats.items()
        },
    }


def format_report(summary: dict[str, Any]) -> str:
    """What the simulated run did, in the words of a real run's summary."""
    lines = [f"simulated run of '{summary['pipeline']}' on {summary['cluster']}", ""]
    for name, s in summary["stages"].items():
        pre = ", ".join(f"{k} {v}" for k, v in s["preemptions"].items())
        at_once = f"{s['peak_at_once']} ran at once"
        if s["kind"] == "pool":
            at_once += f" ({s['shape']} each)"
        lines.append(
            f"stage {name} ({s['kind']}): {s['units']} {s['unit']}(s), {s['admitted']} admitted, "
            f"{at_once}; preemptions: {pre}; requeues {s['requeues']}"
        )
    waits = "; ".join(
        f"priority {p}: {w['units']} admitted, mean wait {w['mean_s']:g}s"
        for p, w in summary["waiting_s_by_priority"].items()
    )
    lines.append(f"waiting time by priority: {waits}")
    util = summary["utilization"]
    parts = [f"{k.upper()} {100 * v:.0f}%" for k, v in util.items() if v is not None]
    lines.append(f"utilization: {', '.join(parts)} over {summary['virtual_s']:g} virtual seconds")
    span = f"makespan from the first unit's start: {summary['makespan_s']:g} virtual seconds"
    if summary["measured_makespan_s"] is not None:
        span += f" (the measured run: {summary['measured_makespan_s']:g}s)"
    lines.append(span)
    if summary["started_in_order"]:
        lines.append(f"units in the order they started: {', '.join(summary['started_in_order'])}")
    lines.append(f"simulated in {summary['wall_s']:.2f}s")
    return "\n".join(lines)
