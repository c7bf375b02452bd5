"""The driver of a roles stage: one thread walks every replica through its life.

waiting (until `start_after`) → pending (a ticket, or a reserved group) → starting (an actor
in its placement group, readiness bounded) → running → done; a victim flagged by the
scheduler goes stopping (cancel sent, deadline `cancel_timeout`) → state saved → killed →
pending again, to be restored when it is admitted next. Ledger rows, preemption marks and
the stage's event log are written from here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runner.plan import StagePlan, Unit
from runner.remote import error_line, remote
from runner.scheduler.core import Grant, Ticket
from runner.scheduler.metrics import REGISTRY
from runner.scheduler.pgpool import PGPool, Reserved
from runner.scheduler.policy import REASONS
from runner.stages.base import RunContext, StageOutcome
from runner.stages.roles.host import RoleHost, saves_state
from runner.stages.roles.settings import RoleSpec, RolesPlan
from runner.store import Event, UnitRow, UnitState, atomic_path

log = logging.getLogger(__name__)

# seconds a placement group or an actor may take to become ready before the replica fails
READY_TIMEOUT = 60.0
# seconds to wait for a stubborn victim's state() before it is killed anyway
STATE_TIMEOUT = 2.0
EVENTS = "events.jsonl"

FINAL = ("done", "failed", "cancelled")


@dataclass(eq=False)
class Replica:
    """One replica's life: waiting → pending → starting → running (→ stopping → pending)..."""

    unit: Unit
    role: RoleSpec
    index: int
    elastic: bool
    state: str = "waiting"
    ticket: Ticket | None = None
    grant: Grant | None = None
    reserved: Reserved | None = None
    handle: Any = None
    ref: Any = None
    deadline: float = 0.0
    saved: Any = None
    pending_since: float = 0.0
    attempts: int = 0
    preemptions: int = 0
    started: float | None = None
    # when the current attempt began running (a preempted attempt is drawn as its own bar)
    attempt_started: float | None = None
    worker: str | None = None
    result: Any = None
    error: str | None = None


