"""The one unit lifecycle: every stage's work, one wait loop, one place for each fault.

Every stage kind used to drive its own loop; now a kind is a `StageRun` that says how to ask
for resources, launch on a placement, read a reply and conclude, and the `Executor` owns the
rest for all running stages at once, on one thread:

- **asks → grants → placements**: a kind's `Lease` asks the scheduler with a `Request`; once
  granted, its `Placement` names the Ray node the scheduler chose, and the kind launches its
  actor or task with `placement.options()`, so Ray runs it where the runner decided.
- **running means running**: a unit is RUNNING when its process says so (a `Started` message:
  an actor's `ready()` reply, or the file a task writes as it starts), with the
  node it really runs on. A lease that Ray cannot start within `START_BOUND` goes back to
  the queue with the reason, without spending a retry.
- **one wait**: `ray.wait` over every in-flight call of every stage; replies go to the kind.
- **retries, lost workers, nodes that leave**: a unit whose worker died is queued again (a
  lost node costs no retry); a kind's own failure spends a retry, then fails.
- **cancel with grace and preemption**: the scheduler flags victims; the kind is asked to stop
  (`stop`), given its grace, then killed; the unit goes PREEMPTED → PENDING with its saved
  state. SIGINT/SIGTERM stops every lease the same way and records CANCELLED.
- **ledger**: rows batched (at most `FLUSH_SECONDS` apart), events for the timeline.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner import cancel, carry, procs, saved_state
from runner.cluster import RayNode, live_nodes, ray_alive
from runner.errors import StorageError
from runner.kind import RunContext, StageKind, StageOutcome
from runner.lifecycle import UnitState, move
from runner.placement import Placement, Started, Starts, StartTo
from runner.plan import Plan, PlanContext, StagePlan, Unit, units_digest
from runner.remote import ActorKills, bounded, error_line
from runner.resources import Resources
from runner.scheduler.core import Grant, Ticket
from runner.scheduler.metrics import REGISTRY
from runner.scheduler.request import Request
from runner.spec import Pipeline
from runner.store import Event, UnitRow, storage_error

log = logging.getLogger(__name__)

# ledger rows are written at most this far apart (a SIGKILL loses at most this much work)
FLUSH_SECONDS, FLUSH_ROWS = 0.2, 5000
# seconds Ray may take to start a unit on its granted node before the grant goes back
START_BOUND = 60.0
# how often the metrics gauges (units by state, resources granted) are brought up to date
METRICS_EVERY = 1.0
# how often Ray's node membership is read again
NODES_EVERY = 2.0
# seconds a signal is given to end the embedded Ray's processes too, before Ray is asked anything
SIGNAL_SETTLE = 0.3
# seconds an interrupted stage's clean-up may wait on Ray (it may be going down with the run)
CLOSE_BOUND = 5.0
# ... and one lease's (a kill, a group removed: milliseconds when Ray is up)
CLEANUP_BOUND = 1.0
# the longest single wait: signals and deadlines are looked at least this often
WAIT_SECONDS = 0.1
# how often `mode=cancel` requests are looked for in the run directory
CANCEL_EVERY = 0.5
# seconds between SIGTERM and SIGKILL for what a unit left running after the embedded Ray died
ORPHAN_GRACE = 1.0
# units whose start-up latencies a stage's summary keeps one by one (the mean covers all)
MEASURED_UNITS = 10_000


@dataclass(eq=False, slots=True)
class Work:
    """One unit in the executor's hands: where it is in its life, and what the ledger keeps."""

    stage: str
    unit: Unit
    state: UnitState = UnitState.pending
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    node_id: str | None = None
    node_ip: str | None = None
    worker: str | None = None
    error: str | None = None
    result: Any = None
    # how the ledger keeps the unit's input (None: its payload)
    record: Any = None
    # a preempted unit's state, handed back when it runs again
    saved: Any = None
    # held by a worker that died: runs alone, so only the culprit spends its retries
    suspect: bool = False

    @property
    def id(self) -> str:
        return self.unit.id

    def go(self, state: UnitState) -> None:
        self.state = move(self.state, state)

    def row(self) -> UnitRow:
        row = self.unit.row(
            self.stage,
            self.state,
            self.attempts,
            self.started,
            self.ended,
            self.worker,
            self.error,
            self.result,
            self.record,
        )
        row.node_id, row.node_ip = self.node_id, self.node_ip
        return row


@dataclass(eq=False)
class Lease:
    """A grant in use: its placement, the calls in flight on it, and the units it carries."""

    run: StageRun
    request: Request
    # the unit the lease is for; None for a lease that serves many (a pool worker)
    unit: Work | None = None
    # what the kind wants to remember with the lease (e.g. a reserved group)
    tag: Any = None
    ticket: Ticket | None = None
    grant: Grant | None = None
    placement: Placement | None = None
    work: list[Work] = field(default_factory=list)
    # in-flight calls: object ref (or a task's stream) → what its reply is to the kind
    calls: dict[Any, Any] = field(default_factory=dict)
    # an actor to kill, a task to cancel, when the lease ends
    actor: Any = None
    task: Any = None
    started: Started | None = None
    # until when Ray may take to start it, or the stopping unit may take to stop
    deadline: float | None = None
    # seconds its start may take from the grant (a kind may allow more, or less)
    start_bound: float = START_BOUND
    # why it is stopping: "preempted: REASON", "interrupted", "retired"
    stopping: str | None = None
    # its node left the cluster: its units go back to the queue without spending a retry
    node_left: bool = False
    closed: bool = False
    # when the scheduler granted it (wall clock): its start-up latency is measured from here
    granted_at: float = 0.0

    def watch(self, ref: Any, tag: Any = None) -> None:
        """Send `ref`'s reply (or each item of a task's stream) to the kind with `tag`."""
        self.calls[ref] = tag

    @property
    def node(self) -> str:
        return self.placement.node_ip if self.placement else "?"


