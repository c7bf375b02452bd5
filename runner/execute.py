"""Drive a plan: stages in dependency order (independent ones at once), signals, the summary.

Each ready stage runs on its own thread and competes for resources through the one scheduler.
The main thread only waits, so SIGINT/SIGTERM are handled at once: the stop event tells every
stage to admit nothing new and cancel what runs; the run then exits 130 / 143.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from types import FrameType
from typing import Any

from runner import report
from runner.errors import Interrupted
from runner.plan import Plan, PlanContext, StagePlan
from runner.progress import Progress
from runner.scheduler import Scheduler
from runner.spec import Pipeline
from runner.stages.base import RunContext, StageKind, StageOutcome
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


class Executor:
    """Runs the stages of a plan on threads, in dependency order."""

    def __init__(
        self,
        plan: Plan,
        pipeline: Pipeline,
        kinds: Mapping[str, StageKind],
        ctx: RunContext,
        fresh: bool,
    ) -> None:
        self.plan, self.pipeline, self.kinds, self.ctx = plan, pipeline, kinds, ctx
        self.fresh = fresh
        self.outcomes: dict[str, StageOutcome] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()

    def run(self) -> dict[str, StageOutcome]:
        pending = list(self.plan.stages)
        while pending or self.threads:
            for name in list(pending):
                if self.ctx.stop.is_set():
                    pending.remove(name)
                    continue
                needs = self.pipeline.stages[name].needs
                if any(n in pending or n in self.threads for n in needs):
                    continue
                pending.remove(name)
                failed = [n for n in needs if not self.outcomes[n].ok]
                if failed:
                    self._blocked(name, failed)
                else:
                    self._start(name)
            for name, thread in list(self.threads.items()):
                thread.join(timeout=0.05)
                if not thread.is_alive():
                    del self.threads[name]
        return self.outcomes

    def _start(self, name: str) -> None:
        stage = self.plan.stages[name]
        if stage.units is None:
            stage = self._replan(name)
        thread = threading.Thread(target=self._run_stage, args=(stage,), name=f"stage-{name}")
        self.threads[name] = thread
        thread.start()

    def _replan(self, name: str) -> StagePlan:
        spec = self.pipeline.stages[name]
        upstream = {n: self.plan.stages[n] for n in spec.needs}
        ctx = PlanContext(self.plan.cluster, self.ctx.ledger, self.fresh, upstream)
        stage = self.kinds[spec.kind].plan(name, spec, self.pipeline.raw[name], ctx)
        self.plan.stages[name] = stage
        return stage

    def _run_stage(self, stage: StagePlan) -> None:
        ledger = self.ctx.ledger
        record = ledger.stage(stage.name)
        started = time.time()
        ledger.save_stage(
            stage.name,
            stage.kind,
            stage.fingerprint,
            record.config if record else stage.config,
            "running",
            started,
        )
        for note in stage.notes:
            log.info(note)
        try:
            outcome = self.kinds[stage.kind].run(stage, self.ctx)
        except Exception as exc:
            log.exception("stage %s crashed", stage.name)
            outcome = StageOutcome(stage.name, stage.kind, ok=False, message=f"crashed: {exc!r}")
        state = "interrupted" if outcome.interrupted else "done" if outcome.ok else "failed"
        # the config is recorded only once the stage has seen all its units through, so an
        # interrupted run still explains the next plan's reruns as `changed: <key>`
        config = stage.config if not outcome.interrupted or record is None else record.config
        ledger.save_stage(
            stage.name,
            stage.kind,
            stage.fingerprint,
            config,
            state,
            started,
            time.time(),
            asdict(outcome),
        )
        # its units are now upstream data for the stages that need this one
        for unit in stage.units or []:
            unit.run = False
        with self.lock:
            self.outcomes[stage.name] = outcome
        if not outcome.ok and not outcome.interrupted:
            log.error("stage %s failed: %s", stage.name, outcome.message)

    def _blocked(self, name: str, failed: list[str]) -> None:
        stage = self.plan.stages[name]
        message = f"not run: needs {', '.join(failed)}, which did not succeed"
        log.error("stage %s %s", name, message)
        self.outcomes[name] = StageOutcome(name, stage.kind, ok=False, message=message)


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
    scheduler = Scheduler(list(plan.cluster.nodes))
    progress = Progress(progress_mode)
    ctx = RunContext(store, ledger, scheduler, plan.cluster, stop, progress)
    started = time.monotonic()
    run_started = ledger.start_run()
    with stop_on_signals(stop) as caught:
        try:
            outcomes = Executor(plan, pipeline, kinds, ctx, fresh).run()
        finally:
            progress.close()
    summary = make_summary(plan, outcomes, time.monotonic() - started)
    summary.update(
        report.write_run_artifacts(ledger, f"{plan.pipeline} {store.root}", store.root, plan)
    )
    write_json(store.root / SUMMARY, summary)
    code = 128 + caught[0] if caught else 0 if all(o.ok for o in outcomes.values()) else 1
    ledger.end_run(run_started, code)
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
