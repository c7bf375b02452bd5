"""The plan as it ran, kept beside the run (`plan.json`).

A report drawn later (`mode=report`) must show why each unit ran or was skipped and how much
each unit held; re-planning then would answer for the *next* run (everything `done`). So the
end of a run writes what the report and the picture need: cluster capacity, per stage its
run/skip reasons, claims, notes, and the resources one unit (or one pool worker) held.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from runner.plan import Plan, StagePlan, StageSizing
from runner.resources import Resources
from runner.store import write_json

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PlanRecord:
    """The recorded plan: capacity, and per stage sizing, reasons, claims and notes."""

    where: str
    capacity: Resources
    sizing: dict[str, StageSizing]
    # per stage: [(run or skip, reason, how many)]
    reasons: dict[str, list[tuple[str, str, int]]]
    claims: dict[str, list[str]]
    notes: dict[str, list[str]]
    # the stages whose units are each drawn on a track of their own (`StagePlan.unit_tracks`)
    unit_tracks: frozenset[str] = frozenset()


def record(plan: Plan, path: Path) -> None:
    """Write the plan's record to `path` (JSON, atomically)."""
    stages: dict[str, dict[str, object]] = {}
    for name, stage in plan.stages.items():
        sizing = _sizing(stage)
        # by the run's end the executor has cleared `run` of every unit it saw through, so the
        # decision is read from the reason: only `done` units were skipped
        reasons = Counter(
            ("skip" if u.reason == "done" else "run", u.reason) for u in stage.units or []
        )
        stages[name] = {
            "kind": stage.kind,
            "per_lane": sizing.per_lane,
            "default": _dump(sizing.default),
            "units": {u: _dump(r) for u, r in sizing.units.items()},
            "reasons": [[verb, why, n] for (verb, why), n in sorted(reasons.items())],
            "claims": [
                f"{c.label}: {c.resources.describe()} each; {c.count} wanted, {c.fit} fit at once"
                for c in stage.claims
            ],
            "notes": list(stage.notes),
            "unit_tracks": stage.unit_tracks,
        }
    write_json(
        path,
        {"where": plan.cluster.where, "capacity": _dump(plan.cluster.total), "stages": stages},
    )


def load(path: Path) -> PlanRecord | None:
    """The record written by `record`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
        stages = data["stages"]
        return PlanRecord(
            where=str(data["where"]),
            capacity=_load(data["capacity"]) or Resources(),
            sizing={
                name: StageSizing(
                    bool(s["per_lane"]),
                    _load(s["default"]),
                    {u: r for u, v in s["units"].items() if (r := _load(v)) is not None},
                )
                for name, s in stages.items()
            },
            reasons={
                name: [(str(v), str(w), int(n)) for v, w, n in s["reasons"]]
                for name, s in stages.items()
            },
            claims={name: list(s["claims"]) for name, s in stages.items()},
            notes={name: list(s["notes"]) for name, s in stages.items()},
            # absent from a plan.json written before it was kept
            unit_tracks=frozenset(n for n, s in stages.items() if s.get("unit_tracks")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sizing(stage: StagePlan) -> StageSizing:
    """Resources per unit, as its kind planned them, else the stage's claim."""
    if stage.sizing is not None:
        return stage.sizing
    return StageSizing(False, stage.claims[0].resources if stage.claims else None)


def _dump(res: Resources | None) -> dict[str, float] | None:
    return None if res is None else {"cpus": res.cpus, "gpus": res.gpus, "memory": res.memory}


def _load(data: dict[str, float] | None) -> Resources | None:
    if data is None:
        return None
    return Resources(float(data["cpus"]), float(data["gpus"]), float(data["memory"]))
