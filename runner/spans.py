"""A run read back from the ledger: unit attempts as slices on tracks grouped by node, moments
(preemptions, retries, timeouts) with their reason, and resources in use over time.

The trace, the timeline picture and the HTML report all draw this one view, so they agree.
A track (a lane) is what held a placement of its own: a worker (pool, shard, a job's Ray
worker) or a role replica; a pool's items are laid end to end on their worker, as they ran.
Slices that still overlap on one lane (items of a worker running several at once) are packed
into numbered slots, because a trace track must hold one slice at a time. The view covers
every attempt of the run: a unit's last attempt is its ledger row, the earlier ones are events.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from runner.planfile import PlanRecord
from runner.resources import Resources
from runner.store import EventRow, Ledger, SpanRow

# above this many units in a stage, back-to-back units of one state on one track are drawn as
# one slice ("first … (N units)"): thousands of pool items cannot be told apart on a screen,
# and drawing them one by one cost a 5,000-item pool more than its items did (0.6 s of 0.9 s)
DETAIL_LIMIT = 2_000
# seconds between two units on one track that still count as back to back
BACK_TO_BACK = 0.05
# seconds two slices of one lane may overlap and still be one after the other: two clocks
# (a worker's wall clock, its items' own timers) never agree to the microsecond
SLACK = 0.001
UNKNOWN_NODE = "unknown node"


@dataclass(frozen=True, slots=True)
class Slice:
    """One attempt of a unit on a track."""

    stage: str
    unit: str
    node: str
    track: str
    start: float
    end: float
    state: str
    attempts: int
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class Moment:
    """A preemption, retry or timeout of a unit, with its reason."""

    stage: str
    unit: str
    node: str
    track: str
    time: float
    kind: str
    reason: str


@dataclass
class RunView:
    """Everything drawn of one run."""

    slices: list[Slice]
    moments: list[Moment]
    # resource name ("CPU", "GPU", or "lanes" when sizes are unknown) → capacity
    capacity: dict[str, float] = field(default_factory=dict)
    # resource name → [(time, amount in use from then on)], a step function
    usage: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # stage → resource name → resource-seconds held by its units
    held: dict[str, dict[str, float]] = field(default_factory=dict)

    @cached_property
    def start(self) -> float:
        return min((s.start for s in self.slices), default=0.0)

    @cached_property
    def end(self) -> float:
        return max((s.end for s in self.slices), default=self.start)

    def tracks(self) -> list[tuple[str, str]]:
        """(node, track) pairs grouped by node, then by stage, then by first start."""
        first: dict[tuple[str, str], float] = {}
        for s in self.slices:
            key = (s.node, s.track)
            first[key] = min(first.get(key, s.start), s.start)
        return sorted(first, key=lambda k: (k[0], k[1].split("/")[0], first[k], k[1]))

    def mean_use(self, resource: str) -> float:
        """Time-weighted mean amount in use over the run's span."""
        steps, start, end = self.usage.get(resource, []), self.start, self.end
        if not steps or end <= start:
            return 0.0
        total = 0.0
        for (t, v), (t_next, _) in itertools.pairwise([*steps, (end, 0.0)]):
            total += v * (max(min(t_next, end), start) - max(t, start))
        return total / (end - start)


def read(ledger: Ledger, plan: PlanRecord | None = None, since: float = 0.0) -> RunView:
    """The view of the whole run, every attempt of it (or of the attempts since `since`): each
    unit's last attempt from its row, the earlier ones from the events, on the lane its kind
    gives it (`lane_of`; `plan` names the stages whose units are tracks of their own)."""
    pending: list[Slice] = []
    own_tracks = plan.unit_tracks if plan is not None else frozenset()
    for record in ledger.stages():
        stage = record["stage"]
        pending += _stage_slices(ledger, stage, stage in own_tracks, since)
    slices = _pack(pending)
    events = ledger.events(since, moments=True)
    retried = {(e["stage"], e["unit"]) for e in events if e["kind"] == "retry"}
    view = RunView(slices, _moments(slices, events, retried))
    _usage(view, plan)
    return view


