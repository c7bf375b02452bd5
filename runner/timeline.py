"""The timeline picture of a run: one lane per worker / job / GPU group / role replica, units
as bars coloured by outcome, preemptions and retries marked, and a busy-lanes curve below.

Drawn from the ledger alone (unit rows and events), so `mode=report` can redraw any run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from runner.picture import GLYPH_H, GLYPH_W, Canvas, Color
from runner.store import Ledger

PICTURE = "timeline.png"
WIDTH, LANE_H, LEFT, TOP, CURVE_H = 1200, 12, 190, 34, 70
MAX_LANES = 80

OUTCOME: dict[str, Color] = {
    "done": (76, 158, 92),
    "failed": (210, 64, 58),
    "timeout": (236, 150, 40),
    "cancelled": (150, 150, 150),
    "preempted": (128, 80, 170),
    "running": (70, 120, 200),
    "pending": (200, 200, 200),
}
MARK: dict[str, Color] = {"preempted": (40, 20, 90), "retry": (0, 0, 0)}


@dataclass(frozen=True, slots=True)
class Bar:
    """A unit (or one attempt of it) on a lane."""

    lane: str
    start: float
    end: float
    outcome: str


@dataclass(frozen=True, slots=True)
class Mark:
    """A moment on a lane: a preemption or a retry."""

    lane: str
    time: float
    kind: str


def from_ledger(ledger: Ledger, since: float = 0.0) -> tuple[list[Bar], list[Mark]]:
    """Bars from unit rows (lane = stage/worker), marks from retries and recorded events;
    only what started at or after `since` (a run's start: earlier runs' units are not drawn)."""
    bars, marks = [], []
    for stage in ledger.stages():
        # a pool's lanes are its worker processes; other kinds' units are their own lanes
        by_worker = stage["kind"] == "pool"
        for unit, state, attempts, started, ended, worker in ledger.spans(stage["stage"], since):
            lane = f"{stage['stage']}/{(worker if by_worker else None) or unit}"
            bars.append(Bar(lane, started, ended, state))
            if attempts > 1:
                marks.append(Mark(lane, started, "retry"))
    for event in ledger.events():
        if event["time"] < since:
            continue
        lane = f"{event['stage']}/{event['lane'] or event['unit']}"
        if event["kind"] == "attempt":
            bars.append(Bar(lane, event["started"], event["time"], event["detail"] or "done"))
        else:
            marks.append(Mark(lane, event["time"], event["kind"]))
    return bars, marks


def draw_run(ledger: Ledger, title: str, path: Path) -> Path | None:
    """The picture of the ledger's last run, or None when it ran no unit."""
    run = ledger.last_run()
    bars, marks = from_ledger(ledger, since=run["started"] if run else 0.0)
    return draw(title, bars, marks, path) if bars else None


def draw(title: str, bars: list[Bar], marks: list[Mark], path: Path) -> Path:
    """Render the picture to `path` (PNG) and return it."""
    lanes = _lanes(bars)
    t0 = min((b.start for b in bars), default=0.0)
    t1 = max((b.end for b in bars), default=t0 + 1.0)
    span = max(t1 - t0, 1e-6)
    plot_w = WIDTH - LEFT - 20
    height = TOP + len(lanes) * LANE_H + CURVE_H + 50
    canvas = Canvas(WIDTH, height)
    canvas.text(10, 10, f"{title}  ({span:.1f}s, {len(bars)} bars, {len(lanes)} lanes)")

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * plot_w

    for n, lane in enumerate(lanes):
        y = TOP + n * LANE_H
        if n % 2:
            canvas.rect(LEFT, y, LEFT + plot_w, y + LANE_H, (246, 246, 246))
        canvas.text(8, y + 2, lane[-30:])
    index = {lane: n for n, lane in enumerate(lanes)}
    for bar in bars:
        if bar.lane in index:
            y = TOP + index[bar.lane] * LANE_H
            color = OUTCOME.get(bar.outcome, (90, 90, 90))
            canvas.rect(x(bar.start), y + 2, x(bar.end), y + LANE_H - 2, color)
    for mark in marks:
        if mark.lane in index:
            y = TOP + index[mark.lane] * LANE_H
            canvas.rect(
                x(mark.time) - 1, y, x(mark.time) + 2, y + LANE_H, MARK.get(mark.kind, (0, 0, 0))
            )
    _curve(canvas, bars, lanes, t0, span, TOP + len(lanes) * LANE_H + 10, plot_w)
    _legend(canvas, height - 14)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _lanes(bars: list[Bar]) -> list[str]:
    first: dict[str, float] = {}
    for bar in bars:
        first[bar.lane] = min(first.get(bar.lane, bar.start), bar.start)
    return sorted(first, key=lambda lane: (lane.split("/")[0], first[lane]))[:MAX_LANES]


def _curve(
    canvas: Canvas, bars: list[Bar], lanes: list[str], t0: float, span: float, top: int, plot_w: int
) -> None:
    """Busy lanes / all lanes over time, as filled columns."""
    canvas.text(8, top + 2, "busy lanes")
    canvas.rect(LEFT, top + CURVE_H - 10, LEFT + plot_w, top + CURVE_H - 9, (120, 120, 120))
    if not lanes:
        return
    busy: dict[int, set[str]] = defaultdict(set)
    for bar in bars:
        first = int((bar.start - t0) / span * (plot_w - 1))
        last = int((bar.end - t0) / span * (plot_w - 1))
        for col in range(first, last + 1):
            busy[col].add(bar.lane)
    height = CURVE_H - 12
    for col, active in busy.items():
        frac = min(len(active) / len(lanes), 1.0)
        canvas.rect(
            LEFT + col,
            top + CURVE_H - 10 - frac * height,
            LEFT + col + 1,
            top + CURVE_H - 10,
            (70, 120, 200),
        )
    canvas.text(LEFT - 30, top, "100%")


def _legend(canvas: Canvas, y: int) -> None:
    x = LEFT
    for name, color in [*OUTCOME.items(), *((f"{k} mark", c) for k, c in MARK.items())]:
        canvas.rect(x, y, x + 10, y + GLYPH_H - 1, color)
        canvas.text(x + 14, y, name)
        x += 14 + GLYPH_W * (len(name) + 2)
