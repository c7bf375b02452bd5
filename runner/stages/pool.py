"""The `pool` stage: N long-lived Ray actors calling a worker object on a stream of items.

Ray charges about a millisecond per actor call while a checker item can take microseconds, so
items travel in batches sized from the measured item time (one item per call for slow items,
hundreds for tiny ones), with a few calls in flight per actor so no actor waits on a round
trip. The faults of hand-rolled pools are designed out: sizing uses the cluster's total CPUs;
a timed-out item is recorded and its worker replaced, never held; a crashed worker is replaced
and the items it held are retried one at a time so only the culprit spends its retries.
"""

from __future__ import annotations

import io
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runner import items as itemsrc
from runner.identity import code_digest
from runner.plan import (
    PlanContext,
    StagePlan,
    Unit,
    claim,
    decider,
    digest,
    kept_keys,
    result_config,
    stage_config,
)
from runner.plan import stage_fingerprint as fingerprint_of
from runner.remote import error_line, remote
from runner.resources import Resources
from runner.schema import PoolStage, StageSpec
from runner.sizing import cpus_per_worker, max_concurrency
from runner.spec import Problems, did_you_mean, import_error
from runner.stages.base import RunContext, StageKind, StageOutcome
from runner.stages.results import ResultError, json_value, write_results
from runner.store import UnitRow, UnitState

log = logging.getLogger(__name__)

# a batch should keep an actor busy about this long: Ray's ~1 ms per call is then ~2%
TARGET_BATCH_SECONDS = 0.05
MAX_BATCH = 4096
# ledger writes are batched: at most this often, or this many rows
FLUSH_SECONDS, FLUSH_ROWS = 0.5, 5000
# a failed item's error keeps this many of its innermost frames (the log has them all)
ERROR_FRAMES = 3
# worker logs, under the stage's directory
LOGS = "logs"


# --- spec checks and planning ------------------------------------------------------------


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Worker target importable; items source present; `from` names a stage (implies needs)."""
    assert isinstance(spec, PoolStage)
    path = f"pipeline.stages.{name}"
    target = spec.worker.get("_target_")
    if not isinstance(target, str) or not target:
        problems.add(f"{path}.worker._target_", "missing: name the worker class, pkg.mod.Class")
    elif (error := import_error(target)) is not None:
        problems.add(f"{path}.worker._target_", f"= {target!r}: cannot import: {error}")
    for key, message in itemsrc.check(spec.items):
        problems.add(f"{path}.items{'.' + key if key else ''}", message)
    upstream = spec.items.get("from")
    if isinstance(upstream, str):
        if upstream not in stages or upstream == name:
            others = [s for s in stages if s != name]
            hint = did_you_mean(upstream, others)
            problems.add(
                f"{path}.items.from",
                f"= {upstream!r}: no such stage{hint} (stages: {', '.join(others)})",
            )
        elif upstream not in spec.needs:
            spec.needs.append(upstream)


def plan(name: str, spec: StageSpec, raw: dict[str, Any], ctx: PlanContext) -> StagePlan:
    """Units from the items (or the upstream outputs), a worker claim sized for the cluster."""
    assert isinstance(spec, PoolStage)
    code = code_digest(str(spec.worker.get("_target_", "")))
    own, fp = fingerprint_of(
        result_config(spec, raw, code), [ctx.upstream[n].fingerprint for n in spec.needs]
    )
    config = stage_config(spec, raw, code)
    decide = decider(name, config, ctx, kept_keys(spec))
    units: list[Unit] | None
    pending_reason = ""
    source = spec.items.get("from")
    if source is None:
        units = [
            decide(Unit(i.id, digest(own, i.identity), i.payload))
            for i in itemsrc.load(spec.items, ctx.ledger)
        ]
    else:
        units = _from_upstream(own, source, ctx)
        units = [decide(u) for u in units] if units is not None else None
        pending_reason = f"known when '{source}' has run"
    total = ctx.cluster.total.cpus
    sizing = cpus_per_worker(spec.cpus_per_worker, spec.num_workers, total)
    threads = max_concurrency(spec.max_concurrency)
    worker = claim("worker", Resources(cpus=sizing.cpus), spec.num_workers, ctx.cluster)
    notes = [sizing.describe(name, total, spec.num_workers)]
    if worker.fit < worker.count:
        notes.append(
            f"{name}: only {worker.fit} of {worker.count} workers fit at once "
            f"({sizing.cpus:g} CPU each, {total:g} CPUs in the cluster)"
        )
    return StagePlan(
        name,
        "pool",
        spec,
        fp,
        config,
        units,
        [worker],
        notes,
        pending_reason,
        {"cpus_per_worker": sizing.cpus, "max_concurrency": threads},
    )


def _from_upstream(own: str, source: str, ctx: PlanContext) -> list[Unit] | None:
    """The upstream stage's committed outputs as units, once it has nothing left to run."""
    upstream = ctx.upstream[source]
    if upstream.units is None or upstream.to_run or ctx.ledger is None:
        return None
    ids = [u.id for u in upstream.units]
    rows = [r for r in ctx.ledger.rows(source, ids) if r.state is UnitState.done]
    return [Unit(r.unit, digest(own, r.fingerprint), r.result) for r in rows]