def lane_of(unit_tracks: bool, unit: str, worker: str | None) -> str:
    """The lane a unit's attempt is drawn on: a lane is what holds a placement of its own, a
    unit of a kind whose units are tracks of their own (a role replica, across its attempts
    and actors) or the worker (a pool or shard worker, a job's Ray worker) that ran it."""
    return unit if unit_tracks or not worker else worker


def _stage_slices(ledger: Ledger, stage: str, unit_tracks: bool, since: float) -> list[Slice]:
    """The stage's unit attempts as slices; above DETAIL_LIMIT of them a worker's back-to-back
    units of one state are one slice (read in order, a chunk at a time)."""
    many = ledger.span_count(stage, since) + ledger.attempt_count(stage, since) > DETAIL_LIMIT
    rows: Iterable[SpanRow]
    if many and not unit_tracks:
        rows = _coalesced(
            heapq.merge(
                ledger.spans_by_worker(stage, since),
                ledger.attempts_by_lane(stage, since),
                key=lambda r: (r["worker"] or "", r["started"], r["unit"]),
            )
        )
    else:
        rows = itertools.chain(ledger.spans(stage, since), ledger.attempts_by_lane(stage, since))
    return [
        Slice(
            stage,
            row["unit"],
            row["node_ip"] or _host(row["worker"]),
            f"{stage}/{lane_of(unit_tracks, row['unit'], row['worker'])}",
            row["started"],
            row["ended"],
            row["state"],
            row["attempts"],
            row["node_id"],
        )
        for row in rows
    ]


def _coalesced(rows: Iterable[SpanRow]) -> list[SpanRow]:
    """Back-to-back rows of one state on one worker merged into one row each; `rows` come
    ordered by worker, then start, and only the run being merged is held."""
    out: list[SpanRow] = []
    first: SpanRow | None = None
    count, last_end = 0, 0.0
    for row in rows:
        if first is not None and (
            row["worker"] != first["worker"]
            or row["state"] != first["state"]
            or row["started"] - last_end > BACK_TO_BACK
        ):
            out.append(_merged(first, count))
            first = None
        last_end = row["ended"]
        if first is None:
            first, count = row.copy(), 1
            continue
        count += 1
        first["ended"] = max(first["ended"], row["ended"])
        first["attempts"] = max(first["attempts"], row["attempts"])
    if first is not None:
        out.append(_merged(first, count))
    return out


def _merged(first: SpanRow, count: int) -> SpanRow:
    if count > 1:
        first["unit"] = f"{first['unit']} … ({count} units)"
    return first


def _host(worker: str | None) -> str:
    """The host part of a worker name (`host:pid` or a job's node), without an IP known."""
    return worker.rsplit(":", 1)[0] if worker else UNKNOWN_NODE


def _pack(slices: list[Slice]) -> list[Slice]:
    """Give overlapping slices of one lane their own numbered slots (`lane #2`)."""
    by_lane: dict[tuple[str, str], list[Slice]] = defaultdict(list)
    for s in slices:
        by_lane[(s.node, s.track)].append(s)
    packed: list[Slice] = []
    for (_, lane), group in by_lane.items():
        group.sort(key=lambda s: (s.start, s.end))
        ends: list[float] = []
        for s in group:
            slot = next((i for i, end in enumerate(ends) if end <= s.start + SLACK), len(ends))
            if slot == len(ends):
                ends.append(s.end)
            ends[slot] = s.end
            track = lane if slot == 0 else f"{lane} #{slot + 1}"
            packed.append(
                Slice(
                    s.stage, s.unit, s.node, track, s.start, s.end, s.state, s.attempts, s.node_id
                )
            )
    return packed