class StageRun:
    """One stage while it runs: a kind subclasses this and fills in the hooks; the executor
    calls them. The base serves kinds whose every unit gets a lease of its own."""

    # how many times a unit that failed by its own fault runs again
    retries: int = 0
    # seconds a unit asked to stop gets before it is killed
    grace: float = 5.0
    # write a ledger row when a unit starts (coarse units) or only when it ends (pool items)
    running_rows: bool = True
    # what the stage's units are called in messages
    noun: str = "unit"

    def __init__(self, stage: StagePlan, ctx: RunContext, ex: Executor) -> None:
        self.stage, self.ctx, self.ex = stage, ctx, ex
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
        # seconds from each lease's grant to its process's start, and by unit for leases of
        # one unit, each attempt's (the stage's summary keeps them: the simulator replays
        # them, `runner.measured`)
        self.start_latencies: list[float] = []
        self.unit_latencies: dict[str, list[float]] = {}

    # --- the stage's units --------------------------------------------------------------

    def make_works(self, units: list[Unit]) -> list[Work]:
        """The units in the executor's hands from the start (a kind that feeds a million
        units lazily keeps them as plan units until they run, and makes none here)."""
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
        """Units that reached their final state together (`Executor.done_all`)."""
        for work in works:
            self.ended(work)

    def landed(self, lease: Lease, files: Mapping[str, bytes]) -> bool:
        """Write the files a task brought back in its reply (no shared filesystem) where they
        belong; False when the runner's side cannot take them: the run stops with the one
        storage message and the lease's unit is left for a rerun."""
        try:
            carry.land(files)
        except OSError as exc:
            where = Path(exc.filename) if isinstance(exc.filename, str) else None
            self.ctx.ledger.fail(storage_error(self.ctx.store.root, exc, where))
            self.ex.stopped(lease)
            return False
        return True

    # --- what a kind fills in ----------------------------------------------------------

    def prepare(self) -> None:
        """Before the first ask: files to write, groups to reserve."""

    def ask_for(self, work: Work) -> Lease:
        """The lease one unit needs (not yet asked for)."""
        raise NotImplementedError

    def launch(self, lease: Lease) -> None:
        """Start the lease's work on `lease.placement`; `lease.watch` what to wait for."""
        raise NotImplementedError

    def on_reply(self, lease: Lease, tag: Any, value: Any) -> None:
        """A call on the lease returned `value` (`Started` messages are handled already)."""
        raise NotImplementedError

    def on_failure(self, lease: Lease, tag: Any, error: str, lost: bool) -> None:
        """A call raised (`lost`: its worker or node died, no fault of the unit)."""
        self.ex.end_lease(lease)
        for work in lease.work:
            if lost:
                self.ex.lost(work, error, lease.node_left)
            else:
                self.ex.failed(work, error)

    def stop(self, lease: Lease) -> None:
        """Ask what runs on the lease to stop (it then replies, or is killed at the deadline)."""
        import ray

        if lease.task is not None:
            # a task that has already answered is not cancelled: Ray 2.60 can abort the driver
            # cancelling a task as it completes ("task that was not pending")
            done, _ = ray.wait([lease.task], timeout=0)
            if not done:
                ray.cancel(lease.task)

    def kill(self, lease: Lease) -> None:
        """End what runs on the lease now (an actor whose start was not heard yet: once Ray
        has made it, `ActorKills`)."""
        import ray

        if lease.actor is not None:
            up = lease.started is not None or self.ctx.stop.is_set()
            self.ex.kills.kill(lease.actor, now=up)
        if lease.task is not None:
            # a task that has answered (cancelled, failed, done) is not cancelled again: Ray
            # 2.60 aborts the driver force-cancelling a task whose reply is in ("Tried to
            # complete task that was not pending")
            done, _ = ray.wait([lease.task], timeout=0)
            if done:
                return
            try:
                ray.cancel(lease.task, force=True)
            except Exception as exc:  # finished meanwhile: nothing to cancel
                log.debug("cancel: %s", exc)

    def release(self, lease: Lease) -> None:
        """Give the lease's resources back."""
        if lease.grant is not None:
            self.ctx.scheduler.release(lease.grant)

    def saved_state(self, lease: Lease) -> Any:
        """The state of a preempted lease's unit, when the kind can ask for it."""
        return None

    def requeue(self, work: Work) -> None:
        """A unit is pending again (retry, preempted, lost): ask for it again."""
        self.queue.appendleft(work)

    def on_start(self, lease: Lease) -> None:
        """Ray started the lease's process (its units are RUNNING now)."""

    def on_preempt(self, lease: Lease, reason: str) -> None:
        """The scheduler chose the lease as a victim (it is asked to stop next)."""

    def tick(self) -> None:
        """Once per turn of the loop: output to show, work to hand out."""

    def close(self) -> None:
        """The stage is over (its leases are gone): remove what it made for itself."""

    def asks(self) -> Iterable[Lease]:
        """New leases to ask for: one per queued unit, as far as `cap` allows."""
        while self.queue and (self.cap is None or self.asked < self.cap):
            work = self.queue.popleft()
            if work.state.final:
                continue
            self.asked += 1
            yield self.ask_for(work)

    def lease_ended(self, lease: Lease) -> None:
        """Bookkeeping when one of this stage's leases ends."""
        if lease.unit is not None:
            self.asked -= 1

    def busy(self) -> bool:
        """Any unit not finished (idle leases left then are closed with the stage)."""
        return self.left > 0

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        """Results, merges, the stage's verdict."""
        return outcome

    def failure_budget(self) -> str | None:
        """Why the stage fails, by its units' end states (None: it succeeded)."""
        bad = [w for w in self.works if w.state in _BAD]
        if not bad:
            return None
        shown = ", ".join(f"{w.id} ({w.error})" for w in bad[:5]) + (" ..." if len(bad) > 5 else "")
        return f"{len(bad)} {self.noun}(s) did not complete: {shown}"