# --- the actor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerOutput:
    """Where a pool worker's `print` and `logging` go: its own log file under the run
    directory and, with `show_output`, the worker process's own streams too (which Ray
    forwards to the console when `cluster.log_to_driver` is set)."""

    log: str
    show: bool = False


def worker_output(ctx: RunContext, stage: StagePlan, index: int) -> WorkerOutput:
    """The output of the `index`th worker of a pool stage: `<run.dir>/<stage>/logs/worker-N.log`."""
    assert isinstance(stage.spec, PoolStage)
    path = ctx.stage_dir(stage.name) / LOGS / f"worker-{index}.log"
    return WorkerOutput(str(path), stage.spec.show_output)


class PoolActor:
    """Runs inside a Ray actor: builds the worker once, then runs batches of items."""

    def __init__(
        self,
        worker: dict[str, Any],
        step_timeout: float | None,
        threads: int,
        output: WorkerOutput | None = None,
    ) -> None:
        from hydra.utils import get_object, instantiate

        if output is not None:
            _capture(output)
        if not isinstance(get_object(worker["_target_"]), type) and "_partial_" not in worker:
            # a plain function is the worker itself, called per item with the spec's kwargs
            worker = {**worker, "_partial_": True}
        self._fn = instantiate(worker, _convert_="all")
        self._timeout = step_timeout
        self._threads = _DaemonThreads(threads) if step_timeout else None
        # set once an item overran step_timeout: its thread is stuck, so take no more items
        self._poisoned = False
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # CPU spent starting up (imports, building the worker) is not the units' CPU time
        self._cpu0 = _cpu_seconds()

    def ready(self) -> str:
        return self.name

    def run(self, batch: list[tuple[str, Any]]) -> dict[str, Any]:
        """Outcomes as (id, status, value, seconds); ids not started; busy time; CPU so far.

        Every value in the reply is plain data (a result that is not JSON becomes that item's
        error), so one bad result never fails the batch it travels with."""
        outcomes: list[tuple[str, str, Any, float]] = []
        started = time.perf_counter()
        for n, (uid, payload) in enumerate(batch):
            if self._poisoned:
                return self._reply(outcomes, [u for u, _ in batch[n:]], started, poisoned=True)
            t0 = time.perf_counter()
            status, value = self._one(uid, payload)
            outcomes.append((uid, status, value, time.perf_counter() - t0))
            if status == "timeout":
                self._poisoned = True
        return self._reply(outcomes, [], started, poisoned=False)

    def _one(self, uid: str, payload: Any) -> tuple[str, Any]:
        if self._threads is None:
            return _call(self._fn, uid, payload)
        future = self._threads.submit(self._fn, uid, payload)
        try:
            return future.result(timeout=self._timeout)
        except FutureTimeout:
            # the thread cannot be interrupted: report, and let the driver replace this actor
            print(f"item {uid}: step_timeout {self._timeout:g}s exceeded", file=sys.stderr)
            return "timeout", f"step_timeout {self._timeout:g}s exceeded"

    def _reply(
        self,
        outcomes: list[tuple[str, str, Any, float]],
        rest: list[str],
        t0: float,
        poisoned: bool,
    ) -> dict[str, Any]:
        return {
            "outcomes": outcomes,
            "rest": rest,
            "busy": time.perf_counter() - t0,
            "cpu": _cpu_seconds() - self._cpu0,
            "poisoned": poisoned,
            "worker": self.name,
        }


