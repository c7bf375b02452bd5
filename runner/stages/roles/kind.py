"""How a roles stage runs under the executor: a lease per replica (preemptible by policy), a
`RoleHost` actor on it, reserved placement groups kept for their roles.

A replica arrives (at `start_after`), asks for its lease (or takes a free reserved group),
starts its actor in a placement group pinned to the granted node, and runs; a victim is asked
to stop (`ctx.cancelled`), given `cancel_timeout`, its `state()` kept, killed, and queued
again by the executor, to be restored when admitted next. The stage's event log
(`events.jsonl`) and its summary (preemptions by reason, requeues, waiting by priority) are
written from here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from runner import saved_state
from runner.executor import Executor, Lease, StageRun, Work
from runner.kind import RunContext, StageOutcome
from runner.lifecycle import UnitState
from runner.placement import Placement
from runner.plan import StagePlan
from runner.remote import remote
from runner.resources import Resources
from runner.scheduler.pgpool import PGPool, remove
from runner.scheduler.policy import REASONS
from runner.scheduler.request import Request
from runner.stages.roles.host import RoleHost, saves_state
from runner.stages.roles.settings import RoleSpec, RolesPlan
from runner.store import atomic_path

log = logging.getLogger(__name__)

# seconds to wait for a stubborn victim's state() before it is killed anyway
STATE_TIMEOUT = 2.0
EVENTS = "events.jsonl"


@dataclass(eq=False)
class ReservedGroup:
    """A reserved placement group: granted and created when the stage starts, kept for its role."""

    shape: Resources
    role: str | None
    lease: Lease
    pg: Any = None
    ready: bool = False
    # the replica running in it
    user: Work | None = None


@dataclass
class _Stats:
    preempted: Counter[str] = field(default_factory=Counter)
    requeues: int = 0
    waited: dict[float, list[float]] = field(default_factory=dict)


class RolesRun(StageRun):
    """Replicas of roles with priorities, placement groups and preemption."""

    noun = "replica"

    def __init__(self, stage: StagePlan, ctx: RunContext, ex: Executor) -> None:
        super().__init__(stage, ctx, ex)
        self.rp: RolesPlan = stage.settings["roles"]
        self.grace = self.rp.policy.cancel_timeout
        self.pgs = PGPool(stage.name, ctx.scheduler, self.rp.max_dynamic_pgs, self.rp.reuse)
        self.t0 = time.monotonic()
        self.arrived: set[Work] = set()
        self.queue.clear()  # a replica is queued when its role arrives
        self.reserved: list[ReservedGroup] = []
        self.saved: dict[Lease, Any] = {}
        # victims past their cancel_timeout asked for their state, and until when to wait
        self.asking: dict[Lease, tuple[Any, float]] = {}
        self.asked_at: dict[Work, float] = {}
        self.events: list[dict[str, Any]] = []
        self.stats = _Stats()
        mine = {w.unit.payload["role"] for w in self.works}
        self.running_roles = {r for r in self.rp.roles if r not in mine}
        self.saves = {
            r.name: saves_state(r.actor.get("_target_", "")) for r in self.rp.roles.values()
        }
        if self.rp.quota is not None:
            ctx.scheduler.set_quota(self.rp.pool, self.rp.quota)
        self._restore_from_ledger()

    def _restore_from_ledger(self) -> None:
        """Replicas preempted in an earlier run of this directory start from the state they
        saved then (a runner restart loses no work); `run.fresh` starts every one anew."""
        if self.ex.fresh:
            return
        states = saved_state.from_ledger(self.ctx.ledger, self.name, (w.unit for w in self.works))
        for work in self.works:
            if work.id in states:
                work.saved = states[work.id]
                work.result = {saved_state.KEY: work.saved}  # still on disk until it is done
                log.info("%s: %s resumes from the state it saved last time", self.name, work.id)

    def role(self, work: Work) -> RoleSpec:
        return self.rp.roles[work.unit.payload["role"]]

    def index(self, work: Work) -> int:
        return int(work.unit.payload["replica"])

    # reserved groups: leases of the stage itself, asked for first, never preempted

    def prepare(self) -> None:
        if not self.works:
            return
        for shape, role in self.rp.reserved:
            lease = self.ex.submit(Lease(self, reserved_ask(self.rp, shape), tag="reserved"))
            self.reserved.append(ReservedGroup(shape, role, lease))

    def _reserved_of(self, lease: Lease) -> ReservedGroup | None:
        return next((g for g in self.reserved if g.lease is lease), None)

    def _take_reserved(self, work: Work) -> ReservedGroup | None:
        """A free, ready reserved group for the replica (`pick_reserved`)."""
        free = [g for g in self.reserved if g.ready and g.user is None]
        return pick_reserved(free, self.role(work))

    # arrivals and asks

    def _has_arrived(self, role: RoleSpec) -> bool:
        after = role.start_after
        if isinstance(after, str):
            return after in self.running_roles
        return time.monotonic() - self.t0 >= float(after)

    def asks(self) -> Iterator[Lease]:
        for work in self.works:
            if work not in self.arrived and self._has_arrived(self.role(work)):
                self.arrived.add(work)
                self.queue.append(work)
                self._event(work, "arrived")
        for work in list(self.queue):
            if work.state.final:
                self.queue.remove(work)
                continue
            role = self.role(work)
            self.asked_at.setdefault(work, time.monotonic())
            if role.pg == "reserved":
                group = self._take_reserved(work)
                if group is not None:
                    self.queue.remove(work)
                    self._start_in(group, work)
                continue
            self.queue.remove(work)
            reuse = self.pgs.tag if self.rp.reuse else None
            ask = replica_ask(self.rp, role, self.index(work), self.saves[role.name], reuse)
            yield Lease(self, ask, work)

    def _start_in(self, group: ReservedGroup, work: Work) -> None:
        group.user = work
        lease = Lease(self, Request(group.shape, self.role(work).priority), work, tag=group)
        lease.work.append(work)
        assert group.lease.grant is not None
        self.ex.place(lease, group.lease.grant, group.pg)

    def requeue(self, work: Work) -> None:
        self.stats.requeues += 1
        self.queue.append(work)

    # launching

    def launch(self, lease: Lease) -> None:
        assert lease.placement is not None
        if lease.tag == "reserved":
            group = self._reserved_of(lease)
            assert group is not None
            group.pg = lease.placement.new_group()
            lease.watch(group.pg.ready(), "group ready")
            return
        work = lease.work[0]
        role = self.role(work)
        placement = lease.placement
        self.pgs.sweep()  # groups reclaimed for this grant go first: Ray frees what they held
        if placement.group is None and lease.grant is not None:
            found = self.pgs.group_for(lease.grant, placement.new_group)
            if found is not None:
                placement = Placement(
                    placement.node_id, placement.node_ip, placement.resources, found[0]
                )
                self._event(work, "placement group", reused=found[1])
        waited = time.monotonic() - self.asked_at.pop(work, time.monotonic())
        self.stats.waited.setdefault(role.priority, []).append(waited)
        lease.actor = (
            remote(RoleHost)
            .options(**placement.options(max_concurrency=2, max_restarts=0))
            .remote(role.actor, role.name, self.index(work), role.steps)
        )
        lease.watch(lease.actor.ready.remote(), "ready")
        self._event(work, "admitted", waited=round(waited, 3))

    def tick(self) -> None:
        self.pgs.sweep()

    def on_start(self, lease: Lease) -> None:
        work = lease.work[0]
        self.running_roles.add(self.role(work).name)
        self._event(work, "running", restored=work.saved is not None)
        self.ex.watch(lease, lease.actor.run.remote(work.saved), "run")

    # replies

    def on_reply(self, lease: Lease, tag: Any, value: Any) -> None:
        if tag == "group ready":
            group = self._reserved_of(lease)
            assert group is not None
            group.ready, lease.deadline = True, None
            return
        reply: dict[str, Any] = value
        work = lease.work[0]
        if lease.stopping is not None or reply["cancelled"]:
            self.saved[lease] = reply["state"]
            lease.stopping = lease.stopping or "preempted: cancelled"
            self.ex.stopped(lease)
            return
        result = (
            reply["result"] if isinstance(reply["result"], dict) else {"value": reply["result"]}
        )
        preemptions = sum(
            1 for e in self.events if e["unit"] == work.id and e["event"] == "preempt requested"
        )
        self._event(work, "done")
        self.ex.end_lease(lease, kill=True)
        self.ex.finish(work, UnitState.done, {**result, "preemptions": preemptions})

    def on_preempt(self, lease: Lease, reason: str) -> None:
        self.stats.preempted[reason] += 1
        for work in lease.work:
            self._event(work, "preempt requested", reason=reason)

    def stop(self, lease: Lease) -> None:
        if lease.actor is not None and lease.started is not None:
            lease.actor.cancel.remote()

    def saved_state(self, lease: Lease) -> Any:
        """What the replica's `state()` says: from its reply when it stopped in time, else
        asked once more (bounded) before it is killed."""
        import ray

        in_time = lease in self.saved
        state = self.saved.pop(lease, None)
        if not in_time and lease.actor is not None and lease.started is not None:
            self._ask_states(lease)
            ref, until = self.asking.pop(lease)
            try:
                state = ray.get(ref, timeout=max(0.0, until - time.monotonic()))
            except Exception as exc:  # stuck or dead: killed with what was saved before
                log.debug("state(): %s", exc)
        what = "stopped" if in_time else "killed after cancel_timeout"
        for work in lease.work:
            self._event(work, what, saved=state is not None)
        return state

    def _ask_states(self, lease: Lease) -> None:
        """Ask `lease` and every other victim past its cancel_timeout for its state at once,
        so stubborn victims cost one STATE_TIMEOUT together, not one each in turn."""
        now = time.monotonic()
        late = [
            x
            for x in self.leases
            if x.stopping is not None
            and x.deadline is not None
            and x.deadline <= now
            and x not in self.saved
            and x.actor is not None
            and x.started is not None
        ]
        for victim in [lease, *late]:
            if victim not in self.asking:
                self.asking[victim] = (victim.actor.state.remote(), now + STATE_TIMEOUT)

    def release(self, lease: Lease) -> None:
        self.asking.pop(lease, None)
        group = lease.tag if isinstance(lease.tag, ReservedGroup) else None
        if group is not None:
            group.user = None
        elif lease.tag == "reserved":
            reserved = self._reserved_of(lease)
            if reserved is not None and reserved.pg is not None:
                remove(reserved.pg)
            if lease.grant is not None:
                self.ctx.scheduler.release(lease.grant)
        elif lease.grant is not None:
            self.pgs.give_back(lease.grant)

    def close(self) -> None:
        self.pgs.close()

    # the end

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        s = self.stats
        outcome.extra = {
            "preemptions": {k: s.preempted[k] for k in REASONS},
            "requeues": s.requeues,
            "waiting_s_by_priority": {
                f"{p:g}": {
                    "units": len(w),
                    "mean_s": round(sum(w) / len(w), 3),
                    "max_s": round(max(w), 3),
                }
                for p, w in sorted(s.waited.items())
            },
            "placement_groups": {
                "created": self.pgs.created + len(self.reserved),
                "reused": self.pgs.reused,
            },
        }
        path = self.ctx.stage_dir(self.name) / EVENTS
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        outcome.outputs.append(str(path))
        pre = ", ".join(f"{k} {s.preempted[k]}" for k in REASONS)
        waits = ", ".join(
            f"{p:g}: {sum(w) / len(w):.2f}s" for p, w in sorted(s.waited.items(), reverse=True)
        )
        outcome.message = (
            f"preemptions: {pre}; requeues {s.requeues}; mean wait by priority {waits}"
        )
        problem = self.failure_budget()
        if problem:
            outcome.ok = False
            outcome.message += "; " + problem
        return outcome

    def _event(self, work: Work, what: str, **details: Any) -> None:
        self.events.append(
            {
                "t": round(time.time(), 4),
                "unit": work.id,
                "role": work.unit.payload["role"],
                "event": what,
                **details,
            }
        )


def replica_ask(
    rp: RolesPlan,
    role: RoleSpec,
    index: int,
    saves: bool,
    reuse: str | None = None,
) -> Request:
    """A replica's lease: its role's resources, priority and labels in the stage's pool;
    preemptible; replicas beyond the role's `min` are elastic and preempt nobody. The
    simulated cluster asks the same."""
    elastic = index >= role.min
    return Request(
        role.resources,
        role.priority,
        pool=rp.pool,
        labels=role.labels,
        policy=None if elastic else rp.policy,
        preemptible=True,
        saves_state=saves,
        elastic=elastic,
        reuse=reuse,
        estimated=role.estimated_duration,
    )


def reserved_ask(rp: RolesPlan, shape: Resources) -> Request:
    """A reserved group's lease, asked for when the stage starts: at the top role priority,
    in the stage's pool, never preempted. The simulated cluster asks the same."""
    return Request(shape, max(r.priority for r in rp.roles.values()), pool=rp.pool)


class _Reserved(Protocol):
    shape: Resources
    role: str | None


_G = TypeVar("_G", bound=_Reserved)


def pick_reserved(free: list[_G], role: RoleSpec) -> _G | None:
    """Which free reserved group a replica takes: its role's own, else one kept for no role;
    the smallest that holds it. The simulated cluster picks the same."""
    fits = [g for g in free if role.resources.fits_in(g.shape)]
    mine = [g for g in fits if g.role == role.name] or [g for g in fits if g.role is None]
    if not mine:
        return None
    return min(mine, key=lambda g: (g.shape.cpus + 8 * g.shape.gpus, g.shape.memory))


def open_run(stage: StagePlan, ctx: RunContext, ex: Executor) -> RolesRun:
    return RolesRun(stage, ctx, ex)