_BAD = (UnitState.failed, UnitState.timeout, UnitState.out_of_memory)


@dataclass
class _Live:
    """A running stage and its clock."""

    run: StageRun
    started_wall: float
    started: float
    skipped: int


class Executor:
    """Runs a plan's stages in dependency order, all of them in one loop on one thread."""

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
        self.live: dict[str, _Live] = {}
        self.pending_stages = list(plan.stages)
        self.waiting: dict[Ticket, Lease] = {}
        self.leases: set[Lease] = set()
        self.calls: dict[Any, Lease] = {}
        # leases whose task announces its start out of band, and where it does
        self.announced: dict[Lease, StartTo] = {}
        self.starts = Starts(ctx.store.root, plan.cluster.shared_fs)
        self.flagged: list[tuple[Grant, str]] = []
        self.rows: dict[tuple[str, str], UnitRow] = {}
        self.events: list[Event] = []
        self.last_flush = time.monotonic()
        # rows of coarse units that started or ended this turn: written before the next turn
        # launches anything (one transaction for all of them, not one per unit)
        self.urgent = False
        self.metrics_seen = 0.0
        self.nodes: list[RayNode] = []
        self.node_seen = 0.0
        self.cancel_seen = 0.0
        # set once stopping met a Ray that is gone: no Ray call is made after that
        self.ray_gone = False
        # actors of ended leases killed once they are up (`ActorKills`)
        self.kills = ActorKills()
        cluster = plan.cluster
        for i, node_id in enumerate(cluster.node_ids):
            parts = cluster.node_partitions[i] if cluster.node_partitions else frozenset()
            self.nodes.append(RayNode(node_id, cluster.node_ips[i], cluster.nodes[i], parts))

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> dict[str, StageOutcome]:
        try:
            while self._start_stages() or self.live:
                if self.ctx.stop.is_set():
                    break
                self._ask()
                self._admit()
                self._preemptions()
                self._wait()
                self.kills.reap()
                self._listen()
                for live in list(self.live.values()):
                    live.run.tick()
                self._deadlines()
                self._cancel_requests()
                self._refresh_nodes()
                self._conclude_stages()
                self._flush()
        finally:
            self._shutdown()
        return self.outcomes

    def _start_stages(self) -> bool:
        """Start every stage whose needs have finished; True while any stage is still to run."""
        for name in list(self.pending_stages):
            if self.ctx.stop.is_set():
                self.pending_stages.remove(name)
                continue
            needs = self.pipeline.stages[name].needs
            if any(n in self.pending_stages or n in self.live for n in needs):
                continue
            self.pending_stages.remove(name)
            failed = [n for n in needs if not self.outcomes[n].ok]
            if failed:
                self._blocked(name, failed)
            else:
                self._open(name)
        return bool(self.pending_stages)

    def _open(self, name: str) -> None:
        stage = self.plan.stages[name]
        if stage.units is None:
            stage = self._replan(name)
        record = self.ctx.ledger.stage(name)
        started_wall = time.time()
        self.ctx.ledger.save_stage(
            name,
            stage.kind,
            stage.fingerprint,
            record.config if record else stage.config,
            "running",
            started_wall,
        )
        for note in stage.notes:
            log.info(note)
        try:
            run = self.kinds[stage.kind].open(stage, self.ctx, self)
        except Exception as exc:  # the stage cannot start; the others go on
            log.exception("stage %s could not start", name)
            self.outcomes[name] = StageOutcome(
                name, stage.kind, ok=False, message=f"could not start: {exc}"
            )
            return
        total = len(stage.units or [])
        self.live[name] = _Live(run, started_wall, time.monotonic(), total - run.size)
        self.ctx.progress.start(name, run.left)
        try:
            run.prepare()
        except StorageError as exc:  # an input part it writes: the run stops, one message
            self.ctx.ledger.fail(exc)
            self._close_stage(name, message=str(exc))
        except Exception as exc:
            log.exception("stage %s could not start", name)
            self._close_stage(name, message=f"could not start: {exc}")

    def _replan(self, name: str) -> StagePlan:
        spec = self.pipeline.stages[name]
        upstream = {n: self.plan.stages[n] for n in spec.needs}
        ctx = PlanContext(self.plan.cluster, self.ctx.ledger, self.fresh, upstream)
        stage: StagePlan = self.kinds[spec.kind].plan(name, spec, self.pipeline.raw[name], ctx)
        self.plan.stages[name] = stage
        return stage

    def _blocked(self, name: str, failed: list[str]) -> None:
        stage = self.plan.stages[name]
        message = f"not run: needs {', '.join(failed)}, which did not succeed"
        log.error("stage %s %s", name, message)
        self.outcomes[name] = StageOutcome(name, stage.kind, ok=False, message=message)

    # --- asking and granting -------------------------------------------------------------

    def _ask(self) -> None:
        for live in self.live.values():
            for lease in live.run.asks():
                self.submit(lease)

    def submit(self, lease: Lease) -> Lease:
        """Queue a lease's request with the scheduler; the lease starts when it is granted."""
        if lease.unit is not None:
            lease.work.append(lease.unit)
        owner = f"{lease.run.name}/{lease.unit.id if lease.unit else 'worker'}"
        (lease.ticket,) = self.ctx.scheduler.submit(lease.request, (owner,), self._flag)
        self.waiting[lease.ticket] = lease
        return lease

    def lend(self, lease: Lease, lender: Grant, group: Any) -> Lease:
        """Run the lease's unit at once on what another lease of its stage holds (a reserved
        placement group, `group`): the unit gets a grant of its own over those resources,
        preemptible by the normal rules like any other (`Scheduler.lend`)."""
        assert lease.unit is not None
        lease.work.append(lease.unit)
        owner = f"{lease.run.name}/{lease.unit.id}"
        grant = self.ctx.scheduler.lend(lender, lease.request, owner, self._flag)
        self.place(lease, grant, group)
        return lease

    def withdraw(self, lease: Lease) -> None:
        """An ask no longer wanted (not yet granted)."""
        if lease.ticket is not None and lease.ticket in self.waiting:
            del self.waiting[lease.ticket]
            self.ctx.scheduler.withdraw(lease.ticket)

    def _flag(self, grant: Grant, reason: str) -> None:
        """Told by the scheduler, under its lock, that a grant is a victim: only note it."""
        self.flagged.append((grant, reason))

    def _admit(self) -> None:
        for ticket in self.ctx.scheduler.admit():
            lease = self.waiting.pop(ticket, None)
            if lease is None:
                continue
            assert ticket.grant is not None
            self.place(lease, ticket.grant)

    def place(self, lease: Lease, grant: Grant, group: Any = None) -> None:
        """A granted lease: its placement on the chosen node, then the kind launches on it."""
        lease.grant, lease.granted_at = grant, time.time()
        node = self.nodes[grant.node] if grant.node < len(self.nodes) else None
        lease.placement = Placement(
            node.node_id if node else "", node.ip if node else "", grant.resources, group
        )
        for work in lease.work:
            work.go(UnitState.granted)
        self.leases.add(lease)
        lease.run.leases.add(lease)
        lease.deadline = time.monotonic() + lease.start_bound
        try:
            lease.run.launch(lease)
        except Exception as exc:
            log.warning("%s: could not launch on %s: %s", lease.run.name, lease.node, exc)
            self.end_lease(lease)
            for work in lease.work:
                work.go(UnitState.running)
                self.finish(work, UnitState.failed, error=f"could not launch: {exc}")
            return
        for ref in lease.calls:
            self.calls[ref] = lease

    def watch(self, lease: Lease, ref: Any, tag: Any = None) -> None:
        """A further call on a running lease."""
        lease.watch(ref, tag)
        self.calls[ref] = lease

    # --- waiting and replies -------------------------------------------------------------

    def _wait(self, timeout: float = WAIT_SECONDS) -> None:
        import ray

        if not self.calls:
            self.ctx.stop.wait(0.01 if self.waiting else timeout)
            return
        refs = list(self.calls)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            self._deliver(ref)

    def _deliver(self, ref: Any) -> None:
        import ray

        lease = self.calls.get(ref)
        if lease is None:
            return
        tag = lease.calls.get(ref)
        self._forget(ref)
        if lease in self.announced:  # it ended before its start was read: read it first
            self._hear(lease, ended=True)
        try:
            value = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            if lease.stopping is None:
                lease.stopping = "cancelled"
            self._stopped(lease)
            return
        except ray.exceptions.RayTaskError as exc:
            if lease.stopping is not None:  # it was asked to stop, and did (by raising)
                self._stopped(lease)
                return
            if not lease.closed:
                lease.run.on_failure(lease, tag, error_line(exc), lost=False)
            return
        except ray.exceptions.RayError as exc:  # its worker or node died
            if lease.stopping is not None:
                self._stopped(lease)
                return
            self._refresh_nodes(force=True)  # a node that died takes its leases with it
            if not lease.closed:
                lease.node_left |= isinstance(exc, ray.exceptions.NodeDiedError)
                lease.run.on_failure(lease, tag, _lost_reason(lease, exc), lost=True)
            return
        if isinstance(value, Started):
            self._started(lease, value)
            return
        if not lease.closed:
            lease.run.on_reply(lease, tag, value)

    def start_to(self, lease: Lease) -> StartTo:
        """Where the lease's task announces its start (`placement.announce`): a file under the
        run directory, or the run's inbox actor without a shared filesystem; heard each turn
        of the loop."""
        to = self.starts.address()
        self.announced[lease] = to
        return to

    def _hear(self, lease: Lease, ended: bool = False) -> None:
        where = self.starts.heard(self.announced[lease], ended)
        if where is not None:
            del self.announced[lease]
            self._started(lease, where)

    def _listen(self) -> None:
        """Hear the starts tasks announced since the last turn."""
        if not self.announced:
            return
        self.starts.turn()
        for lease in list(self.announced):
            if lease.closed:
                self.starts.forget(self.announced.pop(lease))
            else:
                self._hear(lease)

    def _forget(self, ref: Any) -> None:
        lease = self.calls.pop(ref, None)
        if lease is not None:
            lease.calls.pop(ref, None)

    def _started(self, lease: Lease, where: Started) -> None:
        """Ray really started the lease's process: its units run from now, on that node."""
        lease.started = where
        latency = max(0.0, where.time - lease.granted_at)
        lease.run.start_latencies.append(latency)
        by_unit = lease.run.unit_latencies
        if len(lease.work) == 1 and (lease.work[0].id in by_unit or len(by_unit) < MEASURED_UNITS):
            by_unit.setdefault(lease.work[0].id, []).append(round(latency, 4))
        for work in lease.work:
            self.running(work, where)
        if lease.stopping is None:
            lease.deadline = None
            lease.run.on_start(lease)

    def running(self, work: Work, where: Started, at: float | None = None) -> None:
        """A unit runs from `at` (default: when its process said so) on `where`'s node."""
        if work.state is UnitState.pending:
            work.go(UnitState.granted)
        work.go(UnitState.running)
        work.attempts += 1
        work.started, work.ended, work.error = at or where.time, None, None
        work.node_id, work.node_ip, work.worker = where.node_id, where.node_ip, where.worker
        live = self.live.get(work.stage)
        if live is not None and live.run.running_rows:  # a coarse unit: on disk as it starts
            self._row(work)
            self.urgent = True

    def running_all(self, works: Sequence[Work], where: Started, at: float) -> None:
        """`running` for units handed to one worker together (a pool batch: no ledger row
        until they end), in one call: a batch of thousands pays no call per unit."""
        if works and self.live[works[0].stage].run.running_rows:
            raise TypeError("running_all is for units written only when they end")
        pending, granted, running = UnitState.pending, UnitState.granted, UnitState.running
        node_id, node_ip, worker = where.node_id, where.node_ip, where.worker
        for work in works:
            if work.state is not pending and work.state is not granted:
                work.go(running)  # raises: a unit running already, or ended
            work.state = running
            work.attempts += 1
            work.started, work.ended, work.error = at, None, None
            work.node_id, work.node_ip, work.worker = node_id, node_ip, worker

    # --- how units end --------------------------------------------------------------------

    def done_all(
        self,
        works: Sequence[Work],
        results: Sequence[Any],
        seconds: Sequence[float],
        ends: Sequence[float],
    ) -> None:
        """`finish(work, done, result, started=end - seconds, ended=end)` for running units
        whose ends were heard together (a pool batch's reply, each item's own end): the
        stage and the progress told once. Kept lean: for a million trivial items this is most
        of the driver's work."""
        if not works:
            return
        running, done = UnitState.running, UnitState.done
        name = works[0].stage
        rows = self.rows
        for work, result, took, end in zip(works, results, seconds, ends, strict=True):
            if work.state is not running:
                work.go(done)  # raises: a unit not running cannot end done
            work.state = done
            work.result, work.error, work.started, work.ended = result, None, end - took, end
            rows[(name, work.unit.id)] = work.row()
        self.live[name].run.ended_all(works)
        self.ctx.progress.advance(name, done=len(works))

    def finish(
        self,
        work: Work,
        state: UnitState,
        result: Any = None,
        error: str | None = None,
        started: float | None = None,
        ended: float | None = None,
    ) -> None:
        """A unit's final state."""
        if work.state is UnitState.pending:
            work.go(UnitState.granted)
        if work.state is UnitState.granted and state is not UnitState.cancelled:
            work.go(UnitState.running)
        work.go(state)
        live = self.live[work.stage]
        live.run.ended(work)
        # a cancelled unit keeps the state it saved when preempted: the next run restores it
        if result is not None or state is not UnitState.cancelled:
            work.result = result
        work.error = error
        work.started = started if started is not None else work.started
        work.ended = ended if ended is not None else time.time()
        self._row(work)
        if live.run.running_rows:  # a coarse unit: its end is on disk before anything else
            self.urgent = True
        self.ctx.progress.ended(work.stage, state)

    def failed(self, work: Work, error: str, state: UnitState = UnitState.failed) -> None:
        """The unit's own failure: run it again while retries last, else it ends `state`."""
        run = self.live[work.stage].run
        if work.attempts <= run.retries and not self.ctx.stop.is_set():
            log.warning(
                "%s: %s failed (%s); retrying (attempt %d of %d)",
                work.stage,
                work.id,
                error,
                work.attempts + 1,
                run.retries + 1,
            )
            self.event(work, "retry", error)
            self._pending(work, error)
            return
        self.finish(work, state, error=error)

    def lost(self, work: Work, error: str, node_left: bool = False) -> None:
        """Its worker or node died: queued again without spending a retry when its node left;
        a worker that died on a live node spends one (it may be the unit that killed it)."""
        if self.ctx.stop.is_set():
            self.finish(work, UnitState.cancelled, error="cancelled")
            return
        if node_left:
            self.requeue_free(work, error)
            return
        work.suspect = True
        self.failed(work, error)

    def requeue_free(self, work: Work, reason: str) -> None:
        """It cannot run where it landed (e.g. GPUs short of free memory), no fault of its own:
        pending again with the reason, and the attempt does not count against its retries."""
        if self.ctx.stop.is_set():
            self.finish(work, UnitState.cancelled, error="cancelled")
            return
        if work.state is UnitState.running:  # the attempt it started is not counted
            work.attempts -= 1
        self.event(work, "retry", reason)
        self._pending(work, reason)

    def preempted(self, work: Work, reason: str, saved: Any) -> None:
        """A victim is out: its state kept, pending again."""
        if work.state is not UnitState.granted:  # a grant not started yet: just pending again
            work.go(UnitState.preempted)
            self.event(work, "attempt", "preempted", started=work.started)
        work.saved = saved if saved is not None else work.saved
        # in the ledger too while the unit is not done: a restarted runner restores it
        work.result = saved_state.as_result(work.stage, work.id, work.saved)
        self._row(work)
        self._pending(work, None)
        if self.live[work.stage].run.running_rows:
            self.urgent = True

    def back(self, work: Work) -> None:
        """A unit handed out but not started by its worker: queued again, no attempt spent."""
        work.attempts -= 1
        work.go(UnitState.pending)
        self.live[work.stage].run.requeue(work)

    def record(self, work: Work) -> None:
        """Write the unit's current state with the next batch of ledger rows."""
        self._row(work)

    def _pending(self, work: Work, error: str | None) -> None:
        work.go(UnitState.pending)
        work.error = error
        self.live[work.stage].run.requeue(work)
        if self.live[work.stage].run.running_rows:
            self._row(work)

    def event(
        self, work: Work, kind: str, detail: str | None, started: float | None = None
    ) -> None:
        self.events.append(
            Event(work.stage, work.id, kind, time.time(), work.worker, detail, started)
        )

    # --- leases ending -------------------------------------------------------------------

    def end_lease(self, lease: Lease, kill: bool = False) -> None:
        """The lease is done: forget its calls, kill what runs (if asked), free its resources."""
        if lease.closed:
            return
        lease.closed = True
        for ref in list(lease.calls):
            self.calls.pop(ref, None)
        lease.calls.clear()

        def let_go() -> None:
            if kill:
                try:
                    lease.run.kill(lease)
                except Exception as exc:  # Ray gone or the process already dead
                    log.debug("kill: %s", exc)
            lease.run.release(lease)

        self._on_ray(let_go)
        self.leases.discard(lease)
        lease.run.leases.discard(lease)
        lease.run.lease_ended(lease)

    def _on_ray(self, clean_up: Callable[[], None]) -> None:
        """Run a lease's Ray clean-up (kill its actor, remove its groups). Once the run is
        stopping, a signal to the whole process group may be taking the embedded Ray down: a
        call to a GCS that is gone blocks for a minute (Ray's reconnect timeout), so the call is
        bounded, and skipped once Ray is seen gone (its processes are then ended by pid)."""
        if not self.ctx.stop.is_set():
            clean_up()
            return
        if not self._ray_up():
            return
        if not bounded(clean_up, CLEANUP_BOUND):
            log.warning("Ray did not answer while a lease was given back; going on without it")
            self.ray_gone = True

    def _ray_up(self) -> bool:
        """Whether Ray may still be asked anything (see `cluster.ray_alive`)."""
        self.ray_gone = self.ray_gone or not ray_alive()
        return not self.ray_gone

    def stop_lease(self, lease: Lease, why: str, grace: float) -> None:
        """Ask the lease's work to stop; killed after `grace` seconds."""
        if lease.stopping is not None or lease.closed:
            return
        lease.stopping = why
        lease.deadline = time.monotonic() + grace
        try:
            lease.run.stop(lease)
        except Exception as exc:  # Ray gone: the deadline kills it
            log.debug("stop: %s", exc)

    def stopped(self, lease: Lease) -> None:
        """A stopping lease's work replied that it stopped."""
        self._stopped(lease)

    def _stopped(self, lease: Lease) -> None:
        """A stopping lease's work is out (replied, cancelled, or killed at its deadline)."""
        why = lease.stopping or "cancelled"
        saved = lease.run.saved_state(lease) if why.startswith("preempted") else None
        self.end_lease(lease, kill=True)
        for work in lease.work:
            if work.state.final:
                continue
            if why.startswith("preempted") and not self.ctx.stop.is_set():
                self.preempted(work, why, saved)
            else:
                self.finish(work, UnitState.cancelled, error="cancelled")

    def _preemptions(self) -> None:
        flagged, self.flagged = self.flagged, []
        for grant, reason in flagged:
            lease = next((x for x in self.leases if x.grant is grant), None)
            if lease is None:
                continue
            for work in lease.work:
                self.event(work, "preempted", reason)
            lease.run.on_preempt(lease, reason)
            self.stop_lease(lease, f"preempted: {reason}", lease.run.grace)
            if lease.started is None:  # not running yet: nothing to save, end it now
                self._stopped(lease)

    def _deadlines(self) -> None:
        now = time.monotonic()
        for lease in list(self.leases):
            if lease.deadline is None or now <= lease.deadline or lease.closed:
                continue
            if lease.stopping is not None:
                self._stopped(lease)
                continue
            # granted, but Ray never started it on that node: give the grant back
            log.warning(
                "%s: Ray did not start %s on node %s within %gs; queued again",
                lease.run.name,
                ", ".join(w.id for w in lease.work) or "a worker",
                lease.node,
                lease.start_bound,
            )
            self.end_lease(lease, kill=True)
            for work in lease.work:
                work.go(UnitState.pending)
                work.error = f"not started on {lease.node} within {lease.start_bound:g}s"
                self.event(work, "retry", work.error)  # a requeue, counted with the others
                lease.run.requeue(work)

    # --- units cancelled from outside (`mode=cancel`) --------------------------------------

    def _cancel_requests(self) -> None:
        """Answer the cancel requests left in the run directory: stop each named unit."""
        now = time.monotonic()
        if now - self.cancel_seen < CANCEL_EVERY:
            return
        self.cancel_seen = now
        for request in cancel.pending(self.ctx.store.root):
            for stage, unit in request.resolve({n: live.run for n, live in self.live.items()}):
                work = self.live[stage].run.find(unit)
                if work is not None:
                    self.cancel(work)

    def cancel(self, work: Work) -> None:
        """Stop one unit with its stage's grace and record it CANCELLED: a lease of its own is
        stopped; one that serves many (a pool worker) goes on, and the kind drops the unit's
        reply; a unit still waiting ends at once."""
        if work.state.final:
            return
        log.info("%s: cancelling %s", work.stage, work.id)
        for lease in list(self.leases):
            if lease.unit is work:
                self.stop_lease(lease, "cancelled", lease.run.grace)
                return
        for lease in list(self.waiting.values()):
            if lease.unit is work:
                self.withdraw(lease)
                lease.run.lease_ended(lease)
        run = self.live[work.stage].run
        if work in run.queue:
            run.queue.remove(work)
        self.finish(work, UnitState.cancelled, error="cancelled")

    # --- the cluster changing under us ---------------------------------------------------

    def _refresh_nodes(self, force: bool = False) -> None:
        """Follow Ray's membership: a node that left takes its leases' units back to the queue;
        a node that joined becomes schedulable."""
        now = time.monotonic()
        if not self.nodes or (now - self.node_seen < NODES_EVERY and not force):
            return
        if self.ctx.stop.is_set() or not ray_alive():
            # stopping: a worker that died may be the embedded Ray going down with the signal,
            # and `ray.nodes()` against a GCS going down aborts the driver (Ray 2.60 checks it)
            return
        self.node_seen = now
        try:
            alive = {n.node_id: n for n in live_nodes()}
        except Exception as exc:  # GCS unreachable for a moment: try again later
            log.debug("ray.nodes(): %s", exc)
            return
        for i, node in enumerate(self.nodes):
            if node.node_id not in alive and node.capacity != Resources():
                log.warning("node %s left the cluster; its units are queued again", node.ip)
                self.ctx.scheduler.set_capacity(i, Resources())
                self.nodes[i] = RayNode(node.node_id, node.ip, Resources())
                for lease in [x for x in self.leases if x.grant is not None and x.grant.node == i]:
                    lease.node_left = True
                    lease.run.on_failure(lease, None, f"node {node.ip} left the cluster", True)
        known = {n.node_id for n in self.nodes}
        for node_id, node in alive.items():
            if node_id not in known:
                log.info("node %s joined the cluster: %s", node.ip, node.capacity.describe())
                self.ctx.scheduler.add_node(node.capacity)
                self.nodes.append(node)

    # --- stages ending ---------------------------------------------------------------------

    def _conclude_stages(self) -> None:
        for name, live in list(self.live.items()):
            if not live.run.busy():
                self._close_stage(name)

    def _close_stage(self, name: str, message: str = "", interrupted: bool = False) -> None:
        live = self.live[name]
        run, stage = live.run, live.run.stage
        for lease in list(self.waiting.values()):
            if lease.run is run:
                self.withdraw(lease)

        def close() -> None:
            try:
                run.close()
            except Exception as exc:  # Ray gone: nothing left to remove
                log.debug("close %s: %s", name, exc)

        for lease in list(run.leases):
            self.end_lease(lease, kill=self._ray_up())
        self._on_ray(close)
        for work in run.unfinished():
            self.finish(work, UnitState.cancelled, error="cancelled")
        self._flush(force=True)
        del self.live[name]
        counts = run.counts()
        outcome = StageOutcome(
            name,
            stage.kind,
            total=len(stage.units or []),
            done=counts[UnitState.done],
            failed=counts[UnitState.failed] + counts[UnitState.out_of_memory],
            timeout=counts[UnitState.timeout],
            cancelled=counts[UnitState.cancelled],
            skipped=live.skipped,
            wall=time.monotonic() - live.started,
            interrupted=interrupted or self.ctx.stop.is_set(),
        )
        if run.start_latencies:
            outcome.start_latency = statistics.fmean(run.start_latencies)
            outcome.start_latencies = run.unit_latencies
        if message:
            outcome.ok, outcome.message = False, message
        elif outcome.interrupted:
            outcome.ok = False
        else:
            try:
                outcome = run.conclude(outcome)
            except StorageError as exc:  # an output it writes: the run stops, one message
                self.ctx.ledger.fail(exc)
                outcome.ok, outcome.interrupted, outcome.message = False, True, str(exc)
            except Exception as exc:
                log.exception("stage %s could not conclude", name)
                outcome.ok, outcome.message = False, f"crashed: {exc!r}"
        self.ctx.progress.finish(name)
        record = self.ctx.ledger.stage(name)
        state = "interrupted" if outcome.interrupted else "done" if outcome.ok else "failed"
        # the config is recorded only once the stage has seen all its units through, so an
        # interrupted run still explains the next plan's reruns as `changed: <key>`
        config = stage.config if not outcome.interrupted or record is None else record.config
        # every unit of the plan done: the next plan of this stage need not read them
        whole = state == "done" and outcome.done + outcome.skipped == outcome.total
        units = stage.units or []
        self.ctx.ledger.save_stage(
            name,
            stage.kind,
            stage.fingerprint,
            config,
            state,
            live.started_wall,
            time.time(),
            _recorded(run, outcome),
            units_digest([u.id for u in units], [u.fingerprint for u in units]) if whole else None,
        )
        for unit in units:  # now upstream data for the stages that need this one
            unit.run = False
        self.outcomes[name] = outcome
        if not outcome.ok and not outcome.interrupted:
            log.error("stage %s failed: %s", name, outcome.message)

    def _shutdown(self) -> None:
        """Stop every lease with its stage's grace, kill what is left, close every stage."""
        if self.ctx.stop.is_set() and self.leases:
            # a signal to the whole process group reaches the embedded Ray's own processes at
            # the same moment: let them go before deciding whether Ray is still there to ask
            time.sleep(SIGNAL_SETTLE)
        alive = self._ray_up()
        for lease in list(self.waiting.values()):
            self.withdraw(lease)
        if alive:
            for lease in list(self.leases):
                self.stop_lease(lease, "interrupted", lease.run.grace)
            # every lease has a deadline now; this bound only guards against one that has not
            bound = time.monotonic() + max((x.run.grace for x in self.leases), default=0) + 10
            while any(not x.closed for x in self.leases) and time.monotonic() < bound:
                self._wait()
                now = time.monotonic()
                for lease in list(self.leases):
                    if lease.deadline is not None and now > lease.deadline:
                        self._stopped(lease)
                self._flush()
                if not self._ray_up():
                    break
            # a signal to the whole group may take the embedded Ray down only now, under load:
            # then no lease is killed through it (a call to a dead GCS blocks for a minute)
            alive = self._ray_up()
        for lease in list(self.leases):
            lease.stopping = lease.stopping or "interrupted"
            if alive:
                self._stopped(lease)
            else:  # Ray is gone (SIGTERM to the whole group): nothing to ask; the processes
                # its workers leave behind are ended by pid (they are in a group of their own)
                self.end_lease(lease)
                where = lease.started
                if where is not None and where.local and procs.alive_since(where.pid, where.time):
                    procs.kill_tree(where.pid, grace=ORPHAN_GRACE)
                for work in lease.work:
                    if not work.state.final:
                        self.finish(work, UnitState.cancelled, error="cancelled")
        for name in list(self.live):
            self._close_stage(name, interrupted=True)
        for name in self.pending_stages:
            stage = self.plan.stages[name]
            self.outcomes[name] = StageOutcome(name, stage.kind, ok=False, interrupted=True)
        self.pending_stages = []
        self._flush(force=True)
        # actors still coming up: killed once up (at most CLOSE_BOUND), at once when stopping
        self._on_ray(lambda: self.kills.close(0.0 if self.ctx.stop.is_set() else CLOSE_BOUND))
        if self._ray_up() and not bounded(self.starts.close, CLOSE_BOUND):
            log.warning("Ray did not answer while the run's inbox was removed")

    # --- the ledger ------------------------------------------------------------------------

    def _row(self, work: Work) -> None:
        self.rows[(work.stage, work.id)] = work.row()

    def _flush(self, force: bool = False) -> None:
        """Write the rows and events gathered so far: when `force`d (a stage closing, the run
        ending), at the end of a turn in which a coarse unit started or ended (`urgent`: its
        row is on disk before the next turn launches anything), else at most FLUSH_SECONDS
        apart. The metrics gauges follow at most every METRICS_EVERY, or when forced."""
        due = time.monotonic() - self.last_flush >= FLUSH_SECONDS
        if not (force or due or self.urgent or len(self.rows) >= FLUSH_ROWS):
            return
        self.urgent = False
        if self.rows:
            self.ctx.ledger.write(list(self.rows.values()))
            self.rows = {}
        if self.events:
            self.ctx.ledger.add_events(self.events)
            self.events = []
        self.last_flush = time.monotonic()
        if self.last_flush - self.metrics_seen < METRICS_EVERY and not force:
            return
        self.metrics_seen = self.last_flush
        for name, live in self.live.items():
            REGISTRY.set_units(name, {s.value: n for s, n in live.run.counts().items()})
        capacity = Resources()
        for node in self.ctx.scheduler.nodes:
            capacity = capacity + node
        REGISTRY.set_resources(capacity - self.ctx.scheduler.free(), capacity)


def _recorded(run: StageRun, outcome: StageOutcome) -> dict[str, Any] | None:
    """The stage's outcome as the ledger records it; none for an attempt that ran none of its
    units, so the stage keeps what the last attempt that ran it recorded."""
    return asdict(outcome) if run.size else None


def _lost_reason(lease: Lease, exc: BaseException) -> str:
    return f"its Ray worker died on {lease.node} ({type(exc).__name__}): {error_line(exc)}"


def allowed_failures(max_failures: float, total: int) -> int:
    """A count (>= 1) or a fraction of the stage's units (< 1)."""
    if max_failures < 1:
        return math.floor(max_failures * total + 1e-9)
    return int(max_failures)