def _capture(output: WorkerOutput) -> None:
    """Send this process's `print` and `logging` to the worker's log file (and, with `show`,
    to its own streams as well). Python-level only: Ray keeps the process's file descriptors."""
    path = Path(output.log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = path.open("a", buffering=1)
    except OSError as exc:
        print(f"runner: cannot open worker log {path}: {exc}", file=sys.stderr)
        return
    sys.stdout = _Tee(log_file, sys.stdout if output.show else None)
    sys.stderr = _Tee(log_file, sys.stderr if output.show else None)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


class _Tee(io.TextIOBase):
    """A text stream writing to a log file and, optionally, to a second stream."""

    def __init__(self, log_file: TextIO, also: TextIO | None) -> None:
        self._log, self._also = log_file, also
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._log.write(text)
            if self._also is not None:
                self._also.write(text)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        if self._also is not None:
            self._also.flush()


def _cpu_seconds() -> float:
    """CPU time of this process and the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _DaemonThreads:
    """Runs calls on daemon threads: a stuck item must never keep the actor process alive
    at exit (ThreadPoolExecutor joins its threads, so a killed actor would linger)."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[tuple[str, Any]], Any, str, Any]] = (
            queue.SimpleQueue()
        )
        for n in range(count):
            threading.Thread(target=self._serve, name=f"item-{n}", daemon=True).start()

    def submit(self, fn: Any, uid: str, payload: Any) -> Future[tuple[str, Any]]:
        future: Future[tuple[str, Any]] = Future()
        self._jobs.put((future, fn, uid, payload))
        return future

    def _serve(self) -> None:
        while True:
            future, fn, uid, payload = self._jobs.get()
            future.set_result(_call(fn, uid, payload))


def _call(fn: Any, uid: str, payload: Any) -> tuple[str, Any]:
    """One item: ("done", its result as JSON data) or ("error", type, message and the last
    frames); the whole traceback goes to the worker's log."""
    try:
        return "done", json_value(fn(payload))
    except Exception as exc:  # the item's own failure: a recorded outcome, not a crash
        print(f"item {uid} failed:\n{traceback.format_exc()}", file=sys.stderr, end="")
        return "error", _error_text(exc)


def _error_text(exc: BaseException) -> str:
    """`Type: message`, then the last frames (innermost last), as a results row keeps it."""
    head = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ResultError):
        return head
    frames = traceback.extract_tb(exc.__traceback__)[1:][-ERROR_FRAMES:]
    lines = [f"  at {f.filename}:{f.lineno} in {f.name}" for f in frames]
    return "\n".join([head, *lines])


# --- the driver --------------------------------------------------------------------------


@dataclass
class _Item:
    unit: Unit
    attempts: int = 0
    # held by a worker that crashed: run alone, so only the culprit spends its retries
    suspect: bool = False


@dataclass
class _Worker:
    handle: Any
    grant: Any
    index: int
    inflight: dict[Any, list[_Item]] = field(default_factory=dict)
    draining: bool = False
    cpu: float = 0.0


