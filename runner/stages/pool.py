"""The `pool` stage: N long-lived Ray actors calling a worker object on a stream of items.

Ray charges about a millisecond per actor call while a checker item can take microseconds, so
items travel in batches sized from the measured item time (one item per call for slow items,
hundreds for tiny ones), with a few calls in flight per actor so no actor waits on a round
trip. The faults of hand-rolled pools are designed out: sizing uses the cluster's total CPUs;
a timed-out item is recorded and its worker replaced, never held; a crashed worker is replaced
and the items it held are retried one at a time so only the culprit spends its retries.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from runner import items as itemsrc
from runner.carry import Dest
from runner.executor import Ask, Executor, Lease, StageRun, Work, allowed_failures
from runner.identity import code_digest
from runner.kind import RunContext, StageKind, StageOutcome
from runner.lifecycle import UnitState
from runner.placement import Started, here
from runner.plan import (
    PlanContext,
    StagePlan,
    Unit,
    claim,
    decider,
    digest,
    digester,
    kept_keys,
    result_config,
    stage_config,
)
from runner.plan import stage_fingerprint as fingerprint_of
from runner.remote import remote
from runner.resources import Resources
from runner.schema import PoolStage, StageSpec
from runner.sizing import cpus_per_worker, max_concurrency
from runner.spec import Problems, did_you_mean, import_error
from runner.stages.results import ResultError, json_value, write_results

if TYPE_CHECKING:
    from runner.sim import SimStage, Simulation

log = logging.getLogger(__name__)

# a batch should keep an actor busy about this long: Ray's ~1 ms per call is then ~2%
TARGET_BATCH_SECONDS = 0.05
MAX_BATCH = 4096
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
        fingerprint = digester(own)
        units = decide.units(
            (i.id, fingerprint(i.identity), i.payload) for i in itemsrc.load(spec.items, ctx.ledger)
        )
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
    forwards to the console when `cluster.log_to_driver` is set). Without a shared filesystem
    the log is written on the worker's node and each batch's reply brings its new bytes."""

    log: Dest
    show: bool = False


def worker_output(ctx: RunContext, stage: StagePlan, index: int) -> WorkerOutput:
    """The output of the `index`th worker of a pool stage: `<run.dir>/<stage>/logs/worker-N.log`."""
    assert isinstance(stage.spec, PoolStage)
    path = ctx.stage_dir(stage.name) / LOGS / f"worker-{index}.log"
    return WorkerOutput(Dest(str(path), carried=not ctx.cluster.shared_fs), stage.spec.show_output)


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
        # without a shared filesystem: the log on this node, read as it grows (the file is
        # unlinked at once, so a worker leaves nothing behind on its node)
        self._log_reader: BinaryIO | None = None
        if output is not None and output.log.carried:
            with contextlib.suppress(OSError):
                self._log_reader = open(output.log.here(), "rb")  # noqa: SIM115 (kept open: read as it grows)
                os.unlink(output.log.here())
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

    def ready(self) -> Started:
        return here()

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
            "log": self._new_log(),
        }

    def _new_log(self) -> bytes:
        """Without a shared filesystem, the log's bytes written since the last reply (they
        travel back with it); else nothing."""
        if self._log_reader is None:
            return b""
        sys.stdout.flush()
        sys.stderr.flush()
        return self._log_reader.read()


def _capture(output: WorkerOutput) -> None:
    """Send this process's `print` and `logging` to the worker's log file (and, with `show`,
    to its own streams as well). Python-level only: Ray keeps the process's file descriptors."""
    path = Path(output.log.here())
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


# --- how it runs under the executor -----------------------------------------------------


