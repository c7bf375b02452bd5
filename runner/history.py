"""A run directory's history: what each attempt of the run did, and the whole run across them.

A run directory holds one run however many times the runner is started on it (Ctrl-C and
resume, a rerun after a failure, a rerun with nothing left to do): each start is an
*attempt*. The ledger keeps what each attempt did (its summary, in the `runs` table), every
unit's last attempt (`units`), the earlier attempts of units that ran again and the moments
worth drawing (`events`), and the stages' own event logs (`log`). `summary.json`,
`report.html`, the timeline, the trace and a roles stage's `events.jsonl` are all read from the
ledger through here and `spans`, so they describe the whole run and agree with each other:
an attempt that runs nothing adds a line to the attempts list and changes nothing else.

Requeues (units queued again: retried after a failure, preempted, or not started where they
were granted) and preemptions by reason are counted from the recorded events, the one place
they are written, for an attempt and for the whole run alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Required, TypedDict, cast

from runner.kind import StageOutcome
from runner.plan import Plan
from runner.scheduler.policy import REASONS
from runner.store import Ledger

# the unit counts of a stage's summary, as the ledger names the states they count
UNIT_COUNTS = {
    "done": ("done",),
    "failed": ("failed", "out_of_memory"),
    "timeout": ("timeout",),
    "cancelled": ("cancelled",),
}
# events that put a unit back in the queue
REQUEUED = ("retry", "preempted")


class Requeues(TypedDict):
    """A stage's units queued again, and its preemptions by reason."""

    requeues: int
    preemptions: dict[str, int]


class Attempt(TypedDict, total=False):
    """One attempt as `summary.json`'s `attempts` lists it: its number, start, end and exit
    code, then what it did (`attempt_summary`'s keys; none for an attempt whose runner never
    ended it). A stage's summary holds its kind's own keys beside the common ones."""

    attempt: Required[int]
    started: Required[float]
    ended: Required[float | None]
    exit_code: Required[int | None]
    pipeline: str
    ok: bool
    wall_s: float
    cluster_cpus: float
    cpu_utilization: float | None
    units_run: int
    stages: dict[str, dict[str, object]]


class Wait(TypedDict):
    """Waiting time of one priority's units: how many, their mean and longest wait."""

    units: int
    mean_s: float
    max_s: float


def attempt_summary(
    plan: Plan,
    outcomes: Mapping[str, StageOutcome],
    wall: float,
    ledger: Ledger,
    since: float,
) -> dict[str, object]:
    """What one attempt (started at `since`) did: per stage its counts, wall time, CPU
    utilization (CPU seconds / (wall × cluster CPUs)), requeues and preemptions by reason, and
    how many units it set out to run (`to_run`)."""
    cpus = plan.cluster.total.cpus
    counted = requeues(ledger, since)
    stages: dict[str, dict[str, object]] = {}
    for name, o in outcomes.items():
        stages[name] = {
            "kind": o.kind,
            "ok": o.ok,
            "total": o.total,
            "to_run": o.total - o.skipped,
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
            **counted.get(name, _no_requeues()),
        }
    total_cpu = sum(o.cpu_seconds for o in outcomes.values())
    return {
        "pipeline": plan.pipeline,
        "ok": all(o.ok for o in outcomes.values()) and len(outcomes) == len(plan.stages),
        "wall_s": round(wall, 3),
        "cluster_cpus": cpus,
        "cpu_utilization": round(total_cpu / (wall * cpus), 3) if wall and cpus else None,
        "units_run": sum(o.total - o.skipped for o in outcomes.values()),
        "stages": stages,
    }


def requeues(ledger: Ledger, since: float = 0.0) -> dict[str, Requeues]:
    """Per stage, from the events recorded since `since`: `requeues` (units queued again) and
    `preemptions` by reason."""
    found: dict[str, Requeues] = {}
    for (stage, kind, detail), n in ledger.event_counts(since).items():
        if kind not in REQUEUED:
            continue
        counts = found.setdefault(stage, _no_requeues())
        counts["requeues"] += n
        if kind == "preempted":
            reasons = counts["preemptions"]
            reasons[detail] = reasons.get(detail, 0) + n
    return found


def _no_requeues() -> Requeues:
    return Requeues(requeues=0, preemptions=dict.fromkeys(REASONS, 0))


def attempts(ledger: Ledger) -> list[Attempt]:
    """Every attempt of the run, first first: its number, start, end, exit code, and what it
    did (its summary's keys; none for an attempt whose runner never ended it, e.g. SIGKILL)."""
    found = []
    for run in ledger.runs():
        entry: dict[str, object] = {
            "attempt": run["id"],
            "started": run["started"],
            "ended": run["ended"],
            "exit_code": run["exit_code"],
        }
        summary = run["summary"]
        if isinstance(summary, dict):
            entry.update(summary)
        found.append(cast(Attempt, entry))  # the summary as attempt_summary wrote it
    return found