class PoolRun:
    """Drives one pool stage: actors, batches, timeouts, crashes, ledger, results."""

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        assert isinstance(stage.spec, PoolStage)
        self.stage, self.spec, self.ctx = stage, stage.spec, ctx
        self.queue: deque[_Item] = deque(_Item(u) for u in stage.to_run)
        self.workers: list[_Worker] = []
        self.pending_rows: list[UnitRow] = []
        self.last_flush = time.monotonic()
        self.item_seconds: float | None = None
        self.counts = {"done": 0, "failed": 0, "timeout": 0, "cancelled": 0}
        self.retired_cpu = 0.0
        self.depth: int = stage.settings["max_concurrency"] + 1
        self.next_index = 0
        self.start_error: str | None = None

    # lifecycle

    def run(self) -> StageOutcome:
        t0 = time.monotonic()
        total = len(self.stage.units or [])
        outcome = StageOutcome(self.stage.name, "pool", total=total)
        outcome.skipped = total - len(self.queue)
        self.ctx.progress.start(self.stage.name, len(self.queue))
        try:
            if self.queue:
                self._loop()
        finally:
            self._cancel_inflight()
            self._stop_workers()
            self._flush(force=True)
            self.ctx.progress.finish(self.stage.name)
        outcome.done, outcome.failed = self.counts["done"], self.counts["failed"]
        outcome.timeout, outcome.cancelled = self.counts["timeout"], self.counts["cancelled"]
        outcome.wall = time.monotonic() - t0
        outcome.cpu_seconds = self.retired_cpu + sum(w.cpu for w in self.workers)
        outcome.interrupted = self.ctx.stop.is_set()
        return self._conclude(outcome)

    def _conclude(self, outcome: StageOutcome) -> StageOutcome:
        if self.start_error:
            outcome.ok, outcome.message = False, self.start_error
            return outcome
        if outcome.interrupted:
            outcome.ok = False
            return outcome
        failures = outcome.failed + outcome.timeout
        allowed = _allowed_failures(self.spec.max_failures, outcome.total)
        if failures > allowed:
            outcome.ok = False
            outcome.message = (
                f"{failures} item(s) failed or timed out; max_failures allows {allowed}"
            )
        path = write_results(self.ctx, self.stage)
        outcome.outputs.append(str(path))
        return outcome

    def _loop(self) -> None:
        import ray

        self._grow(block=True)
        while (self.queue or self._inflight()) and not self.ctx.stop.is_set():
            if not self.workers:
                self._grow(block=True)
                if not self.workers:
                    return
            self._dispatch()
            refs = [ref for w in self.workers for ref in w.inflight]
            if not refs:
                continue
            ready, rest = ray.wait(refs, num_returns=1, timeout=0.2)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self._collect(ref)
            self._retire_drained()
            self._flush()
            if self.start_error:
                return
            if len(self.workers) < self._wanted():
                self._grow(block=False)

    def _wanted(self) -> int:
        return min(self.spec.num_workers, len(self.queue) + self._inflight_items())

    def _grow(self, block: bool) -> None:
        """Ask the scheduler for worker slots and start an actor for each grant."""
        cpus = self.stage.settings["cpus_per_worker"]
        while len(self.workers) < self._wanted() and not self.ctx.stop.is_set():
            grant = self.ctx.scheduler.acquire(
                f"{self.stage.name}/worker",
                Resources(cpus=cpus),
                self.spec.priority,
                timeout=None if block and not self.workers else 0,
                cancelled=self.ctx.stop.is_set,
            )
            if grant is None:
                return
            try:
                self.workers.append(self._start_actor(grant, cpus))
            except BaseException:  # the scheduler is the run's: never keep what we cannot use
                self.ctx.scheduler.release(grant)
                raise

    def _start_actor(self, grant: Any, cpus: float) -> _Worker:
        threads = self.stage.settings["max_concurrency"]
        self.next_index += 1
        output = worker_output(self.ctx, self.stage, self.next_index)  # issue 12: worker logs
        handle = (
            remote(PoolActor)
            .options(num_cpus=cpus, max_concurrency=threads, name=None, max_restarts=0)
            .remote(dict(self.spec.worker), self.spec.step_timeout, threads, output)
        )
        return _Worker(handle, grant, self.next_index)

    def _stop_workers(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w.handle, no_restart=True)
            self.ctx.scheduler.release(w.grant)
        self.retired_cpu += sum(w.cpu for w in self.workers)
        self.workers = []

    # dispatch

    def _batch_size(self) -> int:
        if self.spec.batch_size != "auto":
            return int(self.spec.batch_size)  # validated: an integer unless 'auto'
        if self.item_seconds is None:
            return 1
        size = TARGET_BATCH_SECONDS / max(self.item_seconds, 1e-7)
        # never so large that the tail leaves actors idle
        share = math.ceil(len(self.queue) / max(1, len(self.workers) * self.depth))
        return max(1, min(int(size), MAX_BATCH, share))

    def _dispatch(self) -> None:
        for w in self.workers:
            while not w.draining and len(w.inflight) < self.depth and self.queue:
                if self.queue[0].suspect:
                    # a suspect runs alone on its actor: if the actor dies, it was the culprit
                    if w.inflight:
                        break
                    batch = [self.queue.popleft()]
                else:
                    batch = self._take()
                ref = w.handle.run.remote([(i.unit.id, i.unit.payload) for i in batch])
                w.inflight[ref] = batch
                if batch[0].suspect:
                    break

    def _take(self) -> list[_Item]:
        size = self._batch_size()
        batch: list[_Item] = []
        while self.queue and len(batch) < size and not self.queue[0].suspect:
            batch.append(self.queue.popleft())
        return batch

    # outcomes

    def _collect(self, ref: Any) -> None:
        import ray

        worker = next((w for w in self.workers if ref in w.inflight), None)
        if worker is None:  # already requeued when its worker died
            return
        batch = worker.inflight.pop(ref)
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._worker_died(worker, batch, exc)
            return
        except ray.exceptions.TaskCancelledError:
            self.queue.extendleft(reversed(batch))
            return
        worker.cpu = reply["cpu"]
        done = len(reply["outcomes"])
        if done:
            per_item = reply["busy"] / done
            self.item_seconds = (
                per_item
                if self.item_seconds is None
                else (0.7 * self.item_seconds + 0.3 * per_item)
            )
        by_id = {i.unit.id: i for i in batch}
        for uid, status, value, seconds in reply["outcomes"]:
            self._record(by_id[uid], status, value, seconds, reply["worker"])
        self.queue.extendleft(reversed([by_id[u] for u in reply["rest"]]))
        if reply["poisoned"]:
            worker.draining = True

    def _record(self, item: _Item, status: str, value: Any, seconds: float, worker: str) -> None:
        item.attempts += 1
        if status == "error" and item.attempts <= self.spec.retries:
            self.queue.append(item)
            return
        state = {"done": UnitState.done, "error": UnitState.failed}.get(status, UnitState.timeout)
        self._finish(
            item,
            state,
            worker,
            seconds,
            value if state is UnitState.done else None,
            None if state is UnitState.done else str(value),
        )

    def _finish(
        self,
        item: _Item,
        state: UnitState,
        worker: str | None,
        seconds: float | None,
        result: Any,
        error: str | None,
    ) -> None:
        now = time.time()
        started = None if seconds is None else now - seconds
        unit, stage = item.unit, self.stage.name
        self.pending_rows.append(
            unit.row(stage, state, item.attempts, started, now, worker, error, result)
        )
        key = state.value
        self.counts[key] += 1
        ok = state is UnitState.done
        if state is not UnitState.cancelled:
            self.ctx.progress.advance(self.stage.name, done=int(ok), failed=int(not ok))

    def _worker_died(self, worker: _Worker, batch: list[_Item], exc: Exception) -> None:
        """Requeue what the dead actor held; only an item that ran alone on it is charged."""
        if _creation_failed(exc):
            target = self.spec.worker.get("_target_")
            self.start_error = f"worker {target} failed to start: {error_line(exc)}"
        held = [batch, *worker.inflight.values()]
        worker.inflight.clear()
        worker.draining = True
        if len(held) == 1 and len(batch) == 1 and batch[0].suspect:
            item = batch[0]
            item.attempts += 1
            if item.attempts > self.spec.retries:
                self._finish(
                    item,
                    UnitState.failed,
                    None,
                    None,
                    None,
                    "worker process died while running this item",
                )
                return
        for item in reversed([i for b in held for i in b]):
            item.suspect = True
            self.queue.appendleft(item)

    def _retire_drained(self) -> None:
        import ray

        for w in [w for w in self.workers if w.draining and not w.inflight]:
            ray.kill(w.handle, no_restart=True)
            self.ctx.scheduler.release(w.grant)
            self.retired_cpu += w.cpu
            self.workers.remove(w)
            log.debug("%s: replaced worker %d", self.stage.name, w.index)

    def _cancel_inflight(self) -> None:
        for w in self.workers:
            for batch in w.inflight.values():
                for item in batch:
                    self._finish(item, UnitState.cancelled, None, None, None, "cancelled")
            w.inflight.clear()

    def _inflight(self) -> bool:
        return any(w.inflight for w in self.workers)

    def _inflight_items(self) -> int:
        return sum(len(b) for w in self.workers for b in w.inflight.values())

    def _flush(self, force: bool = False) -> None:
        due = time.monotonic() - self.last_flush > FLUSH_SECONDS
        if self.pending_rows and (force or due or len(self.pending_rows) >= FLUSH_ROWS):
            self.ctx.ledger.write(self.pending_rows)
            self.pending_rows = []
            self.last_flush = time.monotonic()


def _allowed_failures(max_failures: float, total: int) -> int:
    """A count (>= 1) or a fraction of the stage's items (< 1)."""
    if max_failures < 1:
        return math.floor(max_failures * total + 1e-9)
    return int(max_failures)


def _creation_failed(exc: Exception) -> bool:
    return "creation task" in str(exc)


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return PoolRun(stage, ctx).run()


KIND = StageKind(PoolStage, check, plan, run)
