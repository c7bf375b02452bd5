"""`report.html`: one self-contained page about a run, to read or attach to an issue.

Of the whole run, every attempt of it: per stage its summary (units by state, requeues,
preemptions by reason, waiting time by priority, lanes, utilization), the timeline picture
embedded as a base64 PNG with its lane count, the attempts, the slowest units, the failures
with their error lines, and the plan's reasons. Nothing is loaded from
elsewhere: styles are inline, the picture is a data URL.
"""

from __future__ import annotations

import base64
import html
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from runner.jsondata import json_list, json_number, json_object
from runner.planfile import PlanRecord
from runner.spans import RunView
from runner.store import Ledger, atomic_path

REPORT = "report.html"
SLOWEST = 10
FAILURES = 50
STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right}
pre{margin:0;white-space:pre-wrap;font-size:12px}img{max-width:100%}.muted{color:#777}
"""


def render(
    ledger: Ledger,
    view: RunView,
    plan: PlanRecord | None,
    summary: Mapping[str, object],
    title: str,
    picture: Path | None,
) -> str:
    """The page's HTML, of the whole run (`summary` is `history.whole_run`)."""
    parts = [f"<h1>{_e(title)}</h1>", _run_line(summary, view, plan)]
    parts += ["<h2>Stages</h2>", _stages_table(ledger, view, plan, summary)]
    if picture is not None and picture.exists():
        data = base64.b64encode(picture.read_bytes()).decode()
        lanes = len(view.tracks())
        parts += [
            "<h2>Timeline</h2>",
            f'<img alt="timeline" src="data:image/png;base64,{data}">',
            f'<p class="muted" id="lanes">{lanes} lane{"s" * (lanes != 1)}: '
            "one per worker or role replica</p>",
        ]
    parts += ["<h2>Attempts</h2>", _attempts(summary)]
    parts += ["<h2>Slowest units</h2>", _slowest(view)]
    parts += ["<h2>Failures</h2>", _failures(ledger)]
    parts += ["<h2>Plan</h2>", _plan(plan)]
    body = "\n".join(parts)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write(
    ledger: Ledger,
    view: RunView,
    plan: PlanRecord | None,
    summary: Mapping[str, object],
    title: str,
    picture: Path | None,
    path: Path,
) -> Path:
    """Write the page to `path` atomically and return it."""
    with atomic_path(path) as tmp:
        tmp.write_text(render(ledger, view, plan, summary, title, picture), encoding="utf-8")
    return path


def _run_line(summary: Mapping[str, object], view: RunView, plan: PlanRecord | None) -> str:
    every = json_list(summary["attempts"])
    started = json_number(json_object(every[0])["started"]) if every else None
    code = summary.get("exit_code")
    where = f" on {_e(plan.where)}" if plan else ""
    usage = ", ".join(
        f"{name} mean {view.mean_use(name):.2g} of {cap:g} ({100 * view.mean_use(name) / cap:.0f}%)"
        for name, cap in view.capacity.items()
        if cap
    )
    return (
        f"<p>started {_when(started)}{where}; exit code {'-' if code is None else code}; "
        f"{len(view.slices)} unit attempts over {view.end - view.start:.1f}s"
        f"{'; ' + _e(usage) if usage else ''}</p>"
    )


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _attempts(summary: Mapping[str, object]) -> str:
    """One row per attempt of the run: when, how it ended, how many units it set out to run
    and what became of them."""
    rows = []
    for a in map(json_object, json_list(summary["attempts"])):
        stages = [json_object(s) for s in json_object(a.get("stages")).values()]
        did = _pairs(
            (k, n)
            for k in ("done", "failed", "timeout", "cancelled", "skipped")
            if (n := int(sum(json_number(s.get(k, 0)) for s in stages)))
        )
        code = a["exit_code"]
        rows.append(
            (
                str(a["attempt"]),
                _when(json_number(a["started"])),
                _when(json_number(a["ended"]))
                if a["ended"]
                else "never ended (its runner was killed)",
                "-" if code is None else str(code),
                str(a.get("units_run", "-")),
                did or "-",
                f"{json_number(a['wall_s']):.1f}s" if "wall_s" in a else "-",
            )
        )
    header = ("attempt", "started", "ended", "exit code", "units to run", "units", "wall")
    return _table(header, rows)


def _stages_table(
    ledger: Ledger, view: RunView, plan: PlanRecord | None, summary: Mapping[str, object]
) -> str:
    header = (
        "stage",
        "kind",
        "state",
        "units by state",
        "requeues",
        "preemptions by reason",
        "waiting by priority",
        "lanes",
        "wall",
        "utilization",
    )
    lanes = Counter(track.split("/", 1)[0] for _, track in view.tracks())
    rows = []
    for st in ledger.stages():
        name = st["stage"]
        whole = json_object(json_object(summary["stages"]).get(name))
        wall = json_number(whole.get("wall_s", 0.0))
        util = _utilization(view, plan, name, wall, json_number(whole.get("cpu_s", 0.0)))
        rows.append(
            (
                name,
                st["kind"],
                st["state"],
                _pairs(sorted(ledger.counts(name).items())) or "-",
                str(whole.get("requeues", 0)),
                # reasons that chose a victim (zeros say nothing)
                _pairs((r, n) for r, n in json_object(whole.get("preemptions")).items() if n)
                or "-",
                _pairs(
                    (p, f"{w['mean_s']:.2f}s mean, {w['max_s']:.2f}s max, {w['units']} units")
                    for p, w in _waits(whole)
                )
                or "-",
                str(lanes.get(name, 0)),
                f"{wall:.1f}s",
                util,
            )
        )
    return _table(header, rows)


def _waits(stage: Mapping[str, object]) -> list[tuple[str, Mapping[str, object]]]:
    """A stage's waiting times by priority: (priority, {mean_s, max_s, units})."""
    waits = json_object(stage.get("waiting_s_by_priority"))
    return [(p, json_object(w)) for p, w in waits.items()]


def _utilization(
    view: RunView, plan: PlanRecord | None, stage: str, wall: float, cpu_seconds: float
) -> str:
    """Share of the cluster the stage's units held over its wall time, and CPU time used."""
    if plan is None or not wall:
        return "-"
    parts = []
    for name, seconds in view.held.get(stage, {}).items():
        capacity = plan.capacity.cpus if name == "CPU" else plan.capacity.gpus
        if capacity:
            parts.append(f"{name}s held {100 * seconds / (wall * capacity):.0f}%")
    if cpu_seconds and plan.capacity.cpus:
        parts.append(f"CPU time {100 * cpu_seconds / (wall * plan.capacity.cpus):.0f}%")
    return ", ".join(parts) or "-"


def _slowest(view: RunView) -> str:
    slowest = sorted(view.slices, key=lambda s: s.end - s.start, reverse=True)[:SLOWEST]
    if not slowest:
        return '<p class="muted">no unit ran</p>'
    return _table(
        ("stage", "unit", "state", "seconds", "node", "track"),
        [(s.stage, s.unit, s.state, f"{s.end - s.start:.2f}", s.node, s.track) for s in slowest],
    )


def _failures(ledger: Ledger) -> str:
    bad = [
        r
        for st in ledger.stages()
        for r in ledger.rows(st["stage"], unfinished=True)
        if r.state.value in ("failed", "timeout")
    ]
    if not bad:
        return '<p class="muted">none</p>'
    rows = [
        (r.stage, r.unit, r.state.value, str(r.attempts), r.worker or "-", _Pre(r.error or ""))
        for r in bad[:FAILURES]
    ]
    more = f"<p>... and {len(bad) - FAILURES} more</p>" if len(bad) > FAILURES else ""
    return _table(("stage", "unit", "state", "attempts", "worker", "error"), rows) + more


def _plan(plan: PlanRecord | None) -> str:
    if plan is None:
        return '<p class="muted">no plan recorded for this run</p>'
    parts = []
    for stage, reasons in plan.reasons.items():
        parts.append(f"<h3>{_e(stage)}</h3>")
        parts += [f"<p>{_e(line)}</p>" for line in plan.claims[stage] + plan.notes[stage]]
        parts.append(
            _table(("decision", "reason", "units"), [(v, w, str(n)) for v, w, n in reasons])
        )
    return "\n".join(parts)


class _Pre(str):
    """A cell shown preformatted (error text keeps its lines)."""


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _cell(value: str) -> str:
    if isinstance(value, _Pre):
        return f"<td><pre>{_e(value)}</pre></td>"
    numeric = value.replace(".", "", 1).rstrip("s%").isdigit()
    return f'<td class="n">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _pairs(items: Iterable[tuple[object, object]]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in items)


def _e(text: str) -> str:
    return html.escape(str(text))
