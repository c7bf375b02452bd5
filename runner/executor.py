"""The one unit loop: every stage's work, one wait, one place for each fault, on any backend.

A kind is a `StageRun` whose hooks hand back verdicts (`verdicts.py`); the `Executor` owns the
rest for all running stages at once, on one thread, against a backend (`backend.py`): Ray for
a real run, virtual time for `cluster=sim`, none for a rerun with nothing to launch. It never
imports Ray.

- **asks → grants → placements**: a kind's `Ask` becomes a scheduler ticket; a grant becomes a
  `Lease` whose `Placement` names the node the scheduler chose, and the kind's `Remote` is
  started there, so the cluster runs it where the runner decided.
- **running means running**: a unit is RUNNING when its process says so (`Began`), with the
  node it really runs on (a job that ends at once says it in its reply; one that raised or
  lost its worker before it said it ran all the same, and spends its attempt). A lease the
  cluster does not start within its bound goes back to the queue with the reason, without
  spending a retry.
- **one wait**: `Backend.wait` over everything in flight, until the next deadline or the next
  time a stage asked to be woken; replies go to the kind.
- **retries, lost workers, nodes that leave**: a unit whose worker died is queued again (a lost
  node costs no retry); a kind's own failure spends a retry, then fails.
- **cancel with grace and preemption**: the scheduler flags victims; the kind is asked to stop,
  given its grace (and a last call), then killed; the unit goes PREEMPTED → PENDING with its
  saved state. SIGINT/SIGTERM stops every lease the same way and records CANCELLED.
- **never a wait without end**: units that cannot be admitted while nothing runs, nothing is in
  flight and nothing is due fail with the reason, instead of waiting for ever.
- **ledger**: rows batched (at most `FLUSH_SECONDS` apart), events for the timeline.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar, cast

from runner import cancel, saved_state
from runner.backend import Backend, Began, Happened, Replied
from runner.cluster import RayNode
from runner.errors import StorageError
from runner.kind import RunContext, StageKind, StageOutcome, StageRun
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.placement import Placement, Started
from runner.plan import Plan, PlanContext, StagePlan, units_digest
from runner.resources import Resources, total
from runner.scheduler.core import Grant, Scheduler, Ticket
from runner.scheduler.metrics import REGISTRY
from runner.spec import Pipeline
from runner.store import Event, UnitRow
from runner.verdicts import (
    Back,
    Cancel,
    Done,
    DoneAll,
    End,
    Ended,
    Fail,
    Failed,
    Launch,
    Lend,
    Lost,
    Note,
    Park,
    Record,
    Release,
    RemoveGroup,
    Requeue,
    Running,
    Send,
    SetQuota,
    Stopped,
    Verdict,
    Withdraw,
)

log = logging.getLogger(__name__)

# ledger rows are written at most this far apart (a SIGKILL loses at most this much work)
FLUSH_SECONDS, FLUSH_ROWS = 0.2, 5000
# ... and a coarse unit's start or end (a job, a shard, a replica) at most this late: one
# transaction for all that started or ended meanwhile (one per turn was a tenth of the
# driver's time per trivial job)
URGENT_SECONDS = 0.05
# how often the metrics gauges (units by state, resources granted) are brought up to date
METRICS_EVERY = 1.0
# the longest single wait on a real cluster: signals and deadlines are looked at this often
WAIT_SECONDS = 0.1
# how often `mode=cancel` requests are looked for in the run directory
CANCEL_EVERY = 0.5
# seconds between looks for units that wait for a reason nothing running can change
STUCK_EVERY = 1.0
# units whose start-up latencies a stage's summary keeps one by one (the mean covers all)
MEASURED_UNITS = 10_000
# a small plan's units are listed in the order they started (the simulated run's report)
SHOWN_STARTS = 20
# held while a loop changes the cluster's membership (its scheduler and nodes may be shared)
_MEMBERSHIP = threading.Lock()
# grants a unit (or a stage's worker leases, one after another) may get that the cluster does
# not start within their bound before the unit fails (the stage, for workers) naming why
START_TRIES = 3


@dataclass
class Live:
    """A running stage: its run, its clock, and what the loop saw of it."""

    run: StageRun
    started_wall: float
    started: float
    skipped: int
    # seconds from each lease's grant to its process's start (the stage's summary keeps them:
    # the simulator replays them, `runner.measured`), and by unit for leases of one unit
    start_latencies: list[float] = field(default_factory=list)
    unit_latencies: dict[str, list[float]] = field(default_factory=dict)
    asked: int = 0
    shape: str = ""
    leases: int = 0
    running: int = 0
    peak: int = 0
    requeues: int = 0
    preempted: Counter[str] = field(default_factory=Counter)


class Executor:
    """Runs a plan's stages in dependency order, all of them in one loop on one thread."""

    def __init__(
        self,
        plan: Plan,
        pipeline: Pipeline,
        kinds: Mapping[str, StageKind],
        ctx: RunContext,
        scheduler: Scheduler,
        backend: Backend,
        shared: bool = False,
    ) -> None:
        self.plan, self.pipeline, self.kinds, self.ctx = plan, pipeline, kinds, ctx
        self.scheduler, self.backend = scheduler, backend
        # a scheduler (and `ctx.nodes`) shared with other loops (a sweep's jobs): this loop's
        # tickets are known by it, and membership changes are made once for all
        self.tenant: object = self if shared else None
        self.gone: set[str] = set()
        self.clock, self.wall = backend.clock, backend.wall
        # what the loop does for each type of verdict (`_verdicts`; a subclass's, once met)
        self._appliers: dict[type, Callable[[Verdict], None]] = self._verdicts()
        self.outcomes: dict[str, StageOutcome] = {}
        self.live: dict[str, Live] = {}
        self.pending_stages = list(plan.stages)
        self.waiting: dict[Ticket, Lease] = {}
        self.leases: set[Lease] = set()
        self.by_grant: dict[Grant, Lease] = {}
        self.flagged: list[tuple[Grant, str]] = []
        # grants in a row not started within their bound: by unit, or by stage for the leases
        # of no unit (a pool's workers); forgotten once one starts
        self.unstarted: Counter[Work | str] = Counter()
        self.rows: dict[tuple[str, str], UnitRow] = {}
        self.events: list[Event] = []
        # the ledger is written for a real run only (a simulated one has nothing to resume)
        self.keep_rows = not ctx.virtual
        self.last_flush = self.clock()
        # rows of coarse units that started or ended since the last write (`URGENT_SECONDS`)
        self.urgent = False
        self.metrics_seen = -math.inf
        self.cancel_seen = -math.inf
        self.stuck_seen = -math.inf
        # something moved this turn (a grant, an event): no need to look for stuck units
        self.moved = True
        # what ran when: the makespan, the order of a small plan's starts, the busy resources
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.starts: list[str] | None = (
            [] if sum(len(s.units or []) for s in plan.stages.values()) <= SHOWN_STARTS else None
        )
        self.busy = Resources()
        self.nodes = ctx.nodes
        if not self.nodes:
            self.nodes += plan.cluster.ray_nodes()

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> dict[str, StageOutcome]:
        try:
            while self._start_stages() or self.live:
                if self.ctx.stop.is_set():
                    break
                self.moved = False
                self._ask()
                self._admit()
                self._preemptions()
                self._wait()
                for live in list(self.live.values()):
                    self._apply_all(live.run.tick())
                self._deadlines()
                self._cancel_requests()
                self._refresh_nodes()
                self._conclude_stages()
                self._look_for_stuck()
                self._flush()
        finally:
            self._shutdown()
        return self.outcomes

    def _start_stages(self) -> bool:
        """Start every stage whose needs have finished; True while any stage is still to run."""
        for name in list(self.pending_stages):
            if self.ctx.stop.is_set():  # none starts: those left are told at the shutdown
                break
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
        started_wall = self.wall()
        if self.keep_rows:
            config = record.config if record else stage.config
            self.ctx.ledger.save_stage(
                name, stage.kind, stage.fingerprint, config, "running", started_wall
            )
        for note in stage.notes:
            log.info(note)
        try:
            run = self.kinds[stage.kind].open(stage, self.ctx)
        except Exception as exc:  # the stage cannot start; the others go on
            log.exception("stage %s could not start", name)
            self.outcomes[name] = StageOutcome(
                name, stage.kind, ok=False, message=f"could not start: {exc}"
            )
            return
        total = len(stage.units or [])
        self.live[name] = Live(run, started_wall, self.clock(), total - run.size)
        self.ctx.progress.start(name, run.left)
        try:
            self._apply_all(run.prepare())
        except StorageError as exc:  # an input part it writes: the run stops, one message
            self.ctx.ledger.fail(exc)
            self._close_stage(name, message=str(exc))
        except Exception as exc:
            log.exception("stage %s could not start", name)
            self._close_stage(name, message=f"could not start: {exc}")

    def _replan(self, name: str) -> StagePlan:
        spec = self.pipeline.stages[name]
        upstream = {n: self.plan.stages[n] for n in spec.needs}
        ledger = None if self.ctx.virtual else self.ctx.ledger
        run_dir = None if self.ctx.virtual else self.ctx.store.root
        ctx = PlanContext(self.plan.cluster, ledger, self.ctx.fresh, upstream, run_dir)
        stage: StagePlan = self.kinds[spec.kind].plan(name, spec, self.pipeline.raw[name], ctx)
        self.plan.stages[name] = stage
        return stage

    def _blocked(self, name: str, failed: list[str]) -> None:
        """A stage whose needs did not succeed: it runs nothing, and its state in the ledger
        says why, so `mode=status` and report.html list it as the run's summary does."""
        stage = self.plan.stages[name]
        message = f"not run: needs {', '.join(failed)}, which did not succeed"
        log.error("stage %s %s", name, message)
        self.outcomes[name] = StageOutcome(name, stage.kind, ok=False, message=message)
        self._not_run(name, message)

    def _not_run(self, name: str, why: str, unless_recorded: bool = False) -> None:
        """A stage that runs nothing this attempt, recorded with `why` as its state (where its
        ledger has no record, with `unless_recorded`), so `mode=status` and report.html list
        it as the run's summary does."""
        if not self.keep_rows:
            return
        record = self.ctx.ledger.stage(name)
        if record is not None and unless_recorded:
            return
        stage = self.plan.stages[name]
        # started now, after its needs (the ledger lists stages by start); the config of an
        # earlier record is kept, as `_open` keeps it, to explain the next plan's reruns
        config = record.config if record else stage.config
        self.ctx.ledger.save_stage(name, stage.kind, stage.fingerprint, config, why, self.wall())

    # --- verdicts ------------------------------------------------------------------------

    def _apply_all(self, verdicts: Iterable[Verdict]) -> None:
        """Carry out a kind's verdicts, each by its type's method (`_verdicts`), looked up once
        per type: a `match` over the verdicts, or an `isinstance` against a union, walks every
        member for each of the hundreds of thousands of verdicts of a big simulated run."""
        appliers = self._appliers
        for v in verdicts:
            apply = appliers.get(type(v))
            if apply is None:
                apply = self._applier(type(v))
            apply(v)

    def _applier(self, kind: type) -> Callable[[Verdict], None]:
        """The method for verdicts of type `kind`, a subclass of a verdict too (found once)."""
        for verdict, apply in list(self._appliers.items()):
            if issubclass(kind, verdict):
                self._appliers[kind] = apply
                return apply
        raise TypeError(f"a kind handed the loop {kind.__name__}, which is not a verdict")

    def _verdicts(self) -> dict[type, Callable[[Verdict], None]]:
        """What the loop does for each verdict: on units (their states and records), on leases
        (on the backend) and on the scheduler (asks, grants, quotas)."""
        return dict(
            [
                # units
                _on(Done, self._done),
                _on(DoneAll, lambda v: self.done_all(v.works, v.results, v.seconds, v.ends)),
                _on(Running, lambda v: self.running_all(v.works, v.lease, v.at)),
                _on(Failed, lambda v: self.failed(v.work, v.error, v.state)),
                _on(Ended, self._ended),
                _on(Lost, lambda v: self.lost(v.work, v.error, v.node_left)),
                _on(Back, lambda v: self.back(v.work)),
                _on(Requeue, lambda v: self.requeue_free(v.work, v.reason)),
                _on(Record, lambda v: self._row(v.work)),
                _on(Note, lambda v: self.event(v.work, v.kind, v.detail)),
                _on(Fail, lambda v: self.ctx.ledger.fail(v.error)),
                # leases
                _on(Launch, self._launch),
                _on(Send, self._send),
                _on(Cancel, lambda v: self.backend.cancel(v.lease)),
                _on(End, lambda v: self.end_lease(v.lease, v.kill)),
                _on(Stopped, lambda v: self._stopped(v.lease)),
                _on(RemoveGroup, lambda v: self.backend.remove_group(v.group)),
                # the scheduler
                _on(Lend, lambda v: self.lend(v.lender.run, v.ask, v.lender)),
                _on(Withdraw, self._withdraw_ask),
                _on(Park, self._park),
                _on(Release, lambda v: self.scheduler.release(v.grant)),
                _on(SetQuota, lambda v: self.scheduler.set_quota(v.pool, v.resources)),
            ]
        )

    def _done(self, v: Done) -> None:
        self.finish(v.work, UnitState.done, v.result, None, v.started, v.ended)

    def _ended(self, v: Ended) -> None:
        self.finish(v.work, v.state, v.result, v.error, v.started, v.ended)

    def _send(self, v: Send) -> None:
        if not v.lease.closed:
            self.backend.call(v.lease, v.call)

    def _launch(self, v: Launch) -> None:
        v.lease.actor = v.remote.actor
        self.backend.launch(v.lease, v.remote)

    def _withdraw_ask(self, v: Withdraw) -> None:
        for lease in [x for x in self.waiting.values() if x.ask is v.ask]:
            self.withdraw(lease)
            lease.run.lease_ended(lease)

    def _park(self, v: Park) -> None:
        lease = v.lease
        if lease.grant is not None:
            self.scheduler.park(lease.grant, v.tag, v.on_reclaim)
            self.by_grant.pop(lease.grant, None)
            lease.grant = None  # kept by the scheduler now, not released with it

    # --- asking and granting -------------------------------------------------------------

    def _ask(self) -> None:
        """Every stage's new asks, queued in the order asked: a run of asks that share one
        request (an array's jobs, a role's replicas) goes to the scheduler as one batch."""
        for live in self.live.values():
            alike: list[Ask] = []
            for ask in live.run.asks():
                if isinstance(ask, Lend):  # granted at once: after the asks before it
                    self._submit(live, alike)
                    alike = []
                    self._apply_all((ask,))
                    continue
                if alike and ask.request is not alike[0].request:
                    self._submit(live, alike)
                    alike = []
                alike.append(ask)
            self._submit(live, alike)

    def _submit(self, live: Live, asks: list[Ask]) -> None:
        """Queue asks of one request with the scheduler, a ticket each in order; each lease
        starts when its ticket is granted."""
        if not asks:
            return
        run, request = live.run, asks[0].request
        leases = [Lease(run, ask) for ask in asks]
        owners = []
        for lease, ask in zip(leases, asks, strict=True):
            if ask.work is not None:
                lease.work.append(ask.work)
            owners.append(f"{run.name}/{ask.work.id if ask.work else 'worker'}")
        tickets = self.scheduler.submit(request, owners, self._flag, self.tenant)
        for lease, ticket in zip(leases, tickets, strict=True):
            lease.ticket = ticket
            self.waiting[ticket] = lease
        live.asked += len(asks)
        live.shape = live.shape or request.resources.describe()

    def lend(self, run: StageRun, ask: Ask, lender: Lease) -> Lease:
        """Run the ask's unit at once on what `lender` holds (a reserved placement group):
        a grant of its own over those resources, preemptible like any other."""
        assert ask.work is not None and lender.grant is not None
        lease = Lease(run, ask)
        lease.work.append(ask.work)
        grant = self.scheduler.lend(
            lender.grant, ask.request, f"{run.name}/{ask.work.id}", self._flag
        )
        self.place(lease, grant, lender.group)
        return lease

    def withdraw(self, lease: Lease) -> None:
        """An ask no longer wanted (not yet granted)."""
        if lease.ticket is not None and lease.ticket in self.waiting:
            del self.waiting[lease.ticket]
            self.scheduler.withdraw(lease.ticket)

    def _flag(self, grant: Grant, reason: str) -> None:
        """Told by the scheduler, under its lock, that a grant is a victim: only note it."""
        self.flagged.append((grant, reason))

    def _admit(self) -> None:
        for ticket in self.scheduler.admit(self.tenant):
            lease = self.waiting.pop(ticket, None)
            if lease is None:
                continue
            assert ticket.grant is not None
            self.place(lease, ticket.grant)

    def place(self, lease: Lease, grant: Grant, group: object = None) -> None:
        """A granted lease: its placement on the chosen node, then the kind launches on it."""
        self.moved = True
        lease.grant, lease.granted_at = grant, self.wall()
        lease.group = group
        node = self.nodes[grant.node] if grant.node < len(self.nodes) else None
        lease.placement = Placement(
            node.node_id if node else "", node.ip if node else "", grant.resources, group
        )
        for work in lease.work:
            work.go(UnitState.granted)
        self.leases.add(lease)
        self.by_grant[grant] = lease
        lease.run.leases.add(lease)
        live = self.live[lease.run.name]
        live.leases += 1
        live.running += 1
        live.peak = max(live.peak, live.running)
        lease.deadline = self.clock() + lease.start_bound
        try:
            self._apply_all(lease.run.launch(lease))
        except Exception as exc:
            log.warning("%s: could not launch on %s: %s", lease.run.name, lease.node, exc)
            self.end_lease(lease)
            for work in lease.work:
                work.go(UnitState.running)
                self.finish(work, UnitState.failed, error=f"could not launch: {exc}")

    # --- waiting and what happened -------------------------------------------------------

    def _wait(self) -> None:
        """Hear what happened until the next deadline, the next time a stage is due, or (on a
        real cluster) the next look at signals and cancel requests."""
        until = self._next_due()
        used, before = self._granted(), self.clock()
        for happened in self.backend.wait(until):
            self.moved = True
            self._deliver(happened)
        if used is not None:  # what was granted held through the time that passed
            self.busy = self.busy + used.scale(self.clock() - before)

    def _next_due(self) -> float:
        """The loop's clock time by which it must look again."""
        due = [x.deadline for x in self.leases if x.deadline is not None]
        due += [d for live in self.live.values() if (d := live.run.due()) is not None]
        if self.urgent and self.keep_rows:
            due.append(self.last_flush + URGENT_SECONDS)
        return min(due, default=math.inf)

    def _granted(self) -> Resources | None:
        """What the scheduler has granted now, summed, for the simulated run's utilization
        (None on a real cluster: its utilization is measured from its processes)."""
        if not self.ctx.virtual:
            return None
        return total(self.scheduler.nodes) - self.scheduler.free()

    def _deliver(self, happened: Happened) -> None:
        """One thing that happened, to the kind or the loop (`isinstance` in order of how
        often: a `match` on class patterns costs a look-up per field captured)."""
        lease = happened.lease
        if isinstance(happened, Replied):
            lease.calls.pop(happened.ref, None)
            if not lease.closed:
                self._apply_all(lease.run.on_reply(lease, happened.tag, happened.value))
        elif isinstance(happened, Began):
            self._started(lease, happened.where, happened.said)
        else:
            lease.calls.pop(happened.ref, None)
            h = happened
            self._raised(lease, h.tag, h.error, h.cancelled, h.lost, h.node_died)

    def _raised(
        self, lease: Lease, tag: object, error: str, cancelled: bool, lost: bool, node_died: bool
    ) -> None:
        if cancelled:
            if lease.stopping is None:
                lease.stopping = "cancelled"
            self._stopped(lease)
        elif lease.stopping is not None:  # it was asked to stop, and did (by raising, dying)
            self._stopped(lease)
        elif lost:  # its worker or node died
            self._refresh_nodes(force=True)  # a node that died takes its leases with it
            if not lease.closed and not self.ctx.stop.is_set():  # (the whole cluster: ended)
                lease.node_left |= node_died
                self._apply_all(lease.run.on_failure(lease, tag, error, True))
        elif not lease.closed:
            self._apply_all(lease.run.on_failure(lease, tag, error, False))

    def _started(self, lease: Lease, where: Started, said: bool = True) -> None:
        """The lease's process really runs: its units run from now, on that node (`said`: by
        the process itself, so the wait since the grant is a start-up latency)."""
        if lease.closed:
            return
        lease.started = where
        if self.unstarted:
            keys: list[Work | str] = list(lease.work) or [lease.run.name]
            for key in keys:
                self.unstarted.pop(key, None)
        if said:
            self._measure_start(lease, where)
        for work in lease.work:
            self.running(work, where)
        if lease.stopping is None:
            lease.deadline = None
            self._apply_all(lease.run.on_start(lease))

    def _measure_start(self, lease: Lease, where: Started) -> None:
        """The lease's start-up latency, for the summary and the simulator (`measured.py`)."""
        live = self.live[lease.run.name]
        latency = max(0.0, where.time - lease.granted_at)
        live.start_latencies.append(latency)
        by_unit = live.unit_latencies
        if len(lease.work) == 1 and (lease.work[0].id in by_unit or len(by_unit) < MEASURED_UNITS):
            by_unit.setdefault(lease.work[0].id, []).append(round(latency, 4))

    # --- how units move ------------------------------------------------------------------

    def running(self, work: Work, where: Started, at: float | None = None) -> None:
        """A unit runs from `at` (default: when its process said so) on `where`'s node."""
        if work.state is UnitState.pending:
            work.go(UnitState.granted)
        work.go(UnitState.running)
        work.attempts += 1
        work.started, work.ended, work.error = at or where.time, None, None
        work.node_id, work.node_ip, work.worker = where.node_id, where.node_ip, where.worker
        self._ran(work, work.started)
        live = self.live.get(work.stage)
        if live is not None and live.run.running_rows:  # a coarse unit: on disk soon after
            self._row(work)
            self.urgent = True

    def running_all(self, works: Sequence[Work], lease: Lease, at: float) -> None:
        """`running` for units handed to a running lease together (a pool batch: no ledger
        row until they end), in one call: a batch of thousands pays no call per unit."""
        where = lease.started
        if not works or where is None:
            return
        if self.live[works[0].stage].run.running_rows:
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
        lease.work += works
        if self.starts is not None:
            for work in works:
                self._ran(work, at)
        elif self.first_start is None or at < self.first_start:
            self.first_start = at

    def _ran(self, work: Work, at: float) -> None:
        """A unit started at `at` (for the makespan, and a small plan's order of starts)."""
        if self.first_start is None or at < self.first_start:
            self.first_start = at
        if self.starts is not None:
            self.starts.append(f"{work.stage}/{work.id}")

    def done_all(
        self,
        works: Sequence[Work],
        results: Sequence[object],
        seconds: Sequence[float],
        ends: Sequence[float],
    ) -> None:
        """`finish(work, done, result, started=end - seconds, ended=end)` for running units
        whose ends were heard together (a pool batch's reply, each item's own end): the stage
        and the progress told once. Kept lean: for a million trivial items this is most of
        the driver's work."""
        if not works:
            return
        running, done = UnitState.running, UnitState.done
        name = works[0].stage
        rows, keep = self.rows, self.keep_rows
        for work, result, took, end in zip(works, results, seconds, ends, strict=True):
            if work.state is not running:
                work.go(done)  # raises: a unit not running cannot end done
            work.state = done
            work.result, work.error, work.started, work.ended = result, None, end - took, end
            if keep:
                rows[(name, work.unit.id)] = work.row()
        self._ended_at(ends[-1])
        self.live[name].run.ended_all(works)
        self.ctx.progress.advance(name, done=len(works))

    def _ended_at(self, end: float) -> None:
        if self.last_end is None or end > self.last_end:
            self.last_end = end

    def finish(
        self,
        work: Work,
        state: UnitState,
        result: object = None,
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
        work.ended = ended if ended is not None else self.wall()
        if work.started is not None:
            self._ended_at(work.ended)
        self._row(work)
        if live.run.running_rows:  # a coarse unit: its end is on disk soon (`_flush`)
            self.urgent = True
        self.ctx.progress.ended(work.stage, state)

    def failed(self, work: Work, error: str, state: UnitState = UnitState.failed) -> None:
        """The unit's own failure: run it again while retries last, else it ends `state`."""
        run = self.live[work.stage].run
        if work.state is UnitState.granted:  # before its process said it started
            self._failed_unstarted(work, error, state)
            return
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

    def _failed_unstarted(self, work: Work, error: str, state: UnitState) -> None:
        """A unit that failed before its process said it started (an actor whose constructor
        raises, a runtime environment Ray cannot set up): such a try spends no retry, so it is
        tried `START_TRIES` times in a row, then ends `state`, instead of for ever."""
        self.unstarted[work] += 1
        tries = self.unstarted[work]
        if tries >= START_TRIES or self.ctx.stop.is_set():
            del self.unstarted[work]
            self.finish(work, state, error=f"{error} (before it started, {tries} time(s))")
            return
        log.warning(
            "%s: %s failed before it started (%s); trying again (%d of %d)",
            work.stage,
            work.id,
            error,
            tries + 1,
            START_TRIES,
        )
        self.event(work, "retry", error)
        self._pending(work, error)

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

    def preempted(self, work: Work, reason: str, saved: object) -> None:
        """A victim is out: its state kept, pending again."""
        if work.state is not UnitState.granted:  # a grant not started yet: just pending again
            work.go(UnitState.preempted)
            self.event(work, "attempt", "preempted", started=work.started)
        work.saved = saved if saved is not None else work.saved
        # in the ledger too while the unit is not done: a restarted runner restores it
        work.result = saved_state.as_result(work.stage, work.id, work.saved)
        self._row(work)
        live = self.live[work.stage]
        live.requeues += 1
        self._pending(work, None)
        if live.run.running_rows:
            self.urgent = True

    def back(self, work: Work) -> None:
        """A unit handed out but not started by its worker: queued again, no attempt spent."""
        work.attempts -= 1
        work.go(UnitState.pending)
        self.live[work.stage].run.requeue(work)

    def _pending(self, work: Work, error: str | None) -> None:
        work.go(UnitState.pending)
        work.error = error
        run = self.live[work.stage].run
        run.requeue(work)
        if run.running_rows:
            self._row(work)

    def event(
        self, work: Work, kind: str, detail: str | None, started: float | None = None
    ) -> None:
        """Record a moment of the unit's life on the node it is on: an attempt drawn without
        its node would land on a node of its own, named after the worker's host."""
        if self.keep_rows:
            self.events.append(
                Event(
                    work.stage,
                    work.id,
                    kind,
                    self.wall(),
                    work.worker,
                    detail,
                    started,
                    work.node_ip,
                )
            )

    # --- leases ending -------------------------------------------------------------------

    def end_lease(self, lease: Lease, kill: bool = False) -> None:
        """The lease is done: forget its calls, kill what runs (if asked), free its resources
        (unless its kind parks them)."""
        if lease.closed:
            return
        lease.closed = True
        lease.calls.clear()
        if kill and lease.handle is not None:
            self.backend.kill(lease)
        self._apply_all(lease.run.release(lease))
        if lease.grant is not None:
            self.scheduler.release(lease.grant)
            self.by_grant.pop(lease.grant, None)
        self.leases.discard(lease)
        lease.run.leases.discard(lease)
        lease.run.lease_ended(lease)
        live = self.live.get(lease.run.name)
        if live is not None:
            live.running -= 1

    def stop_lease(self, lease: Lease, why: str, grace: float) -> None:
        """Ask the lease's work to stop; killed after `grace` seconds (and a last call)."""
        if lease.stopping is not None or lease.closed:
            return
        lease.stopping = why
        lease.deadline = self.clock() + grace
        if lease.started is not None or not lease.actor:
            self._apply_all(lease.run.stop(lease))

    def _stopped(self, lease: Lease) -> None:
        """A stopping lease's work is out (replied, cancelled, or killed at its deadline)."""
        if lease.closed:
            return
        why = lease.stopping or "cancelled"
        saved = lease.run.saved_state(lease)
        self.end_lease(lease, kill=True)
        for work in lease.work:
            if work.state.final:
                continue
            if lease.preempted and not self.ctx.stop.is_set():
                self.preempted(work, why, saved)
            else:  # stopped for good (Ctrl-C, mode=cancel): what it saved, the next run restores
                kept = saved_state.as_result(work.stage, work.id, saved)
                self.finish(work, UnitState.cancelled, kept, error="cancelled")

    def _preemptions(self) -> None:
        flagged, self.flagged = self.flagged, []
        for grant, reason in flagged:
            lease = self.by_grant.get(grant)
            if lease is None or lease.closed:
                continue
            self.live[lease.run.name].preempted[reason] += 1
            for work in lease.work:
                self.event(work, "preempted", reason)
            self._apply_all(lease.run.on_preempt(lease, reason))
            self.stop_lease(lease, f"preempted: {reason}", lease.run.grace)
            if lease.started is None:  # not running yet: nothing to save, end it now
                self._stopped(lease)

    def _deadlines(self) -> None:
        """Leases past their deadline: a stopping one is killed (after its last call), one
        not started gives its grant back. Past means at or after it: virtual time stops the
        clock exactly at the deadline it waits for."""
        now = self.clock()
        for lease in list(self.leases):
            if lease.deadline is None or now < lease.deadline or lease.closed:
                continue
            self.moved = True  # what it frees or queues again is for the next turn
            if lease.stopping is not None:
                self._late(lease, now)
            else:
                self._not_started(lease)

    def _not_started(self, lease: Lease) -> None:
        """Granted, but the cluster never started it on that node: the grant goes back and
        its units to the queue, no retry spent; `START_TRIES` such grants in a row fail them
        (a stage's worker leases: the stage), naming why, instead of asking for ever."""
        name = lease.run.name
        keys: list[Work | str] = list(lease.work) or [name]
        for key in keys:
            self.unstarted[key] += 1
        why = f"not started on {lease.node} within {lease.start_bound:g}s"
        log.warning(
            "%s: Ray did not start %s on node %s within %gs; queued again",
            name,
            ", ".join(w.id for w in lease.work) or "a worker",
            lease.node,
            lease.start_bound,
        )
        self.end_lease(lease, kill=True)
        for work in lease.work:
            if self.unstarted[work] >= START_TRIES:
                del self.unstarted[work]
                self.finish(work, UnitState.failed, error=f"{why}, {START_TRIES} times")
                continue
            work.go(UnitState.pending)
            work.error = why
            self.event(work, "retry", why)  # a requeue, counted with the others
            lease.run.requeue(work)
        if not lease.work and self.unstarted[name] >= START_TRIES and name in self.live:
            self._close_stage(name, message=f"workers {why}, {START_TRIES} times in a row")

    def _late(self, lease: Lease, now: float) -> None:
        """A stopping lease past its grace: its kind's last call first (a victim's state),
        once, with its own bound; then it is killed."""
        last = None if lease.last_asked else lease.run.last_call(lease)
        if last is not None and lease.started is not None:
            call, bound = last
            lease.last_asked = True
            self.backend.call(lease, call)
            lease.deadline = now + bound
            return
        self._stopped(lease)

    # --- units cancelled from outside (`mode=cancel`) --------------------------------------

    def _cancel_requests(self) -> None:
        """Answer the cancel requests left in the run directory: stop each named unit."""
        now = self.clock()
        if self.ctx.virtual or now - self.cancel_seen < CANCEL_EVERY:
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
            if lease.ask.work is work:
                self.stop_lease(lease, "cancelled", lease.run.grace)
                return
        for lease in list(self.waiting.values()):
            if lease.ask.work is work:
                self.withdraw(lease)
                lease.run.lease_ended(lease)
        run = self.live[work.stage].run
        if work in run.queue:
            run.queue.remove(work)
        self.finish(work, UnitState.cancelled, error="cancelled")

    # --- the cluster changing under us ---------------------------------------------------

    def _refresh_nodes(self, force: bool = False) -> None:
        """Follow the cluster's membership: a node that left takes its leases' units back to
        the queue; a node that joined becomes schedulable."""
        if self.ctx.stop.is_set() or not self.backend.alive():
            # stopping: a worker that died may be the embedded Ray going down with the signal
            return
        alive_list = self.backend.nodes(force)
        if alive_list is None:
            return
        alive = {n.node_id: n for n in alive_list}
        with _MEMBERSHIP:  # the scheduler and the nodes may be shared with other loops
            left = [
                (i, node)
                for i, node in enumerate(self.nodes)
                if node.node_id not in alive and node.node_id not in self.gone
            ]
            for i, node in left:
                self.gone.add(node.node_id)
                if node.capacity != Resources():  # the first loop to see it go
                    log.warning("node %s left the cluster; its units are queued again", node.ip)
                    self.scheduler.set_capacity(i, Resources())
                    self.nodes[i] = RayNode(node.node_id, node.ip, Resources())
            known = {n.node_id for n in self.nodes}
            for node_id, node in alive.items():
                if node_id not in known:
                    log.info("node %s joined the cluster: %s", node.ip, node.capacity.describe())
                    self.scheduler.add_node(node.capacity)
                    self.nodes.append(node)
        for i, node in left:
            for lease in [x for x in self.leases if x.grant is not None and x.grant.node == i]:
                lease.node_left = True
                failure = lease.run.on_failure(
                    lease, None, f"node {node.ip} left the cluster", True
                )
                self._apply_all(failure)

    # --- waits without end ---------------------------------------------------------------

    def _look_for_stuck(self) -> None:
        """Units waiting for a lease while nothing runs, nothing is in flight and nothing is
        due can never be admitted: no end of a running unit can change what holds them back
        (a reserved group kept for a role that waits on theirs, a node too small). They fail
        with the reason instead of waiting for ever."""
        if not self._idle_for_a_look():
            return
        granted = self.scheduler.admit(self.tenant)
        if granted:  # granted after all (released meanwhile): not stuck
            for ticket in granted:
                lease = self.waiting.pop(ticket, None)
                if lease is not None and ticket.grant is not None:
                    self.place(lease, ticket.grant)
            return
        if not self.waiting:
            self._no_progress()
            return
        if self.tenant is not None and self.scheduler.tenants_hold(
            self.tenant, self.by_grant.__contains__
        ):
            return  # another job's units hold what these wait for: they end in time
        self._fail_unadmittable()

    def _idle_for_a_look(self) -> bool:
        """Whether the loop stands still: nothing moved, ran, is in flight or is due (looked
        at once a second on a real cluster, where a look costs a walk over the leases)."""
        now = self.clock()
        if self.moved or not self.live:
            return False
        if not self.ctx.virtual and now - self.stuck_seen < STUCK_EVERY:
            return False
        self.stuck_seen = now
        if any(x.work or x.calls or x.started is None for x in self.leases):
            return False
        return all(live.run.due() is None for live in self.live.values())

    def _fail_unadmittable(self) -> None:
        """Every waiting lease's units fail, naming what they need and what holds it."""
        held = ", ".join(sorted(f"{x.run.name}/{x.ask.tag or 'lease'}" for x in self.leases))
        for lease in list(self.waiting.values()):
            self.withdraw(lease)
            lease.run.lease_ended(lease)
            for work in lease.work:
                need = lease.ask.request.resources.describe()
                why = f"{work.stage}/{work.id} needs {need}, which nothing running will free"
                why += f" (held: {held})" if held else " (no node holds it)"
                log.error("%s; failed", why)
                self.finish(work, UnitState.failed, error=f"cannot be admitted: {why}")

    def _no_progress(self) -> None:
        """Stages that still have units but nothing to ask, run or wait for: a kind that holds
        units back for a reason nothing will change. They end failed, naming it."""
        for name, live in list(self.live.items()):
            left = live.run.unfinished()
            if not left or (not self.ctx.virtual and live.run.leases):
                continue
            shown = ", ".join(w.id for w in left[:5]) + (" ..." if len(left) > 5 else "")
            message = f"{len(left)} {live.run.noun}(s) can never start: {shown}"
            # what failed first is most likely why (a role that waits on one that failed)
            failed = live.run.failure_budget()
            self._close_stage(name, message=f"{failed}; {message}" if failed else message)

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
        for lease in list(run.leases):
            self.end_lease(lease, kill=True)
        try:
            self._apply_all(run.close())
        except Exception as exc:  # the cluster is gone: nothing left to remove
            log.debug("close %s: %s", name, exc)
        for work in run.unfinished():
            self.finish(work, UnitState.cancelled, error="cancelled")
        self._flush(force=True)
        del self.live[name]
        outcome = self._outcome(live, interrupted or self.ctx.stop.is_set())
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
        self._save_stage(live, outcome)
        for unit in stage.units or []:  # now upstream data for the stages that need this one
            unit.run = False
        self.outcomes[name] = outcome
        if not outcome.ok and not outcome.interrupted:
            log.error("stage %s failed: %s", name, outcome.message)

    def _outcome(self, live: Live, interrupted: bool) -> StageOutcome:
        run, stage = live.run, live.run.stage
        counts = run.counts()
        outcome = StageOutcome(
            stage.name,
            stage.kind,
            total=len(stage.units or []),
            done=counts[UnitState.done],
            failed=counts[UnitState.failed] + counts[UnitState.out_of_memory],
            timeout=counts[UnitState.timeout],
            cancelled=counts[UnitState.cancelled],
            skipped=live.skipped,
            wall=self.clock() - live.started,
            interrupted=interrupted,
            asked=live.asked,
            leases=live.leases,
            peak=live.peak,
            shape=live.shape,
            requeues=live.requeues,
        )
        if live.start_latencies:
            outcome.start_latency = statistics.fmean(live.start_latencies)
            outcome.start_latencies = live.unit_latencies
        outcome.preempted = dict(live.preempted)
        return outcome

    def _save_stage(self, live: Live, outcome: StageOutcome) -> None:
        """The stage's record in the ledger: its state, summary, and (when every unit of the
        plan is done) the digest that lets the next plan skip reading its units."""
        if not self.keep_rows:
            return
        stage = live.run.stage
        record = self.ctx.ledger.stage(stage.name)
        state = "interrupted" if outcome.interrupted else "done" if outcome.ok else "failed"
        # the config is recorded only once the stage has seen all its units through, so an
        # interrupted run still explains the next plan's reruns as `changed: <key>`
        config = stage.config if not outcome.interrupted or record is None else record.config
        whole = state == "done" and outcome.done + outcome.skipped == outcome.total
        units = stage.units or []
        self.ctx.ledger.save_stage(
            stage.name,
            stage.kind,
            stage.fingerprint,
            config,
            state,
            live.started_wall,
            self.wall(),
            # none for an attempt that ran none of its units: the stage keeps what the last
            # attempt that ran it recorded
            asdict(outcome) if live.run.size else None,
            units_digest([u.id for u in units], [u.fingerprint for u in units]) if whole else None,
        )

    def _shutdown(self) -> None:
        """Stop every lease with its stage's grace, kill what is left, close every stage."""
        for lease in list(self.waiting.values()):
            self.withdraw(lease)
        if self.ctx.stop.is_set() and self.leases and self.backend.alive():
            self._stop_leases_with_grace()
        for lease in list(self.leases):
            self._end_at_shutdown(lease)
        for name in list(self.live):
            self._close_stage(name, interrupted=True)
        for name in self.pending_stages:
            stage = self.plan.stages[name]
            why = "not started: the run was stopped first"
            self.outcomes[name] = StageOutcome(
                name, stage.kind, ok=False, interrupted=True, started=False, message=why
            )
            self._not_run(name, why, unless_recorded=True)  # listed, if never run before
        self.pending_stages = []
        self._flush(force=True)
        self.backend.close()

    def _stop_leases_with_grace(self) -> None:
        """Ask every lease to stop and wait, each up to its stage's grace, for them to close."""
        for lease in list(self.leases):
            self.stop_lease(lease, "interrupted", lease.run.grace)
        # every lease has a deadline now; this bound only guards against one that has not
        bound = self.clock() + max((x.run.grace for x in self.leases), default=0) + 10
        while any(not x.closed for x in self.leases) and self.clock() < bound:
            for happened in self.backend.wait(self.clock() + WAIT_SECONDS):
                self._deliver(happened)
            now = self.clock()
            for lease in list(self.leases):
                if lease.deadline is None or now <= lease.deadline or lease.closed:
                    continue
                if self.backend.alive():  # its kind's last call first: a replica's state()
                    self._late(lease, now)
                else:
                    self._stopped(lease)
            self._flush()
            if not self.backend.alive():
                break

    def _end_at_shutdown(self, lease: Lease) -> None:
        """A lease still open once the grace is over: stopped now, or, when the cluster is
        gone, ended here and its workers left to be ended by pid."""
        lease.stopping = lease.stopping or "interrupted"
        if self.backend.alive():
            self._stopped(lease)
            return
        # the cluster is gone (SIGTERM to the whole group): nothing to ask; what its workers
        # leave behind is ended by pid (they are in a group of their own)
        self.end_lease(lease)
        self.backend.orphan(lease)
        for work in lease.work:
            if not work.state.final:
                self.finish(work, UnitState.cancelled, error="cancelled")

    # --- the ledger ------------------------------------------------------------------------

    def _row(self, work: Work) -> None:
        if self.keep_rows:
            self.rows[(work.stage, work.id)] = work.row()

    def _flush(self, force: bool = False) -> None:
        """Write the rows and events gathered so far: when `force`d (a stage closing, the run
        ending), at most URGENT_SECONDS after a coarse unit started or ended (`urgent`; the
        loop's wait ends by then, `_next_due`), else at most FLUSH_SECONDS apart. The metrics
        gauges follow at most every METRICS_EVERY, or when forced."""
        if not self.keep_rows:
            return
        now = self.clock()
        due = now - self.last_flush >= (URGENT_SECONDS if self.urgent else FLUSH_SECONDS)
        if not (force or due or len(self.rows) >= FLUSH_ROWS):
            return
        self.urgent = False
        if self.rows:
            self.ctx.ledger.write(list(self.rows.values()))
            self.rows = {}
        if self.events:
            self.ctx.ledger.add_events(self.events)
            self.events = []
        self.last_flush = now
        if now - self.metrics_seen < METRICS_EVERY and not force:
            return
        self.metrics_seen = now
        for name, live in self.live.items():
            REGISTRY.set_units(name, {s.value: n for s, n in live.run.counts().items()})
        capacity = total(self.scheduler.nodes)
        REGISTRY.set_resources(capacity - self.scheduler.free(), capacity)

    # --- what the run did, for the simulated cluster's report ------------------------------

    def makespan(self) -> float:
        """From the first unit's start to the last unit's end."""
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start


_V = TypeVar("_V", bound=Verdict)


def _on(kind: type[_V], apply: Callable[[_V], object]) -> tuple[type, Callable[[Verdict], None]]:
    """A line of `Executor._verdicts`: `apply` is only ever called with verdicts of `kind`."""
    return kind, cast(Callable[[Verdict], None], apply)
