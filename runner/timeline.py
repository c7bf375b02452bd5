"""The timeline picture of a run (`timeline.png`), drawn with matplotlib from the run's view.

A clock-time axis; one row per track, rows grouped by node (a bold node name over each group);
unit attempts as bars coloured by state, with a legend; preemptions, retries and timeouts
marked; below, CPUs and GPUs in use over time as a share of capacity, with the mean. When
there are more tracks than rows fit, neighbouring tracks of one node and stage share a row and
the row says how many: nothing is dropped. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from runner.spans import RunView
from runner.store import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PICTURE = "timeline.png"
MAX_ROWS = 60
# pixels an inch of the saved picture
DPI = 100
# the picture's width (inches), and a character's width at the labels' 8 points (DejaVu Sans)
WIDTH, CHAR_IN = 13.0, 0.07
STATE_COLOURS = {
    "done": "#4c9e5c",
    "failed": "#d2403a",
    "timeout": "#ec9628",
    "out_of_memory": "#a01c5a",
    "cancelled": "#969696",
    "preempted": "#8050aa",
    "running": "#4678c8",
    "pending": "#c8c8c8",
}
# moment kind → (marker, colour, legend label)
MARKERS = {
    "preempted": ("v", "#3c145a", "preemption"),
    "retry": ("x", "#000000", "retry"),
    "timeout": ("|", "#a0500a", "timeout"),
}


@dataclass(frozen=True)
class Row:
    """One row of the picture: a track, or `tracks` neighbouring tracks sharing it."""

    node: str
    label: str
    tracks: int


@dataclass(frozen=True)
class Drawing:
    """What was drawn: every track is in some row (sum of `rows[i].tracks` == `lanes`)."""

    path: Path
    lanes: int
    rows: list[Row]
    bars: int
    marks: int

    @property
    def grouped(self) -> bool:
        return any(r.tracks > 1 for r in self.rows)


def rows_for(
    view: RunView, max_rows: int = MAX_ROWS
) -> tuple[list[Row], dict[tuple[str, str], int]]:
    """Rows and the row of each (node, track). Tracks of one node and stage are put together k
    at a time, with the smallest k for which the rows fit."""
    tracks = view.tracks()
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node, track in tracks:
        groups[(node, track.split("/")[0])].append(track)
    k = max(1, math.ceil(len(tracks) / max_rows))
    while sum(math.ceil(len(g) / k) for g in groups.values()) > max_rows and k < len(tracks):
        k += 1
    rows: list[Row] = []
    index: dict[tuple[str, str], int] = {}
    for (node, stage), members in groups.items():
        for i in range(0, len(members), k):
            chunk = members[i : i + k]
            label = chunk[0] if len(chunk) == 1 else f"{stage}: {len(chunk)} lanes"
            for track in chunk:
                index[(node, track)] = len(rows)
            rows.append(Row(node, _short(label), len(chunk)))
    return rows, index


def draw(view: RunView, title: str, path: Path, max_rows: int = MAX_ROWS) -> Drawing:
    """Render the picture of `view` to `path` (PNG) and say what it holds."""
    from matplotlib import dates
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows, index = rows_for(view, max_rows)
    height = height_of(len(rows))
    fig = Figure(figsize=(WIDTH, height))
    top, bottom = fig.subplots(
        2, 1, sharex=True, height_ratios=[0.24 * len(rows) + 0.6, 1.6], squeeze=True
    )
    span = view.end - view.start
    started = datetime.fromtimestamp(view.start).strftime("%Y-%m-%d %H:%M:%S")
    lanes = len(view.tracks())
    shown = f"{lanes} lanes" + (f" in {len(rows)} rows" if len(rows) < lanes else "")
    top.set_title(
        f"{title}\nstarted {started}, {span:.1f}s, {len(view.slices)} unit attempts, {shown}",
        loc="left",
        fontsize=10,
    )
    alpha = 1.0 if len(rows) == lanes else 0.55
    by_row: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for s in view.slices:
        start = _day(s.start)
        width = max(s.end - s.start, span / 2000) / 86400
        by_row[(index[(s.node, s.track)], s.state)].append((start, width))
    for (row, state), bars in by_row.items():
        colour = STATE_COLOURS.get(state, "#5a5a5a")
        top.broken_barh(bars, (row - 0.38, 0.76), facecolors=colour, alpha=alpha, linewidth=0)
    for kind, (marker, colour, _) in MARKERS.items():
        points = [
            (_day(m.time), index[(m.node, m.track)])
            for m in view.moments
            if m.kind == kind and (m.node, m.track) in index
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            top.scatter(xs, ys, marker=marker, color=colour, s=36, zorder=3, linewidths=1.5)
    _rows_axis(top, rows)
    states = sorted({s.state for s in view.slices}, key=_state_order)
    handles: list[Patch | Line2D] = [
        Patch(color=STATE_COLOURS.get(s, "#5a5a5a"), label=s) for s in states
    ]
    handles += [
        Line2D([], [], marker=m, color=c, linestyle="", label=label)
        for kind, (m, c, label) in MARKERS.items()
        if any(x.kind == kind for x in view.moments)
    ]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    _utilization(bottom, view)
    locator = dates.AutoDateLocator()  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_locator(locator)
    concise = dates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_formatter(concise)
    bottom.set_xlabel("time (local clock)")
    _margins(fig, height, rows, [str(h.get_label()) for h in handles], list(view.usage))
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: a fifth of the default level's time, for a few percent larger file; written
    # aside and renamed, as every output is: a kill or a full disk never leaves half a picture
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    marks = sum(1 for m in view.moments if (m.node, m.track) in index)
    return Drawing(path, lanes, rows, len(view.slices), marks)


def height_of(rows: int) -> float:
    """The picture's height in inches for `rows` rows (`DPI` pixels an inch)."""
    return 2.6 + 0.24 * rows


