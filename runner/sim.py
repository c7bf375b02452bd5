"""The simulated cluster (`cluster=sim`): the same plan, through the same unit loop, scheduler
and kind code as a real run, on the virtual backend, so behaviour at hundreds of nodes can be
checked on a laptop and cannot drift from a real run.

Nothing starts and nothing is written: units take the time a previous run measured
(`cluster.sim_durations_from=RUN_DIR`, see `runner.measured`), else what their spec declares,
else `cluster.sim_unit_seconds`. The report gives what a real run's summary does (units
admitted, how many ran at once, preemptions by reason, waiting time by priority, utilization)
and the makespan from the first unit's start, beside the measured run's.
"""

from __future__ import annotations

import gc
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner import scratch
from runner.backends.virtual import VirtualBackend
from runner.cluster import ClusterInfo
from runner.executor import Executor
from runner.kind import RunContext, StageKind, StageOutcome
from runner.lease import Lease
from runner.measured import Measured, measure
from runner.plan import Plan, make_plan
from runner.progress import Progress
from runner.scheduler.core import Scheduler
from runner.scheduler.metrics import Metrics
from runner.scheduler.policy import REASONS
from runner.spec import Pipeline, Spec
from runner.store import RunStore


@dataclass
class SimStage:
    """What the simulated run did of one stage (a line of the report)."""

    kind: str
    units: int
    admitted: int
    peak: int
    noun: str
    shape: str
    preemptions: dict[str, int]
    requeues: int
    # its units share leases (a pool's workers): the report gives a lease's shape
    shared_leases: bool


def simulate(spec: Spec, kinds: Mapping[str, StageKind], cluster: ClusterInfo) -> dict[str, object]:
    """Plan for the simulated cluster (every unit runs: no ledger) and run it in virtual time
    (`run_plan`); the report's summary."""
    started = time.perf_counter()
    source = spec.cluster.sim_durations_from
    measured = measure(Path(source)) if source else None
    planners = {k: v.plan for k, v in kinds.items()}
    plan = make_plan(spec.pipeline, planners, cluster, None, True)
    run = run_plan(plan, spec.pipeline, kinds, cluster, measured, spec.cluster.sim_unit_seconds)
    return run.summary(time.perf_counter() - started)


@dataclass
class SimRun:
    """A plan run in virtual time: what the loop, the scheduler and the clock were left with."""

    plan: Plan
    cluster: ClusterInfo
    kinds: Mapping[str, StageKind]
    measured: Measured | None
    executor: Executor
    scheduler: Scheduler
    outcomes: dict[str, StageOutcome]
    span: float

    def summary(self, wall_s: float) -> dict[str, object]:
        """What the report says (`format_report`), `wall_s` the seconds it took."""
        stages = {n: _stage(o, self.kinds) for n, o in self.outcomes.items()}
        total, span, measured = self.cluster.total, self.span, self.measured
        busy = self.executor.busy
        waited = {
            f"{p:g}": {"units": int(n), "mean_s": round(t / n, 3) if n else 0.0}
            for p, (n, t) in sorted(self.scheduler.metrics.waited_by_priority.items())
        }
        return {
            "pipeline": self.plan.pipeline,
            "cluster": self.cluster.where,
            "virtual_s": round(span, 3),
            "makespan_s": round(self.executor.makespan(), 3),
            "measured_makespan_s": (
                None
                if measured is None or measured.makespan is None
                else round(measured.makespan, 3)
            ),
            "wall_s": round(wall_s, 3),
            "utilization": {
                "cpu": busy.cpus / (total.cpus * span) if total.cpus and span else None,
                "gpu": busy.gpus / (total.gpus * span) if total.gpus and span else None,
            },
            "started_in_order": self.executor.starts or [],
            "waiting_s_by_priority": waited,
            "ok": all(o.ok for o in self.outcomes.values()),
            "problems": [f"{n}: {o.message}" for n, o in self.outcomes.items() if not o.ok],
            "stages": {n: s.__dict__ for n, s in stages.items()},
        }