def ran_something(attempt: Mapping[str, object]) -> bool:
    """Whether the attempt had units to run (one whose runner never ended it surely had)."""
    return "stages" not in attempt or bool(attempt.get("units_run"))


def whole_run(ledger: Ledger) -> dict[str, object]:
    """The whole run across its attempts (`summary.json`): per stage its units by state now,
    the wall and CPU time of the attempts that ran it, its requeues and preemptions, and what
    the latest attempt that ran it said; then every attempt, in `attempts`."""
    every = attempts(ledger)
    told = [a for a in every if "stages" in a]
    doing = [a for a in told if ran_something(a)] or told[-1:]
    names = list(dict.fromkeys(name for a in told for name in a["stages"]))
    counted = requeues(ledger)
    stages = {name: _whole_stage(ledger, name, told, counted) for name in names}
    wall = sum(float(a["wall_s"]) for a in doing)
    cpu = sum(_seconds(s, "cpu_s") for a in doing for s in a["stages"].values())
    capacity = sum(float(a["wall_s"]) * float(a["cluster_cpus"]) for a in doing)
    latest: Mapping[str, object] = doing[-1] if doing else {}
    return {
        "pipeline": latest.get("pipeline"),
        "ok": bool(stages) and all(s["ok"] for s in stages.values()) and bool(latest.get("ok")),
        "wall_s": round(wall, 3),
        "cluster_cpus": latest.get("cluster_cpus"),
        "cpu_utilization": round(cpu / capacity, 3) if capacity else None,
        "exit_code": _exit_code(every),
        "stages": stages,
        "attempts": every,
    }


def _exit_code(every: list[Attempt]) -> int | None:
    """The run's exit code: that of the latest attempt that ran something."""
    doing = [a for a in every if ran_something(a)] or every[-1:]
    return doing[-1]["exit_code"] if doing else None


def _whole_stage(
    ledger: Ledger, name: str, told: list[Attempt], counted: dict[str, Requeues]
) -> dict[str, object]:
    own = [a["stages"][name] for a in told if name in a["stages"]]
    ran = [s for s in own if s.get("to_run")]
    stage = {k: v for k, v in (ran or own)[-1].items() if k not in ("to_run", "skipped")}
    by_state = ledger.counts(name)
    for key, states in UNIT_COUNTS.items():
        stage[key] = sum(by_state.get(s, 0) for s in states)
    wall = sum(_seconds(s, "wall_s") for s in ran)
    cpu = sum(_seconds(s, "cpu_s") for s in ran)
    cpus = float(told[-1].get("cluster_cpus") or 0)
    stage["wall_s"], stage["cpu_s"] = round(wall, 3), round(cpu, 3)
    stage["cpu_utilization"] = round(cpu / (wall * cpus), 3) if wall and cpus else None
    stage.update(counted.get(name, _no_requeues()))
    for key, merge in _MERGED.items():
        parts = [s[key] for s in ran if key in s]
        if parts:
            stage[key] = merge(parts)
    return stage


def _seconds(stage: Mapping[str, object], key: str) -> float:
    """A stage summary's number at `key` (0 when it has none)."""
    value = stage.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def _summed(parts: Iterable[object]) -> dict[str, object]:
    """Numbers added key by key (nested mappings too): what several attempts used in all."""
    total: dict[str, object] = {}
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        for key, value in part.items():
            have = total.get(key)
            if isinstance(value, Mapping):
                total[key] = _summed([have if isinstance(have, Mapping) else {}, value])
            elif isinstance(value, int | float):
                total[key] = round((have if isinstance(have, int | float) else 0) + value, 3)
    return total


def _waits(parts: Iterable[object]) -> dict[str, Wait]:
    """Waiting time by priority over several attempts: units added, the mean weighted by
    them, the longest wait."""
    merged: dict[str, Wait] = {}
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        for priority, w in part.items():
            seen = merged.setdefault(priority, Wait(units=0, mean_s=0.0, max_s=0.0))
            units = seen["units"] + w["units"]
            seen["mean_s"] = round(
                (seen["mean_s"] * seen["units"] + w["mean_s"] * w["units"]) / units, 3
            )
            seen["units"], seen["max_s"] = units, max(seen["max_s"], w["max_s"])
    return {p: merged[p] for p in sorted(merged, key=float)}


# what a kind adds to its summary that adds up over attempts, and how
_MERGED: dict[str, Callable[[list[object]], object]] = {
    "accounts": _summed,  # a jobs stage's use per SCNS account
    "placement_groups": _summed,  # a roles stage's groups created and reused
    "waiting_s_by_priority": _waits,
}
