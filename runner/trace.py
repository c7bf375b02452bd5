"""A run as a Chrome trace-event file (`trace.json`), which Perfetto and chrome://tracing open.

One process per node, one thread (track) per worker / replica / job slot, each unit attempt a
complete slice (`ph: X`), preemptions, retries and timeouts as instant events with their
reason, and counter tracks of CPUs and GPUs in use against capacity. Like `ray timeline`, the
file is a JSON array with timestamps in microseconds since the epoch and processes named
`Node <ip>`, so the two merge by concatenation (`jq -s add trace.json ray-timeline.json`).
Our process ids start at PID_BASE so they never collide with Ray's 0, 1, 2 ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Required, TypedDict

from runner.spans import RunView
from runner.store import atomic_path

TRACE = "trace.json"
PID_BASE = 10_000
# chrome://tracing's reserved colour names, by unit state
COLOURS = {
    "done": "good",
    "failed": "terrible",
    "timeout": "bad",
    "cancelled": "grey",
    "preempted": "yellow",
    "running": "thread_state_running",
    "pending": "thread_state_unknown",
}


class TraceEvent(TypedDict, total=False):
    """One event of the Chrome trace-event format, as far as this file writes them."""

    name: Required[str]
    # the phase: M metadata, X a complete slice, i an instant, C a counter
    ph: Required[str]
    pid: Required[int]
    tid: int
    # microseconds since the epoch; a slice's duration
    ts: int
    dur: int
    cat: str
    # an instant's scope: t its thread, p its process
    s: str
    cname: str
    args: Required[dict[str, object]]


def events(view: RunView, title: str) -> list[TraceEvent]:
    """The trace events of a run: metadata, slices, instants and counters."""
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], int] = {}
    out: list[TraceEvent] = []
    for node, track in view.tracks():
        pid = pids.setdefault(node, PID_BASE + 1 + len(pids))
        tids[(node, track)] = len(tids) + 1
        out.append(_meta("thread_name", pid, tids[(node, track)], track))
        out.append(_meta("thread_sort_index", pid, tids[(node, track)], tids[(node, track)]))
    node_ids = {s.node: s.node_id for s in view.slices if s.node_id}
    for node, pid in pids.items():
        out.append(_meta("process_name", pid, 0, f"Node {node}"))
        labels = f"runner {title}" + (f" node_id={node_ids[node]}" if node in node_ids else "")
        out.append(_meta("process_labels", pid, 0, labels))
    for s in view.slices:
        out.append(
            {
                "name": s.unit,
                "cat": s.stage,
                "ph": "X",
                "ts": _us(s.start),
                "dur": max(_us(s.end) - _us(s.start), 1),
                "pid": pids[s.node],
                "tid": tids[(s.node, s.track)],
                "cname": COLOURS.get(s.state, "generic_work"),
                "args": {
                    "stage": s.stage,
                    "unit": s.unit,
                    "state": s.state,
                    "attempts": s.attempts,
                    "node": s.node,
                    **({"node_id": s.node_id} if s.node_id else {}),
                },
            }
        )
    for m in view.moments:
        pid = pids.get(m.node, PID_BASE)
        out.append(
            {
                "name": f"{m.kind}: {m.reason}",
                "cat": m.kind,
                "ph": "i",
                "s": "t" if (m.node, m.track) in tids else "p",
                "ts": _us(m.time),
                "pid": pid,
                "tid": tids.get((m.node, m.track), 0),
                "args": {"stage": m.stage, "unit": m.unit, "kind": m.kind, "reason": m.reason},
            }
        )
    out += _counters(view)
    return out


def write(view: RunView, title: str, path: Path) -> Path:
    """Write the trace of `view` to `path` atomically and return it."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(events(view, title), separators=(",", ":")))
    return path


def _counters(view: RunView) -> list[TraceEvent]:
    """Counter tracks on a `cluster` process: in use and capacity, per resource."""
    out = [_meta("process_name", PID_BASE, 0, "cluster (runner)")]
    for name, steps in view.usage.items():
        capacity = view.capacity.get(name, 0.0)
        points = [*steps, (view.end, steps[-1][1] if steps else 0.0)]
        for t, level in points:
            out.append(
                {
                    "name": f"{name} in use",
                    "ph": "C",
                    "ts": _us(t),
                    "pid": PID_BASE,
                    "args": {"in use": round(level, 4), "capacity": capacity},
                }
            )
    return out


def _meta(name: str, pid: int, tid: int, value: str | int) -> TraceEvent:
    key = {"process_labels": "labels", "thread_sort_index": "sort_index"}.get(name, "name")
    return TraceEvent(name=name, ph="M", pid=pid, tid=tid, args={key: value})


def _us(t: float) -> int:
    """Seconds since the epoch → whole microseconds since the epoch (Ray's trace clock)."""
    return round(t * 1e6)