def run_plan(
    plan: Plan,
    pipeline: Pipeline,
    kinds: Mapping[str, StageKind],
    cluster: ClusterInfo,
    measured: Measured | None = None,
    unit_seconds: float = 1.0,
) -> SimRun:
    """Run a plan made for the simulated cluster in virtual time: the real unit loop and
    scheduler on the virtual backend (a benchmark times this alone, on a plan made once).

    Python's cyclic garbage collector is off meanwhile: a big simulation makes millions of
    short-lived objects, and each collection walks every object of the plan again. At the end
    the survivors are frozen before the collector is on again, then unfrozen into the oldest
    generation: otherwise the first allocation after `gc.enable()` walks them all at once
    (about a second at 100k units), and their cycles wait for the next full collection."""
    backend = VirtualBackend(LatencyOf(measured))
    scheduler = Scheduler(list(cluster.nodes), clock=backend.clock, metrics=Metrics(False))
    collecting = gc.isenabled()
    gc.disable()
    try:
        with tempfile.TemporaryDirectory(prefix="sim-", dir=scratch.folder()) as folder:
            store = RunStore(Path(folder))
            ledger = store.open()
            ctx = RunContext(
                store,
                ledger,
                cluster,
                threading.Event(),
                Progress("off"),
                backend.clock,
                backend.wall,
                fresh=True,
                virtual=True,
                measured=measured,
                unit_seconds=unit_seconds,
            )
            executor = Executor(plan, pipeline, kinds, ctx, scheduler, backend)
            outcomes = executor.run()
            store.close()
    finally:
        if collecting:
            _enable_collector()
    return SimRun(plan, cluster, kinds, measured, executor, scheduler, outcomes, backend.now)


def _enable_collector() -> None:
    """`gc.enable()`, with the run's survivors moved to the oldest generation first (frozen,
    then unfrozen). What the process froze itself (the `runner` command's imports) goes back
    to the collector with them: at worst a full collection walks it again, where keeping the
    survivors frozen would keep their cycles for the process's life (a sweep of simulations
    runs many in one process)."""
    gc.freeze()
    gc.enable()
    gc.unfreeze()


def _stage(outcome: StageOutcome, kinds: Mapping[str, StageKind]) -> SimStage:
    kind = kinds[outcome.kind]
    preempted = outcome.preempted
    return SimStage(
        outcome.kind,
        outcome.asked if kind.shared_leases else outcome.total,
        outcome.leases,
        outcome.peak,
        kind.noun,
        outcome.shape,
        {k: int(preempted.get(k, 0)) for k in REASONS},
        outcome.requeues,
        kind.shared_leases,
    )


class LatencyOf:
    """Each lease's start-up latency in virtual time (from its grant to its process's start):
    what the measured run saw for that unit's attempt, else its stage's mean; none without a
    measured run."""

    def __init__(self, measured: Measured | None) -> None:
        self.measured = measured

    def __call__(self, lease: Lease) -> float:
        if self.measured is None:
            return 0.0
        m = self.measured.stage(lease.run.name)
        if len(lease.work) == 1:
            work = lease.work[0]
            each = m.latencies.get(work.id)
            if each and work.attempts < len(each):
                return float(each[work.attempts])
        return m.latency


def format_report(summary: Mapping[str, object]) -> str:
    """What the simulated run did, in the words of a real run's summary."""
    stages = summary["stages"]
    assert isinstance(stages, dict)
    lines = [f"simulated run of '{summary['pipeline']}' on {summary['cluster']}", ""]
    for name, s in stages.items():
        pre = ", ".join(f"{k} {v}" for k, v in s["preemptions"].items())
        at_once = f"{s['peak']} ran at once"
        if s["shared_leases"]:
            at_once += f" ({s['shape']} each)"
        lines.append(
            f"stage {name} ({s['kind']}): {s['units']} {s['noun']}(s), {s['admitted']} admitted, "
            f"{at_once}; preemptions: {pre}; requeues {s['requeues']}"
        )
    waited = summary["waiting_s_by_priority"]
    assert isinstance(waited, dict)
    waits = "; ".join(
        f"priority {p}: {w['units']} admitted, mean wait {w['mean_s']:g}s"
        for p, w in waited.items()
    )
    lines.append(f"waiting time by priority: {waits}")
    util = summary["utilization"]
    assert isinstance(util, dict)
    parts = [f"{k.upper()} {100 * v:.0f}%" for k, v in util.items() if v is not None]
    lines.append(f"utilization: {', '.join(parts)} over {summary['virtual_s']:g} virtual seconds")
    span = f"makespan from the first unit's start: {summary['makespan_s']:g} virtual seconds"
    if summary["measured_makespan_s"] is not None:
        span += f" (the measured run: {summary['measured_makespan_s']:g}s)"
    lines.append(span)
    started = summary["started_in_order"]
    if started:
        assert isinstance(started, list)
        lines.append(f"units in the order they started: {', '.join(started)}")
    problems = summary["problems"]
    assert isinstance(problems, list)
    lines += [f"problem: {p}" for p in problems]
    lines.append(f"simulated in {summary['wall_s']:.2f}s")
    return "\n".join(lines)