@dataclass
class RolesRun:
    """Drives one roles stage on one thread: admission, placement, preemption, ledger."""

    stage: StagePlan
    ctx: RunContext
    rp: RolesPlan = field(init=False)
    replicas: list[Replica] = field(default_factory=list)
    pgs: PGPool = field(init=False)
    events: list[dict[str, Any]] = field(default_factory=list)
    rows: list[UnitRow] = field(default_factory=list)
    # preemptions and preempted attempts, for the timeline picture
    marks: list[Event] = field(default_factory=list)
    flagged: list[tuple[Grant, str]] = field(default_factory=list)
    flag_lock: threading.Lock = field(default_factory=threading.Lock)
    preempted: Counter[str] = field(default_factory=Counter)
    requeues: int = 0
    waited: dict[float, list[float]] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    running_roles: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rp = self.stage.settings["roles"]
        self.pgs = PGPool(
            self.stage.name, self.ctx.scheduler, self.rp.max_dynamic_pgs, self.rp.reuse
        )
        for unit in self.stage.to_run:
            role = self.rp.roles[unit.payload["role"]]
            i = unit.payload["replica"]
            self.replicas.append(Replica(unit, role, i, elastic=i >= role.min))
        done_roles = {r for r in self.rp.roles if not any(x.role.name == r for x in self.replicas)}
        self.running_roles |= done_roles
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        if self.rp.quota is not None:
            self.ctx.scheduler.set_quota(self.rp.pool, self.rp.quota)

    # lifecycle

    def run(self) -> StageOutcome:
        name = self.stage.name
        total = len(self.stage.units or [])
        outcome = StageOutcome(name, "roles", total=total, skipped=total - len(self.replicas))
        self.ctx.progress.start(name, len(self.replicas))
        try:
            if self.replicas:
                self._reserve()
                self._loop()
        finally:
            self._teardown()
            self.ctx.progress.finish(name)
        return self._conclude(outcome)

    def _reserve(self) -> None:
        top = max(r.priority for r in self.rp.roles.values())
        self.pgs.reserve(self.rp.reserved, top, self.rp.pool, self.ctx.stop.is_set)
        for r in self.pgs.reserved:
            self._wait_ready(r.pg.ready(), f"reserved group {r.shape.describe()}")

    def _wait_ready(self, ref: Any, what: str) -> None:
        import ray

        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ctx.stop.is_set():
            ready, _ = ray.wait([ref], timeout=0.2)
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:g}s")

    def _loop(self) -> None:
        while not self.ctx.stop.is_set() and not all(r.state in FINAL for r in self.replicas):
            self.pgs.sweep()
            self._arrivals()
            self.ctx.scheduler.admit()
            self._start_admitted()
            self._preemptions()
            self._poll(0.05)
            self._overdue()
            self._flush()

    def _conclude(self, outcome: StageOutcome) -> StageOutcome:
        counts = Counter(r.state for r in self.replicas)
        outcome.done, outcome.failed = counts["done"], counts["failed"]
        outcome.cancelled = counts["cancelled"] + sum(r.state not in FINAL for r in self.replicas)
        outcome.wall = time.monotonic() - self.t0
        outcome.interrupted = self.ctx.stop.is_set()
        outcome.extra = {
            "preemptions": {k: self.preempted[k] for k in REASONS},
            "requeues": self.requeues,
            "waiting_s_by_priority": {
                f"{p:g}": {
                    "units": len(w),
                    "mean_s": round(sum(w) / len(w), 3),
                    "max_s": round(max(w), 3),
                }
                for p, w in sorted(self.waited.items())
            },
            "placement_groups": {"created": self.pgs.created, "reused": self.pgs.reused},
        }
        path = self.ctx.stage_dir(self.stage.name) / EVENTS
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        outcome.outputs.append(str(path))
        pre = ", ".join(f"{k} {self.preempted[k]}" for k in REASONS)
        waits = ", ".join(
            f"{p:g}: {sum(w) / len(w):.2f}s" for p, w in sorted(self.waited.items(), reverse=True)
        )
        outcome.message = (
            f"preemptions: {pre}; requeues {self.requeues}; mean wait by priority {waits}"
        )
        if outcome.failed:
            outcome.ok = False
            bad = [f"{r.unit.id}: {r.error}" for r in self.replicas if r.state == "failed"]
            outcome.message += "; failed: " + "; ".join(bad[:3])
        if outcome.interrupted:
            outcome.ok = False
        return outcome

    # arrivals and admission

    def _arrived(self, role: RoleSpec) -> bool:
        after = role.start_after
        if isinstance(after, str):
            return after in self.running_roles
        return time.monotonic() - self.t0 >= float(after)

    def _arrivals(self) -> None:
        for r in self.replicas:
            if r.state == "waiting" and self._arrived(r.role):
                r.state = "pending"
                self._event(r, "arrived")
            if r.state == "pending" and r.ticket is None and r.reserved is None:
                if r.pending_since == 0.0:
                    r.pending_since = time.monotonic()
                self._request(r)

    def _request(self, r: Replica) -> None:
        if r.role.pg == "reserved":
            r.reserved = self.pgs.take_reserved(r.role.name, r.role.resources)
            if r.reserved is not None:
                waited = time.monotonic() - r.pending_since
                self.waited.setdefault(r.role.priority, []).append(waited)
                self._start(r)
            return
        r.ticket = self.ctx.scheduler.submit(
            f"{self.stage.name}/{r.unit.id}",
            r.role.resources,
            r.role.priority,
            pool=self.rp.pool,
            labels=r.role.labels,
            policy=None if r.elastic else self.rp.policy,
            on_preempt=self._flag,
            saves_state=self.saves[r.role.name],
            elastic=r.elastic,
            reuse=self.pgs.tag if self.rp.reuse else None,
        )

    def _flag(self, grant: Grant, reason: str) -> None:
        """Called by the scheduler under its lock: only note it; the loop acts on it."""
        with self.flag_lock:
            self.flagged.append((grant, reason))

    def _start_admitted(self) -> None:
        for r in self.replicas:
            if r.state == "pending" and r.ticket is not None and r.ticket.grant is not None:
                r.grant = r.ticket.grant
                self.waited.setdefault(r.role.priority, []).append(r.grant.waited)
                self._start(r)

    def _start(self, r: Replica) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {**r.role.resources.ray_options(), "max_concurrency": 2}
        options["max_restarts"] = 0
        group = None
        if r.reserved is not None:
            group = r.reserved.pg
        elif r.grant is not None and (found := self.pgs.group_for(r.grant)) is not None:
            group, reused = found
            self._event(r, "placement group", reused=reused)
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
        r.handle = (
            remote(RoleHost)
            .options(**options)
            .remote(r.role.actor, r.role.name, r.index, r.role.steps)
        )
        r.ref = r.handle.ready.remote()
        r.deadline = time.monotonic() + READY_TIMEOUT
        r.state, r.attempts = "starting", r.attempts + 1
        r.pending_since = 0.0
        self._event(r, "admitted", waited=round(r.grant.waited, 3) if r.grant else 0.0)

    # running, stopping

    def _poll(self, timeout: float) -> None:
        import ray

        refs = {r.ref: r for r in self.replicas if r.ref is not None}
        if not refs:
            time.sleep(timeout)
            return
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            r = refs[ref]
            r.ref = None
            self._on_reply(r, ref)
        now = time.monotonic()
        for r in self.replicas:
            if r.state == "starting" and r.ref is not None and now > r.deadline:
                self._fail(r, f"not ready after {READY_TIMEOUT:g}s (its placement group never fit)")

    def _on_reply(self, r: Replica, ref: Any) -> None:
        import ray

        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if r.state == "stopping":
                self._stopped(r, killed=False)
            else:
                self._fail(r, error_line(exc))
            return
        if r.state == "starting":
            r.worker, r.state = reply, "running"
            r.attempt_started = time.time()
            r.started = r.started or r.attempt_started
            self.running_roles.add(r.role.name)
            self._event(r, "running", restored=r.saved is not None)
            r.ref = r.handle.run.remote(r.saved)
            self._row(r, UnitState.running)
            return
        if r.state == "stopping" or reply["cancelled"]:
            r.saved = reply["state"] if reply["state"] is not None else r.saved
            self._stopped(r, killed=False)
            return
        r.result = {
            **(
                reply["result"] if isinstance(reply["result"], dict) else {"value": reply["result"]}
            ),
            "preemptions": r.preemptions,
        }
        r.state = "done"
        self._event(r, "done")
        self._release(r)
        self._row(r, UnitState.done)
        self.ctx.progress.advance(self.stage.name, done=1)

    def _preemptions(self) -> None:
        # a grant made by another stage's admission pass may be flagged before we saw it
        self._start_admitted()
        with self.flag_lock:
            flagged, self.flagged = self.flagged, []
        for grant, reason in flagged:
            r = next((x for x in self.replicas if x.grant is grant), None)
            if r is None or r.state not in ("starting", "running"):
                continue
            r.preemptions += 1
            self.preempted[reason] += 1
            self._event(r, "preempt requested", reason=reason)
            self.marks.append(
                Event(self.stage.name, r.unit.id, "preempted", time.time(), detail=reason)
            )
            if r.state == "starting":
                self._stopped(r, killed=True)
                continue
            r.handle.cancel.remote()
            r.state = "stopping"
            r.deadline = time.monotonic() + self.rp.policy.cancel_timeout

    def _overdue(self) -> None:
        import ray

        now = time.monotonic()
        for r in self.replicas:
            if r.state != "stopping" or now <= r.deadline:
                continue
            try:
                state = ray.get(r.handle.state.remote(), timeout=STATE_TIMEOUT)
                r.saved = state if state is not None else r.saved
            except Exception as exc:  # stuck or dead: kill it with what was saved before
                log.debug("%s: state() failed: %s", r.unit.id, exc)
            self._stopped(r, killed=True)

    def _stopped(self, r: Replica, killed: bool) -> None:
        """A victim is out: kill its process, give its resources back, queue it again."""
        self._event(
            r,
            "killed after cancel_timeout" if killed and r.state == "stopping" else "stopped",
            saved=r.saved is not None,
        )
        if r.attempt_started is not None:
            self.marks.append(
                Event(
                    self.stage.name,
                    r.unit.id,
                    "attempt",
                    time.time(),
                    detail="preempted",
                    started=r.attempt_started,
                )
            )
        self._release(r)
        r.state, r.ref, r.pending_since = "pending", None, 0.0
        r.attempt_started = None
        self.requeues += 1
        self._row(r, UnitState.pending)

    def _fail(self, r: Replica, error: str) -> None:
        r.error, r.state, r.ref = error, "failed", None
        self._event(r, "failed", error=error)
        self._release(r)
        self._row(r, UnitState.failed)
        self.ctx.progress.advance(self.stage.name, failed=1)

    def _release(self, r: Replica) -> None:
        import ray

        if r.handle is not None:
            ray.kill(r.handle, no_restart=True)
            r.handle = None
        if r.reserved is not None:
            r.reserved.busy, r.reserved = False, None
        if r.grant is not None:
            self.pgs.give_back(r.grant)
            r.grant = None
        elif r.ticket is not None:
            self.ctx.scheduler.withdraw(r.ticket)
        r.ticket = None

    def _teardown(self) -> None:
        for r in self.replicas:
            if r.state not in FINAL:
                was = r.state
                self._release(r)
                r.state, r.error = "cancelled", "cancelled"
                if was != "waiting":
                    self._event(r, "cancelled")
                self._row(r, UnitState.cancelled)
        self.pgs.close()
        self._flush()

    # records

    def _event(self, r: Replica, what: str, **details: Any) -> None:
        self.events.append(
            {
                "t": round(time.time(), 4),
                "unit": r.unit.id,
                "role": r.role.name,
                "event": what,
                **details,
            }
        )
        log.debug("%s %s %s %s", self.stage.name, r.unit.id, what, details or "")

    def _row(self, r: Replica, state: UnitState) -> None:
        now = time.time()
        # the row spans the last attempt; earlier, preempted attempts are events
        started = r.attempt_started or r.started
        ended = now if state in (UnitState.done, UnitState.failed, UnitState.cancelled) else None
        self.rows.append(
            r.unit.row(
                self.stage.name, state, r.attempts, started, ended, r.worker, r.error, r.result
            )
        )

    def _flush(self) -> None:
        if self.rows:
            self.ctx.ledger.write(self.rows)
            self.rows = []
        if self.marks:
            self.ctx.ledger.add_events(self.marks)
            self.marks = []
        REGISTRY.set_units(self.stage.name, Counter(r.state for r in self.replicas))


def run(stage: StagePlan, ctx: RunContext) -> StageOutcome:
    return RolesRun(stage, ctx).run()