def _margins(
    fig: Figure, height: float, rows: list[Row], legend: list[str], usage: list[str]
) -> None:
    """Margins from the longest row label and legend entry, at a character's width.

    Measured margins (matplotlib's constrained layout) cost two extra text-layout passes,
    a third of the picture's time and about 0.1 s at the end of every run."""
    label = max((len(r.label) for r in rows), default=4) * (CHAR_IN if len(rows) < 40 else 0.05)
    entries = legend + [f"{name}s in use (of 1000)" for name in usage]
    right = 0.55 + CHAR_IN * max((len(e) for e in entries), default=0)
    fig.subplots_adjust(
        left=max(0.25 + label, 0.75) / WIDTH,
        right=1 - right / WIDTH,
        top=1 - 0.6 / height,
        bottom=0.65 / height,
        hspace=0.12,
    )


def _rows_axis(ax: Axes, rows: list[Row]) -> None:
    """Row labels, a rule between nodes and the node's name above its rows."""
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8 if len(rows) < 40 else 6)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    previous = None
    for i, row in enumerate(rows):
        if row.node != previous:
            if i:
                ax.axhline(i - 0.5, color="#444444", linewidth=0.8)
            ax.annotate(
                row.node,
                (0, i - 0.5),
                xycoords=("axes fraction", "data"),
                xytext=(3, -1),
                textcoords="offset points",
                va="top",
                fontsize=8,
                fontweight="bold",
                color="#222222",
            )
            previous = row.node


def _utilization(ax: Axes, view: RunView) -> None:
    """Each resource in use as a share of capacity over time, with its mean."""
    colours = {"CPU": "#4678c8", "GPU": "#d2763a", "lanes": "#4678c8"}
    for name, steps in view.usage.items():
        capacity = view.capacity.get(name) or max((v for _, v in steps), default=1.0) or 1.0
        xs = [_day(t) for t, _ in steps]
        xs.append(_day(view.end))
        ys = [100 * v / capacity for _, v in steps]
        ys.append(ys[-1] if ys else 0.0)
        colour = colours.get(name, "#555555")
        what = "busy lanes" if name == "lanes" else f"{name}s in use"
        ax.step(xs, ys, where="post", color=colour, label=f"{what} (of {capacity:g})")
        mean = view.mean_use(name)
        ax.axhline(100 * mean / capacity, color=colour, linestyle="--", linewidth=1)
        ax.annotate(
            f"mean {mean:.2g} of {capacity:g} {name}s ({100 * mean / capacity:.0f}%)",
            (1, 100 * mean / capacity),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color=colour,
        )
    ax.set_ylim(0, 105)
    ax.set_ylabel("busy %")
    ax.grid(alpha=0.3)
    if view.usage:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def _day(t: float) -> float:
    """Seconds since the epoch → matplotlib's date number, on the local clock."""
    from matplotlib import dates

    return float(dates.date2num(datetime.fromtimestamp(t)))  # type: ignore[no-untyped-call]


def _short(label: str, width: int = 36) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def _state_order(state: str) -> int:
    """Legend order: the colour table's, states it does not name last."""
    order = list(STATE_COLOURS)
    return order.index(state) if state in order else len(order)