def _moments(
    slices: list[Slice], events: list[EventRow], retried: set[tuple[str, str]]
) -> list[Moment]:
    """Recorded preemptions and retries on the track of the attempt they hit; a timeout at the
    end of its slice; a retry at the start of a unit that took more than one attempt."""
    by_unit: dict[tuple[str, str], list[Slice]] = defaultdict(list)
    for s in slices:
        by_unit[(s.stage, s.unit)].append(s)
    moments = []
    for e in events:
        if e["kind"] == "attempt":
            continue
        hit = _attempt_at(by_unit.get((e["stage"], e["unit"]), []), e["time"])
        node, track = (hit.node, hit.track) if hit else (UNKNOWN_NODE, f"{e['stage']}/{e['unit']}")
        reason = e["detail"] or e["kind"]
        moments.append(Moment(e["stage"], e["unit"], node, track, e["time"], e["kind"], reason))
    for s in slices:
        if s.state == "timeout":
            moments.append(Moment(s.stage, s.unit, s.node, s.track, s.end, "timeout", "time limit"))
        if s.attempts > 1 and (s.stage, s.unit) not in retried:
            reason = f"attempt {s.attempts}"
            moments.append(Moment(s.stage, s.unit, s.node, s.track, s.start, "retry", reason))
    return sorted(moments, key=lambda m: m.time)


def _attempt_at(attempts: list[Slice], t: float) -> Slice | None:
    """The attempt running at `t`, else the one that ended last before it, else the first."""
    if not attempts:
        return None
    running = [s for s in attempts if s.start <= t <= s.end + 1e-3]
    if running:
        return running[0]
    before = [s for s in attempts if s.end <= t]
    return max(before, key=lambda s: s.end) if before else attempts[0]


def _usage(view: RunView, plan: PlanRecord | None) -> None:
    """CPUs and GPUs in use over time from each slice's size; busy lanes when sizes are
    unknown (a ledger written before plan records existed)."""
    deltas: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if plan is None:
        view.capacity = {"lanes": float(len(view.tracks()))}
        for s in view.slices:
            deltas["lanes"] += [(s.start, 1.0), (s.end, -1.0)]
    else:
        view.capacity = {"CPU": plan.capacity.cpus, "GPU": plan.capacity.gpus}
        for stage, start, end, res in _held(view.slices, plan):
            for name, amount in (("CPU", res.cpus), ("GPU", res.gpus)):
                if amount:
                    deltas[name] += [(start, amount), (end, -amount)]
                    held = view.held.setdefault(stage, {})
                    held[name] = held.get(name, 0.0) + amount * (end - start)
    for name, changes in deltas.items():
        changes.sort()
        steps: list[tuple[float, float]] = []
        level = 0.0
        for t, group in itertools.groupby(changes, key=lambda c: c[0]):
            level += sum(d for _, d in group)
            steps.append((t, max(level, 0.0)))
        view.usage[name] = steps


def _held(slices: list[Slice], plan: PlanRecord) -> list[tuple[str, float, float, Resources]]:
    """(stage, start, end, resources): per slice, or per busy stretch of a pool worker."""
    held: list[tuple[str, float, float, Resources]] = []
    lanes: dict[tuple[str, str], list[Slice]] = defaultdict(list)
    for s in slices:
        sizing = plan.sizing.get(s.stage)
        if sizing is None:
            continue
        if sizing.per_lane:
            lanes[(s.stage, s.track.split(" #")[0])].append(s)
        elif (res := sizing.of(s.unit)) is not None:
            held.append((s.stage, s.start, s.end, res))
    for (stage, _), group in lanes.items():
        res = plan.sizing[stage].default
        if res is None:
            continue
        group.sort(key=lambda s: s.start)
        start, end = group[0].start, group[0].end
        for s in group[1:]:
            if s.start > end:
                held.append((stage, start, end, res))
                start = s.start
            end = max(end, s.end)
        held.append((stage, start, end, res))
    return held
