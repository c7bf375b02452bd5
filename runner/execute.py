"""Run a plan: the executor under signal handling, then (`Executed.finish`) the summary and
the pictures.

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
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from runner import history, planfile, report, warm
from runner.backend import Backend
from runner.backends.idle import IdleBackend
from runner.backends.ray import RayBackend
from runner.cluster import RayNode, lost
from runner.errors import Interrupted
from runner.executor import Executor
from runner.kind import RunContext, StageKind
from runner.plan import Plan, launches_nothing
from runner.progress import Progress
from runner.scheduler import Scheduler
from runner.spec import Pipeline
from runner.store import SUMMARY, Ledger, RunStore, write_json

log = logging.getLogger(__name__)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into `stop`; a second one ends the process at once.
    Yields the signals caught (the first decides the exit code)."""
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


@dataclass
class Sharing:
    """A run that is one job of a sweep, side by side with the others in this process
    (`runner.launcher`): one scheduler admits every unit of every job, over the nodes as the
    jobs' loops follow them; the sweep handles the signals, stops each job through `stop` and
    notes the signal in `caught` (shared by all its jobs)."""

    scheduler: Scheduler
    nodes: list[RayNode]
    caught: list[int]
    stop: threading.Event = field(default_factory=threading.Event)
    # put before each progress line: the job's overrides
    label: str = ""


@dataclass
class Executed:
    """A run that has ended, with its report still to write (`finish`): the `runner` command
    writes it while the embedded Ray shuts down, which takes as long as a big run's picture."""

    code: int
    # of the whole run: every attempt of the run directory (`history`)
    summary: dict[str, Any]
    # the signal that stopped the run, if one did
    caught: int | None
    plan: Plan
    store: RunStore
    ledger: Ledger
    # the plan is recorded for the report (else the last attempt's, which ran something, is kept)
    record_plan: bool
    # whether any stage started (a signal while Ray started stops the run before one does)
    ran: bool = True

    def finish(self) -> tuple[int, dict[str, Any]]:
        """Write the run's timeline, trace and report, then `summary.json` naming them; the
        exit code and the summary (Interrupted where a signal stopped the run)."""
        root = self.store.root
        title = f"{self.plan.pipeline} {root}"
        plan = self.plan if self.record_plan else None
        self.summary.update(report.write_run_artifacts(self.ledger, title, root, plan))
        write_json(root / SUMMARY, self.summary)
        if self.caught is not None:
            raise Interrupted(self.caught, self._kept() if self.ran else "before any unit started")
        return self.code, self.summary

    def _kept(self) -> str:
        """What a user needs after Ctrl-C: that the finished units are kept, and how to
        resume (the whole run's units done, every attempt's)."""
        stages = self.summary.get("stages", {})
        done = sum(int(s.get("done", 0)) for s in stages.values() if isinstance(s, dict))
        return (
            f"running units were cancelled; the {done} unit(s) done are kept in "
            f"{self.store.root}: run the same command again to resume"
        )


def execute(
    plan: Plan,
    pipeline: Pipeline,
    kinds: Mapping[str, StageKind],
    store: RunStore,
    ledger: Ledger,
    progress_mode: str,
    fresh: bool,
    stop: threading.Event,
    caught: list[int],
    sharing: Sharing | None = None,
) -> Executed:
    """Run the plan and record its end in the ledger; the report is left to `finish`. The
    run stops once `stop` is set; `caught` holds the signal that set it (`stop_on_signals`,
    installed by the caller before Ray started: a signal during its start stops the run
    before any unit starts)."""
    tables = any(kinds[stage.kind].shared_leases for stage in plan.stages.values())
    warm.start(warm.PICTURE + (warm.RESULTS if tables else ()))
    backend: Backend = (
        IdleBackend(stop)
        if launches_nothing(plan)
        else RayBackend(store.root, plan.cluster.shared_fs, stop)
    )
    if sharing is None:
        scheduler = Scheduler(list(plan.cluster.nodes), clock=backend.clock)
        progress = Progress(progress_mode)
    else:  # several jobs' lines mix: periodic lines, each named by its job
        scheduler = sharing.scheduler
        progress = Progress("off" if progress_mode == "off" else "log", label=sharing.label)
    ctx = RunContext(
        store, ledger, plan.cluster, stop, progress, backend.clock, backend.wall, fresh=fresh
    )
    if sharing is not None:
        ctx.nodes = sharing.nodes
    started = time.monotonic()
    # a ledger that cannot be written (full disk, read-only directory) stops the run
    ledger.on_failure = stop.set
    run_started = ledger.start_run()
    try:
        executor = Executor(plan, pipeline, kinds, ctx, scheduler, backend, sharing is not None)
        outcomes = executor.run()
    finally:
        progress.close()
    if ledger.failure is not None:
        raise ledger.failure
    gone = lost()
    if gone is not None:  # the cluster went away: nothing more to ask it, one message
        raise gone
    attempt = history.attempt_summary(
        plan, outcomes, time.monotonic() - started, ledger, run_started
    )
    code = 128 + caught[0] if caught else 0 if all(o.ok for o in outcomes.values()) else 1
    ledger.end_run(run_started, code, attempt)  # before the report, which shows it
    # an attempt that ran nothing keeps the plan of the one that did (the report shows it)
    keep = not history.ran_something(attempt) and (store.root / planfile.PLAN_FILE).exists()
    signal_ = caught[0] if caught else None
    # no stage started: stopped while Ray started
    ran = any(o.started for o in outcomes.values())
    return Executed(code, history.whole_run(ledger), signal_, plan, store, ledger, not keep, ran)