class PoolRun(StageRun):
    """Worker leases fed with batches of items: the executor grants and places the workers,
    this sizes batches, reads outcomes, and replaces workers that time out or die."""

    running_rows = False
    noun = "item"
    grace = 0.0

    def __init__(self, stage: StagePlan, ctx: RunContext, ex: Executor) -> None:
        super().__init__(stage, ctx, ex)
        assert isinstance(stage.spec, PoolStage)
        self.spec = stage.spec
        self.retries = self.spec.retries
        self.cpus: float = stage.settings["cpus_per_worker"]
        self.threads: int = stage.settings["max_concurrency"]
        self.depth: int = self.threads + 1
        self.item_seconds: float | None = None
        self.cpu: dict[Lease, float] = {}
        # workers that overran step_timeout: fed nothing more, replaced once drained
        self.draining: set[Lease] = set()
        # each worker's log in the run directory (its new lines come with each reply)
        self.log_of: dict[Lease, Path] = {}
        self.start_error: str | None = None
        # workers started so far: each has its own log, worker-N.log
        self.workers_started = 0
        # units finished, by state, and those that failed (the rest are dropped once recorded)
        self.final: Counter[UnitState] = Counter()
        self.bad: list[Work] = []

    # units: a plan unit becomes a `Work` only when it is handed to a worker, so a stage of a
    # million items holds a Work per item in flight, not per item to run

    def make_works(self, units: list[Unit]) -> list[Work]:
        self.fresh: deque[Unit] = deque(units)
        return []

    def _queued(self) -> int:
        return len(self.queue) + len(self.fresh)

    def counts(self) -> Counter[UnitState]:
        counts = Counter(self.final)
        counts[UnitState.pending] += len(self.fresh)
        for work in itertools.chain(self.queue, *(x.work for x in self.leases)):
            if not work.state.final:  # the final ones are in `self.final` already
                counts[work.state] += 1
        return counts

    def unfinished(self) -> list[Work]:
        held = [w for x in self.leases for w in x.work if not w.state.final]
        queued = [w for w in self.queue if not w.state.final]
        fresh = [Work(self.name, u) for u in self.fresh]
        self.queue.clear()
        self.fresh.clear()
        return held + queued + fresh

    def find(self, unit: str) -> Work | None:
        for work in itertools.chain(self.queue, *(x.work for x in self.leases)):
            if work.id == unit:
                return work
        for planned in self.fresh:
            if planned.id == unit:
                self.fresh.remove(planned)
                return Work(self.name, planned)
        for planned in self.stage.to_run:  # it ran and ended: its Work was let go
            if planned.id == unit:
                ended = Work(self.name, planned)
                ended.state = UnitState.done  # final: nothing to cancel (the ledger has it)
                return ended
        return None

    def ended(self, work: Work) -> None:
        super().ended(work)
        self.final[work.state] += 1
        if work.state in (UnitState.failed, UnitState.timeout, UnitState.out_of_memory):
            self.bad.append(work)

    # workers

    def _wanted(self) -> int:
        left = self._queued() + sum(len(x.work) for x in self.leases)
        return min(self.spec.num_workers, left)

    def asks(self) -> Iterator[Ask]:
        if self.start_error:
            return
        while len(self.leases) - len(self.draining) + self.asked < self._wanted():
            self.asked += 1
            yield worker_ask(self.stage)

    def launch(self, lease: Lease) -> None:
        assert lease.placement is not None
        self.asked -= 1
        self.workers_started += 1
        output = worker_output(self.ctx, self.stage, self.workers_started)
        self.log_of[lease] = Path(output.log.path)
        lease.actor = (
            remote(PoolActor)
            .options(**lease.placement.options(max_concurrency=self.threads, max_restarts=0))
            .remote(dict(self.spec.worker), self.spec.step_timeout, self.threads, output)
        )
        lease.watch(lease.actor.ready.remote(), "ready")

    def lease_ended(self, lease: Lease) -> None:
        self.draining.discard(lease)
        self.log_of.pop(lease, None)

    def on_start(self, lease: Lease) -> None:
        self._feed(lease)

    def tick(self) -> None:
        for lease in list(self.leases):
            if lease.started is not None and lease.stopping is None:
                self._feed(lease)

    # batches

    def _batch_size(self) -> int:
        if self.spec.batch_size != "auto":
            return int(self.spec.batch_size)  # validated: an integer unless 'auto'
        if self.item_seconds is None:
            return 1
        size = TARGET_BATCH_SECONDS / max(self.item_seconds, 1e-7)
        # never so large that the tail leaves workers idle
        share = math.ceil(self._queued() / max(1, len(self.leases) * self.depth))
        return max(1, min(int(size), MAX_BATCH, share))

    def _feed(self, lease: Lease) -> None:
        """Keep `depth` batches in flight on a worker; a suspect goes alone to an idle one."""
        assert lease.started is not None
        while lease not in self.draining and len(lease.calls) < self.depth and self._queued():
            if self.queue and self.queue[0].suspect:
                if lease.calls:
                    return
                batch = [self.queue.popleft()]
            else:
                batch = self._take()
            for work in batch:
                self.ex.running(work, lease.started, at=time.time())
            lease.work += batch
            ref = lease.actor.run.remote([(w.id, w.unit.payload) for w in batch])
            self.ex.watch(lease, ref, batch)
            if batch[0].suspect:
                return

    def _take(self) -> list[Work]:
        size = self._batch_size()
        batch: list[Work] = []
        while self.queue and len(batch) < size and not self.queue[0].suspect:
            batch.append(self.queue.popleft())
        if self.fresh and len(batch) < size and not (self.queue and self.queue[0].suspect):
            take = min(size - len(batch), len(self.fresh))
            popleft, name = self.fresh.popleft, self.name
            batch += [Work(name, popleft()) for _ in range(take)]
        return batch

    def requeue(self, work: Work) -> None:
        if work.suspect:
            self.queue.appendleft(work)
        else:
            self.queue.append(work)

    # outcomes

    def on_reply(self, lease: Lease, tag: Any, value: Any) -> None:
        batch: list[Work] = tag
        reply: dict[str, Any] = value
        done_ids = {w.id for w in batch}
        lease.work = [w for w in lease.work if w.id not in done_ids]
        self.cpu[lease] = reply["cpu"]
        if reply["log"]:
            self._land_log(lease, reply["log"])
        if reply["outcomes"]:
            per_item = reply["busy"] / len(reply["outcomes"])
            old = self.item_seconds
            self.item_seconds = per_item if old is None else 0.7 * old + 0.3 * per_item
        by_id = {w.id: w for w in batch}
        now = time.time()
        for uid, status, value_, seconds in reply["outcomes"]:
            work = by_id[uid]
            if work.state.final:  # cancelled while it ran: its result is dropped
                continue
            if status == "done":
                self.ex.finish(work, UnitState.done, value_, None, now - seconds, now)
            elif status == "error":
                self.ex.failed(work, str(value_))
            else:
                self.ex.finish(work, UnitState.timeout, None, str(value_), now - seconds, now)
        for uid in reversed(reply["rest"]):
            if not by_id[uid].state.final:
                self.ex.back(by_id[uid])
        if reply["poisoned"]:
            self.draining.add(lease)
        if lease in self.draining and not lease.calls:
            log.debug("%s: replacing worker on %s", self.name, lease.node)
            self.ex.end_lease(lease, kill=True)
        elif lease.stopping is None:
            self._feed(lease)  # at once: a worker waiting for the next turn of the loop idles

    def _land_log(self, lease: Lease, data: bytes) -> None:
        """Without a shared filesystem: a batch's log lines, appended to the worker's log."""
        path = self.log_of.get(lease)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:
                fh.write(data)
        except OSError as exc:  # a log is no result: the run goes on, the user is told
            log.warning("%s: cannot write worker log %s: %s", self.name, path, exc)

    def on_failure(self, lease: Lease, tag: Any, error: str, lost: bool) -> None:
        """A worker died: requeue what it held as suspects; only an item that ran alone on it
        spends a retry (it killed its worker)."""
        held = [w for w in lease.work if not w.state.final]
        lone = len(held) == 1 and held[0].suspect
        if tag == "ready" and not lease.node_left:
            target = self.spec.worker.get("_target_")
            self.start_error = f"worker {target} failed to start: {error}"
        self.ex.end_lease(lease, kill=True)
        if lone and not lease.node_left:
            self.ex.failed(held[0], "worker process died while running this item")
            return
        for work in reversed(held):
            work.suspect = not lease.node_left
            self.ex.back(work)

    def busy(self) -> bool:
        if self.start_error:  # the stage fails: wait only for calls still out
            return any(lease.calls for lease in self.leases)
        return super().busy()

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        outcome.cpu_seconds = sum(self.cpu.values())
        if self.start_error:
            outcome.ok, outcome.message = False, self.start_error
            return outcome
        failures = outcome.failed + outcome.timeout
        allowed = allowed_failures(self.spec.max_failures, outcome.total)
        if failures > allowed:
            outcome.ok = False
            outcome.message = (
                f"{failures} item(s) failed or timed out; max_failures allows {allowed}"
            )
        path = write_results(self.ctx, self.stage)
        outcome.outputs.append(str(path))
        return outcome


def worker_ask(stage: StagePlan) -> Ask:
    """One worker's lease: its sized CPUs at the stage's priority (the simulator asks the same)."""
    return Ask(Resources(cpus=stage.settings["cpus_per_worker"]), stage.spec.priority)


def open_run(stage: StagePlan, ctx: RunContext, ex: Executor) -> PoolRun:
    return PoolRun(stage, ctx, ex)


def _simulate(stage: StagePlan, sim: Simulation) -> SimStage:
    from runner.stages.pool_sim import simulate

    return simulate(stage, sim)


KIND = StageKind(PoolStage, check, plan, open_run, _simulate)
