"""Run a plan: the executor under signal handling, then the summary and the timeline.

The executor (executor.py) runs every stage in one loop on this thread and looks at the stop
event at least every 0.1 s, so SIGINT/SIGTERM are handled at once: admit nothing new, stop
what runs with its grace, record it, exit 130 / 143.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

from runner import report, warm
from runner.backends.ray import RayBackend
from runner.errors import Interrupted
from runner.executor import Executor
from runner.kind import RunContext, StageKind, StageOutcome
from runner.plan import Plan
from runner.progress import Progress
from runner.scheduler import Scheduler
from runner.spec import Pipeline
from runner.store import SUMMARY, Ledger, RunStore, write_json

log = logging.getLogger(__name__)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into `stop`; a second one ends the process at once."""
    caught: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        stop.set()
        log.warning(
            "%s: stopping: cancelling running units (again to force)", signal.Signals(signum).name
        )

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def execute(
    plan: Plan,
    pipeline: Pipeline,
    kinds: Mapping[str, StageKind],
    store: RunStore,
    ledger: Ledger,
    progress_mode: str,
    fresh: bool,
) -> tuple[int, dict[str, Any]]:
    """Run the plan; return (exit code, summary) and write `summary.json`."""
    stop = threading.Event()
    tables = any(kinds[stage.kind].shared_leases for stage in plan.stages.values())
    warm.start(warm.PICTURE + (warm.RESULTS if tables else ()))
    backend = RayBackend(store.root, plan.cluster.shared_fs, stop)
    scheduler = Scheduler(list(plan.cluster.nodes), clock=backend.clock)
    progress = Progress(progress_mode)
    ctx = RunContext(
        store, ledger, plan.cluster, stop, progress, backend.clock, backend.wall, fresh=fresh
    )
    started = time.monotonic()
    # a ledger that cannot be written (full disk, read-only directory) stops the run
    ledger.on_failure = stop.set
    run_started = ledger.start_run()
    with stop_on_signals(stop) as caught:
        try:
            outcomes = Executor(plan, pipeline, kinds, ctx, scheduler, backend).run()
        finally:
            progress.close()
    if ledger.failure is not None:
        raise ledger.failure
    summary = make_summary(plan, outcomes, time.monotonic() - started)
    code = 128 + caught[0] if caught else 0 if all(o.ok for o in outcomes.values()) else 1
    ledger.end_run(run_started, code)  # before the report, which shows it
    summary.update(
        report.write_run_artifacts(ledger, f"{plan.pipeline} {store.root}", store.root, plan)
    )
    write_json(store.root / SUMMARY, summary)
    if caught:
        raise Interrupted(caught[0])
    return code, summary


def make_summary(plan: Plan, outcomes: Mapping[str, StageOutcome], wall: float) -> dict[str, Any]:
    """Per-stage counts, wall time and CPU utilization (CPU seconds / (wall × cluster CPUs))."""
    cpus = plan.cluster.total.cpus
    stages = {}
    for name, o in outcomes.items():
        stages[name] = {
            "kind": o.kind,
            "ok": o.ok,
            "total": o.total,
            "done": o.done,
            "failed": o.failed,
            "timeout": o.timeout,
            "cancelled": o.cancelled,
            "skipped": o.skipped,
            "wall_s": round(o.wall, 3),
            "cpu_s": round(o.cpu_seconds, 3),
            "cpu_utilization": round(o.cpu_seconds / (o.wall * cpus), 3) if o.wall else None,
            "message": o.message,
            "outputs": o.outputs,
            **o.extra,
        }
    total_cpu = sum(o.cpu_seconds for o in outcomes.values())
    return {
        "pipeline": plan.pipeline,
        "ok": all(o.ok for o in outcomes.values()) and len(outcomes) == len(plan.stages),
        "wall_s": round(wall, 3),
        "cluster_cpus": cpus,
        "cpu_utilization": round(total_cpu / (wall * cpus), 3) if wall and cpus else None,
        "stages": stages,
    }
