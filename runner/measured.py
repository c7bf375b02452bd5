"""What a finished run measured, for the simulator (`cluster.sim_durations_from=RUN_DIR`).

Made-up durations make a simulated run a guess; a previous run's ledger has every unit's start
and end, so the simulator can replay the same work at the speed it really ran and predict a
bigger run from a small one. Read here, per stage:

- each unit's duration (end - start), attempts, and whether it overran its step timeout;
  units the ledger lacks take the stage's mean;
- the start-up latency: the mean time from a lease's grant to its process's start (Ray
  starting a worker process or an actor; the executor keeps it in the stage's summary, and
  each attempt's by unit), paid by each lease before its unit runs;
- the worker time per unit time (`scale`), read by kinds whose units share a worker (a
  pool's items travel in batches with a round trip per batch, and may run on several threads
  of a worker, which items' own times do not show);
- the run's makespan, from the first start of any unit's attempt (an attempt that ended early,
  preempted or retried, is in the events) to the last unit's end (Ray's start-up excluded),
  which the simulated run is to predict.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import SpecError
from runner.lifecycle import UnitState
from runner.store import Ledger, StageRow, read_ledger

# units that ran to an end of their own (a cancelled one tells nothing of its time)
_ENDED = (UnitState.done, UnitState.failed, UnitState.timeout, UnitState.out_of_memory)


@dataclass
class StageMeasure:
    """One stage of a measured run."""

    durations: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    # units that overran their step timeout (a pool then replaces the worker)
    timed_out: set[str] = field(default_factory=set)
    mean: float | None = None
    latency: float = 0.0
    # each attempt's start-up latency, by unit, where the run kept them
    latencies: dict[str, list[float]] = field(default_factory=dict)
    # worker time per unit time (1 where each unit held a worker of its own)
    scale: float = 1.0


@dataclass
class Measured:
    """A measured run: its stages, and its makespan from the first unit's start."""

    stages: dict[str, StageMeasure]
    makespan: float | None

    def stage(self, name: str) -> StageMeasure:
        return self.stages.get(name) or StageMeasure()


def measure(run_dir: Path) -> Measured:
    """Read a run directory's ledger; exit 2 (a spec error) when it has none."""
    ledger = read_ledger(run_dir)
    if ledger is None:
        raise SpecError(
            [
                f"cluster.sim_durations_from: = {str(run_dir)!r}: no ledger there (a run directory "
                "of a finished run is expected)"
            ]
        )
    try:
        stages: dict[str, StageMeasure] = {}
        first, last = float("inf"), float("-inf")
        for record in ledger.stages():
            measured = _measure_stage(ledger, record)
            if measured is None:
                continue
            stages[str(record["stage"])], (began, ended) = measured
            first, last = min(first, began), max(last, ended)
        first = min(first, _first_attempt(ledger))
    finally:
        ledger.close()
    return Measured(stages, last - first if stages else None)


def _measure_stage(
    ledger: Ledger, record: StageRow
) -> tuple[StageMeasure, tuple[float, float]] | None:
    """One stage's measure and the span of its units (first start, last end); None when no
    unit of it ran to an end of its own."""
    rows = [
        r
        for r in ledger.rows(str(record["stage"]))
        if r.state in _ENDED and r.started is not None and r.ended is not None
    ]
    if not rows:
        return None
    m = StageMeasure()
    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    first, last = float("inf"), float("-inf")
    for r in rows:
        assert r.started is not None and r.ended is not None
        m.durations[r.unit] = max(0.0, r.ended - r.started)
        m.attempts[r.unit] = r.attempts
        if r.state is UnitState.timeout:
            m.timed_out.add(r.unit)
        by_worker[r.worker or r.unit].append((r.started, r.ended))
        first, last = min(first, r.started), max(last, r.ended)
    m.mean = sum(m.durations.values()) / len(m.durations)
    summary = json.loads(record["summary"] or "{}")
    began = record.get("started")
    if isinstance(summary.get("start_latency"), int | float):
        m.latency = float(summary["start_latency"])
        m.latencies = dict(summary.get("start_latencies") or {})
    elif isinstance(began, int | float):  # an older ledger: the stage's first start
        m.latency = max(0.0, first - float(began))
    m.scale = _worker_scale(by_worker, sum(m.durations.values()))
    return m, (first, last)


def _first_attempt(ledger: Ledger) -> float:
    """The first start of an attempt in the ledger's last run (inf when none): a unit's row
    holds its last attempt, and one that ended early (preempted, retried) started before it,
    and the run with it."""
    run = ledger.last_run()
    since = float(run["started"]) if run else 0.0
    first = float("inf")
    for event in ledger.events():
        attempt_start = event["started"]
        if event["kind"] == "attempt" and attempt_start is not None and event["time"] >= since:
            first = min(first, float(attempt_start))
    return first


def _worker_scale(by_worker: dict[str, list[tuple[float, float]]], item_time: float) -> float:
    """Worker time per unit time: the span each worker was busy (first unit's start to last
    unit's end), summed, over the units' own times summed. Above 1 where batches' round trips
    cost; below 1 where a worker ran units on several threads at once. A simulated worker that
    many units share (a pool's) runs them one after another for their time times this; a kind
    whose units each hold their own lease does not read it."""
    busy = sum(max(e for _, e in spans) - min(s for s, _ in spans) for spans in by_worker.values())
    return busy / item_time if item_time > 0 and busy > 0 else 1.0
