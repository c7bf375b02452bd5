"""The `pool` stage: N long-lived Ray actors calling a worker object on a stream of items.

Ray charges about a millisecond per actor call while a checker item can take microseconds, so
items travel in batches sized from the measured item time (one item per call for slow items,
hundreds for tiny ones), with a few calls in flight per actor so no actor waits on a round
trip. The faults of hand-rolled pools are designed out: sizing uses the cluster's total CPUs;
a timed-out item is recorded and its worker replaced, never held; a crashed worker is replaced
and the items it held are retried one at a time so only the culprit spends its retries.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

from runner.calls import Call, Expect, Remote
from runner.carry import Dest
from runner.identity import code_digest, digest, digester
from runner.kind import RunContext, StageOutcome, StageRun, Verdicts
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.plan import (
    PlanContext,
    StagePlan,
    StageSizing,
    Unit,
    claim,
    decider,
    kept_keys,
    result_config,
    stage_config,
    units_digest,
)
from runner.plan import stage_fingerprint as fingerprint_of
from runner.resources import Resources
from runner.scheduler.request import Request
from runner.schema import StageSpec
from runner.sizing import cpus_per_worker, max_concurrency
from runner.spec import Problems, check_target, no_such_stage
from runner.stages.pool import items as itemsrc
from runner.stages.pool.results import write_results
from runner.stages.pool.schema import PoolStage
from runner.stages.pool.worker import BatchReply, PoolActor, WorkerOutput
from runner.verdicts import Back, Done, DoneAll, End, Ended, Failed, Launch, Running, Send

log = logging.getLogger(__name__)

# a batch should keep an actor busy about this long: Ray's ~1 ms per call is then ~2%
TARGET_BATCH_SECONDS = 0.05
MAX_BATCH = 4096
# worker logs, under the stage's directory
LOGS = "logs"
# the final states of items that failed (kept to be reported)
BAD = frozenset({UnitState.failed, UnitState.timeout, UnitState.out_of_memory})


# --- spec checks and planning ------------------------------------------------------------


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """Worker target importable; items source present; `from` names a stage (implies needs)."""
    assert isinstance(spec, PoolStage)
    path = f"pipeline.stages.{name}"
    check_target(
        problems,
        f"{path}.worker",
        spec.worker,
        "name the worker class, pkg.mod.Class",
        partial(_item_arguments, spec.worker),
    )
    for key, message in itemsrc.check(spec.items):
        problems.add(f"{path}.items{'.' + key if key else ''}", message)
    upstream = spec.items.get("from")
    if isinstance(upstream, str):
        if upstream not in stages or upstream == name:
            no_such_stage(problems, f"{path}.items.from", upstream, name, stages)
        elif upstream not in spec.needs:
            spec.needs.append(upstream)


def _item_arguments(worker: Mapping[str, object], target: object) -> int:
    """The positional arguments the runner gives the worker target (as PoolActor builds it): a
    class is built with the spec's keys alone, a function (or a `_partial_` target) is called
    with each item."""
    return 1 if worker.get("_partial_", not isinstance(target, type)) else 0


def plan(name: str, spec: StageSpec, raw: dict[str, object], ctx: PlanContext) -> StagePlan:
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
        ids, payloads, identities = itemsrc.columns(spec.items, ctx.ledger)
        fingerprints = list(map(digester(own), identities))
        units = decide.units(ids, fingerprints, payloads)
        # the items are the stage's input: a stage that needs this one reads their results
        fp = digest(fp, units_digest(ids, fingerprints))
    else:
        units = _from_upstream(own, str(source), ctx)
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
        PoolSettings(sizing.cpus, threads),
        StageSizing(True, worker.resources),
    )


@dataclass(frozen=True)
class PoolSettings:
    """What a pool stage's run takes from its plan: each worker's CPUs and threads, as sized
    for the cluster (and the environment variables that override the spec)."""

    cpus_per_worker: float
    max_concurrency: int


def _from_upstream(own: str, source: str, ctx: PlanContext) -> list[Unit] | None:
    """The upstream stage's committed outputs as units, once it has nothing left to run, in
    the upstream's own order (a range's 0, 1, 2, ..., 10: not the ledger's text order).

    Without a ledger (the simulated cluster, once the upstream stage has run there) an item
    per upstream unit, its value unknown: what a real run gets when every upstream unit is
    done, so the simulation times the stage instead of leaving it out."""
    upstream = ctx.upstream[source]
    if upstream.units is None or upstream.to_run:
        return None
    if ctx.ledger is None:
        return [Unit(u.id, digest(own, u.fingerprint), None) for u in upstream.units]
    ids = [u.id for u in upstream.units]
    done = {r.unit: r for r in ctx.ledger.rows(source, ids) if r.state is UnitState.done}
    rows = [done[i] for i in ids if i in done]
    return [Unit(r.unit, digest(own, r.fingerprint), r.result) for r in rows]


# --- the workers ---------------------------------------------------------------------------


def worker_output(ctx: RunContext, stage: StagePlan, index: int) -> WorkerOutput:
    """The output of the `index`th worker of a pool stage: `<run.dir>/<stage>/logs/worker-N.log`."""
    assert isinstance(stage.spec, PoolStage)
    path = ctx.stage_dir(stage.name) / LOGS / f"worker-{index}.log"
    return WorkerOutput(Dest(str(path), carried=not ctx.cluster.shared_fs), stage.spec.show_output)


# --- how it runs under the executor -----------------------------------------------------


class PoolRun(StageRun):
    """Worker leases fed with batches of items: the loop grants and places the workers, this
    sizes batches, reads outcomes, and replaces workers that time out or die."""

    running_rows = False
    noun = "item"
    grace = 0.0

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        super().__init__(stage, ctx)
        assert isinstance(stage.spec, PoolStage) and isinstance(stage.settings, PoolSettings)
        self.spec = stage.spec
        self.retries = self.spec.retries
        self.cpus = stage.settings.cpus_per_worker
        self.threads = stage.settings.max_concurrency
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
        # in virtual time: what a worker's time per item is, against the items' own times
        measure = ctx.measured.stage(stage.name) if ctx.measured is not None else None
        self.scale = measure.scale if measure is not None else 1.0
        self.timed_out = measure.timed_out if measure is not None else set()

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
        if work.state in BAD:
            self.bad.append(work)

    def ended_all(self, works: Sequence[Work]) -> None:
        states = Counter(w.state for w in works)
        if states.keys() & BAD:
            super().ended_all(works)  # one by one: `bad` keeps the failures
            return
        self.left -= len(works)
        self.final.update(states)

    # workers

    def _wanted(self) -> int:
        left = self._queued() + sum(len(x.work) for x in self.leases)
        return min(self.spec.num_workers, left)

    def asks(self) -> Iterator[Ask]:
        if self.start_error:
            return
        while len(self.leases) - len(self.draining) + self.asked < self._wanted():
            self.asked += 1
            yield Ask(worker_request(self.stage))

    def launch(self, lease: Lease) -> Verdicts:
        self.asked -= 1
        self.workers_started += 1
        output = worker_output(self.ctx, self.stage, self.workers_started)
        self.log_of[lease] = Path(output.log.path)
        args = (dict(self.spec.worker), self.spec.step_timeout, self.threads, output)
        options = {"max_concurrency": self.threads, "max_restarts": 0}
        yield Launch(lease, Remote(PoolActor, args, actor=True, options=options))

    def lease_ended(self, lease: Lease) -> None:
        self.draining.discard(lease)
        self.log_of.pop(lease, None)

    def on_start(self, lease: Lease) -> Verdicts:
        return self._feed(lease)

    def tick(self) -> Verdicts:
        for lease in list(self.leases):
            if lease.started is not None and lease.stopping is None:
                yield from self._feed(lease)

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

    def _feed(self, lease: Lease) -> Verdicts:
        """Keep `depth` batches in flight on a worker; a suspect goes alone to an idle one."""
        while lease not in self.draining and len(lease.calls) < self.depth and self._queued():
            if lease.closed:
                return
            if self.queue and self.queue[0].suspect:
                if lease.calls:
                    return
                batch = [self.queue.popleft()]
            else:
                batch = self._take()
            yield Running(batch, lease, self.ctx.wall())
            units = [w.unit for w in batch]
            args = ([u.id for u in units], [u.payload for u in units])
            expect = partial(self._expect, batch) if self.ctx.virtual else None
            yield Send(lease, Call("run", args, tag=batch, expect=expect))
            if batch[0].suspect:
                return

    def _expect(self, batch: list[Work]) -> Expect:
        """A batch in virtual time: each item takes what the measured run says, times the
        worker time per item time it measured; an item that overran its step timeout there
        does so again, and stops the batch (its worker is then replaced); so does one whose
        declared time (`cluster.sim_unit_seconds`) is past `step_timeout`, as on Ray."""
        status: list[str] = []
        seconds: list[float] = []
        limit = self.spec.step_timeout
        for work in batch:
            took = self.ctx.seconds(self.name, work.id)
            if work.id in self.timed_out or (limit is not None and took > limit):
                status.append("timeout")
                seconds.append(took if limit is None else min(took, limit))
                break
            status.append("done")
            seconds.append(took * self.scale)
        busy = sum(seconds)
        values: list[object] = [None] * len(status)
        if status and status[-1] == "timeout":  # the error a worker gives it on Ray
            values[-1] = "step_timeout " + (f"{limit:g}s exceeded" if limit else "exceeded")
        reply = BatchReply(
            status=status,
            values=values,
            seconds=seconds,
            busy=busy,
            cpu=0.0,
            poisoned=status[-1] == "timeout",
            log=b"",
        )
        return Expect(busy, reply)

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

    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        assert isinstance(tag, list) and isinstance(value, dict)
        batch: list[Work] = tag
        reply = cast(BatchReply, value)  # what PoolActor.run (or _expect) answered
        replied = set(batch)
        lease.work = [w for w in lease.work if w not in replied]
        self.cpu[lease] = reply["cpu"]
        if reply["log"]:
            self._land_log(lease, reply["log"])
        self._learn_item_time(reply)
        yield from self._outcomes(batch, reply)
        if reply["poisoned"]:
            self.draining.add(lease)
        if lease in self.draining and not lease.calls:
            log.debug("%s: replacing worker on %s", self.name, lease.node)
            yield End(lease, kill=True)
        elif lease.stopping is None:
            # at once: a worker waiting for the next turn of the loop idles
            yield from self._feed(lease)

    def _learn_item_time(self, reply: BatchReply) -> None:
        """The mean time of an item on a worker, smoothed over the batches replied so far."""
        status = reply["status"]
        if status:
            per_item = reply["busy"] / len(status)
            old = self.item_seconds
            self.item_seconds = per_item if old is None else 0.7 * old + 0.3 * per_item

    def _outcomes(self, batch: list[Work], reply: BatchReply) -> Verdicts:
        """Each item of a replied batch: done, failed or timed out as the worker says; the
        items it did not reach go back to the queue."""
        status, values, seconds = reply["status"], reply["values"], reply["seconds"]
        # the worker's clock when its last item ended (in virtual time: now)
        ends = end_to_end(seconds, reply.get("ended") or self.ctx.wall())
        ran = batch[: len(status)]
        if status.count("done") == len(ran) and not any(w.state.final for w in ran):
            yield DoneAll(ran, values, seconds, ends)  # the commonest reply, at batch cost
        else:
            for work, state, result, took, end in zip(
                ran, status, values, seconds, ends, strict=True
            ):
                if work.state.final:  # cancelled while it ran: its result is dropped
                    continue
                if state == "done":
                    yield Done(work, result, end - took, end)
                elif state == "error":
                    yield Failed(work, str(result))
                else:
                    yield Ended(work, UnitState.timeout, None, str(result), end - took, end)
        for work in reversed(batch[len(status) :]):
            if not work.state.final:
                yield Back(work)

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

    def on_failure(self, lease: Lease, tag: object, error: str, lost: bool) -> Verdicts:
        """A worker died: requeue what it held as suspects; only an item that ran alone on it
        spends a retry (it killed its worker)."""
        held = [w for w in lease.work if not w.state.final]
        lone = len(held) == 1 and held[0].suspect
        if tag == "ready" and not lease.node_left:
            target = self.spec.worker.get("_target_")
            self.start_error = f"worker {target} failed to start: {error}"
        yield End(lease, kill=True)
        if lone and not lease.node_left:
            yield Failed(held[0], "worker process died while running this item")
            return
        for work in reversed(held):
            work.suspect = not lease.node_left
            yield Back(work)

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
                f"{self._first_failure()}"
            )
        if not self.ctx.virtual:
            path = write_results(self.ctx, self.stage)
            outcome.outputs.append(str(path))
        return outcome

    def _first_failure(self) -> str:
        """`; the first: ID: Type: message (...)`: the failure to fix first, said where the run
        ends, and where the others and the whole tracebacks are."""
        if not self.bad:
            return ""
        first = self.bad[0]
        error = (first.error or first.state.value).split("\n", 1)[0]
        if self.ctx.virtual:
            return f"; the first: {first.id}: {error}"
        logs = self.ctx.stage_dir(self.name) / LOGS
        return f"; the first: {first.id}: {error} (mode=status lists all; tracebacks in {logs}/)"


def end_to_end(seconds: Sequence[float], last: float) -> list[float]:
    """When each item of a batch ended: its worker ran them one after another, the last
    ending at `last`, each taking its own `seconds`. So each item's span is when it really ran
    and the items of a worker never overlap (a lane per worker in the timeline and trace);
    item i+1 starts exactly where item i ended (end - seconds, the same float)."""
    ends = [last] * len(seconds)
    for i in range(len(seconds) - 1, 0, -1):
        ends[i - 1] = ends[i] - seconds[i]
    return ends


def worker_request(stage: StagePlan) -> Request:
    """One worker's lease: its sized CPUs at the stage's priority."""
    assert isinstance(stage.settings, PoolSettings)
    return Request(Resources(cpus=stage.settings.cpus_per_worker), stage.spec.priority)


def open_run(stage: StagePlan, ctx: RunContext) -> PoolRun:
    return PoolRun(stage, ctx)


def allowed_failures(max_failures: float, total: int) -> int:
    """A count (>= 1) or a fraction of the stage's units (< 1)."""
    if max_failures < 1:
        return math.floor(max_failures * total + 1e-9)
    return int(max_failures)
