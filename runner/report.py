"""What a user reads: the plan, the end-of-run summary, and the status of a run directory."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from runner import history, planfile, procs, report_html, spans, timeline, trace
from runner.jsondata import json_list, json_number, json_object
from runner.lifecycle import UnitState
from runner.plan import Plan, StagePlan
from runner.scheduler.policy import REASONS
from runner.store import Ledger, StageRow, UnitRow, atomic_path

if TYPE_CHECKING:
    from runner.kind import StageKind

SAMPLE = 5
# what every run writes beside its ledger, by the summary key that names it
ARTIFACTS = ("timeline", "trace", "report")
# a stage's own event log (a roles stage's), in its directory
STAGE_LOG = "events.jsonl"


def write_run_artifacts(
    ledger: Ledger, title: str, root: Path, plan: Plan | None = None
) -> dict[str, str | None]:
    """Write the run's timeline picture, trace, HTML report and stage event logs into `root`,
    all of the whole run (every attempt, `history`); return the paths by name (None when there
    is nothing to draw). At the end of an attempt that ran something `plan` is given and
    recorded (`plan.json`); `mode=report` reads that record back."""
    if plan is not None:
        planfile.record(plan, root / planfile.PLAN_FILE)
    record = planfile.load(root / planfile.PLAN_FILE)
    written: dict[str, str | None] = dict.fromkeys(ARTIFACTS)
    if not ledger.stages():
        return written
    view = spans.read(ledger, record)
    for stage in ledger.logged_stages():
        write_log(ledger, stage, root / stage / STAGE_LOG)
    picture = None
    if view.slices:
        picture = timeline.draw(view, title, root / timeline.PICTURE).path
        written["timeline"] = str(picture)
        written["trace"] = str(trace.write(view, title, root / trace.TRACE))
    summary = history.whole_run(ledger)
    page = report_html.write(
        ledger, view, record, summary, title, picture, root / report_html.REPORT
    )
    written["report"] = str(page)
    return written


def write_log(ledger: Ledger, stage: str, path: Path) -> None:
    """A stage's event log over every attempt (`events.jsonl`), one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in ledger.log(stage)))


def format_plan(plan: Plan) -> str:
    """Per stage: units, resources per unit, how many fit at once, and run/skip with why."""
    lines = [f"plan for pipeline '{plan.pipeline}' on {plan.cluster.where}", ""]
    for stage in plan.stages.values():
        lines += _stage_plan(stage)
    to_run = sum(len(s.to_run) for s in plan.stages.values())
    deferred = [s.name for s in plan.stages.values() if s.units is None]
    tail = f"{to_run} unit(s) to run"
    if deferred:
        tail += f"; units of {', '.join(deferred)} are known once their inputs have run"
    lines.append(tail)
    return "\n".join(lines)


def _stage_plan(stage: StagePlan) -> list[str]:
    needs = f"  needs: {', '.join(stage.spec.needs)}" if stage.spec.needs else ""
    count = "?" if stage.units is None else str(len(stage.units))
    lines = [f"stage {stage.name} ({stage.kind}): {count} unit(s){needs}"]
    for c in stage.claims:
        lines.append(
            f"  {c.label}: {c.resources.describe()} each; {c.count} wanted, {c.fit} fit at once"
        )
    lines += [f"  {note}" for note in stage.notes]
    if stage.units is None:
        lines.append(f"  run all: {stage.pending_reason}")
    else:
        # counts and the first few ids of each (run, reason): a million-unit plan is read once,
        # without a list of ids per group
        counts: Counter[tuple[bool, str]] = Counter((u.run, u.reason) for u in stage.units)
        samples: dict[tuple[bool, str], list[str]] = {group: [] for group in counts}
        wanting = len(samples)
        for u in stage.units:
            shown = samples[(u.run, u.reason)]
            if len(shown) < SAMPLE:
                shown.append(u.id)
                wanting -= len(shown) == SAMPLE or counts[(u.run, u.reason)] == len(shown)
                if not wanting:
                    break
        for (run, reason), n in sorted(counts.items(), key=lambda g: (not g[0][0], g[0][1])):
            verb = "run " if run else "skip"
            lines.append(f"  {verb} {n:>6}  {reason:<24} {_sample(samples[(run, reason)], n)}")
    lines.append("")
    return lines


def _sample(ids: list[str], total: int) -> str:
    shown = ", ".join(ids[:SAMPLE])
    return f"[{shown}{', ...' if total > SAMPLE else ''}]"


def format_summary(summary: Mapping[str, object], run_dir: str) -> str:
    """The end-of-run table of the attempt that just ended, one row per stage, with what each
    stage said (its requeues and preemptions too); then the whole run's files."""
    every = json_list(summary["attempts"])
    attempt = json_object(every[-1])
    stages = {str(k): json_object(v) for k, v in json_object(attempt["stages"]).items()}
    header = ("stage", "kind", "done", "failed", "timeout", "cancelled", "skipped", "wall")
    rows = [
        (
            name,
            s["kind"],
            *(s[k] for k in ("done", "failed", "timeout", "cancelled", "skipped")),
            f"{json_number(s['wall_s']):.1f}s",
            "-"
            if s["cpu_utilization"] is None
            else f"{100 * json_number(s['cpu_utilization']):.0f}%",
        )
        for name, s in stages.items()
    ]
    lines = _table((*header, "cpu util"), rows)
    accounts = [
        (name, account, use["jobs"], f"{json_number(use['cpu_s']):.1f}")
        for name, s in stages.items()
        for account, use in ((a, json_object(u)) for a, u in json_object(s.get("accounts")).items())
    ]
    if accounts:  # SCNS's accounting: what each account's jobs used
        lines += _table(("stage", "account", "jobs", "cpu-seconds"), accounts)
    for name, s in stages.items():
        if s["message"]:
            lines.append(f"{name}: {s['message']}")
        if requeued := requeue_line(s):
            lines.append(f"{name}: {requeued}")
        lines += [f"{name}: wrote {out}" for out in json_list(s["outputs"])]
    lines += [f"{a}: {summary[a]}" for a in ARTIFACTS if summary.get(a)]
    state = "succeeded" if attempt["ok"] else "did not succeed"
    lines.append(f"run {state} in {json_number(attempt['wall_s']):.1f}s; run dir {run_dir}")
    if len(every) > 1:
        n = len(every)
        lines.append(f"attempt {n} of this run; summary.json and report.html describe all {n}")
    return "\n".join(lines)


def requeue_line(stage: Mapping[str, object]) -> str:
    """'preemptions: label 1, same_pool 1, cross_pool 0; requeues 2; mean wait by priority
    10: 0.01s, ...' for a stage whose units were queued again or waited by priority, else ''.
    Each part only where it has something to say: units retried after a failure, never
    preempted, are 'requeues 1' without a line of zero preemptions."""
    preemptions = json_object(stage.get("preemptions"))
    waits = json_object(stage.get("waiting_s_by_priority"))
    parts = []
    if any(preemptions.values()):
        reasons = [*REASONS, *(r for r in preemptions if r not in REASONS)]
        parts.append(f"preemptions: {', '.join(f'{r} {preemptions.get(r, 0)}' for r in reasons)}")
    if stage.get("requeues"):
        parts.append(f"requeues {stage['requeues']}")
    if waits:
        by_priority = sorted(waits.items(), key=lambda w: float(w[0]), reverse=True)
        means = (f"{p}: {json_number(json_object(w).get('mean_s')):.2f}s" for p, w in by_priority)
        parts.append(f"mean wait by priority {', '.join(means)}")
    return "; ".join(parts)


def format_status(
    ledger: Ledger, run_dir: str, kinds: Mapping[str, StageKind], limit: int = 20
) -> str:
    """The ledger of a run directory: per stage its state and counts, a table of the units of
    each stage whose kind lists them as jobs (`StageKind.job_table`), then unfinished units."""
    stages = ledger.stages()
    if not stages:
        return f"{run_dir}: no stage has run yet"
    gone = runner_gone(ledger)
    if gone is not None:
        # a runner that died without ending its run (SIGKILL, a lost machine) left stages
        # marked running: they are not
        stages = [s | {"state": "interrupted"} if s["state"] == "running" else s for s in stages]
    counts_of = {s["stage"]: ledger.counts(s["stage"]) for s in stages}
    lines = [f"run dir {run_dir}", *_status_table(stages, counts_of)]
    if gone is not None:
        lines.append(gone)
    jobs = {
        s["stage"]: count
        for s in stages
        if (kind := kinds.get(s["kind"])) is not None
        and kind.job_table
        # a stage that never ran (its needs failed) has no job to list
        and (count := sum(counts_of[s["stage"]].values()))
    }
    lines += _jobs_tables(ledger, jobs, run_dir, gone is not None)
    lines += _not_done(ledger, counts_of, run_dir, limit, gone is not None)
    return "\n".join(lines)


# the states in which a runner that died (SIGKILL, a lost machine) leaves the units it had
# started: they run no more, and the next run starts them again
_CUT_SHORT = frozenset({UnitState.granted, UnitState.running})


def _state(row: UnitRow, gone: bool, label: bool = False) -> str:
    """A unit's state as status shows it (`label`: Slurm's names, for a jobs table); one
    its runner's death cut short (`gone`) is interrupted, not running."""
    if gone and row.state in _CUT_SHORT:
        return "INTERRUPTED" if label else "interrupted"
    return row.state.label if label else row.state.value


def _status_table(stages: list[StageRow], counts_of: dict[str, dict[str, int]]) -> list[str]:
    header = ("stage", "kind", "state", "done", "failed", "timeout", "cancelled", "ended")
    rows = []
    for s in stages:
        counts = counts_of[s["stage"]]
        ended = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["ended"])) if s["ended"] else "-"
        )
        # counted as the summary counts them: an OUT_OF_MEMORY job is `failed` (it was in none)
        tally = (sum(counts.get(k, 0) for k in states) for states in history.UNIT_COUNTS.values())
        rows.append((s["stage"], s["kind"], s["state"], *tally, ended))
    return _table(header, rows)


def _not_done(
    ledger: Ledger, counts_of: dict[str, dict[str, int]], run_dir: str, limit: int, gone: bool
) -> list[str]:
    """The units not done, the first `limit` of them (counted and read by SQLite: a stage of a
    million units shows a page), and where their stages' whole stories are."""
    not_done = {
        stage: sum(n for k, n in counts.items() if k != "done")
        for stage, counts in counts_of.items()
    }
    total = sum(not_done.values())
    if not total:
        return []
    bad: list[UnitRow] = []
    for stage, n in not_done.items():
        if n and len(bad) < limit:
            bad += ledger.rows(stage, unfinished=True, limit=limit - len(bad))
    lines = ["", f"units not done ({total}):"]
    lines += _table(
        ("stage", "unit", "state", "attempts", "error"),
        [(r.stage, r.unit, _state(r, gone), r.attempts, _first_line(r.error)[:80]) for r in bad],
    )
    if total > limit:
        lines.append(f"... and {total - limit} more")
    lines += _where_to_look(sorted(k for k, n in not_done.items() if n), Path(run_dir))
    return lines


def runner_gone(ledger: Ledger) -> str | None:
    """A line saying the last run was interrupted, when it never ended and its runner (the
    pid in the ledger's `runs` table) is no longer alive; None otherwise."""
    last = ledger.last_run()
    if last is None or last["ended"] is not None or last["pid"] is None:
        return None
    if procs.alive_since(int(last["pid"]), float(last["started"])):
        return None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["started"]))
    return (
        f"the run started {started} was interrupted: its runner (pid {last['pid']}) is no "
        "longer alive; run again to resume"
    )


def _first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]


def _where_to_look(stages: list[str], root: Path) -> list[str]:
    """Where a failed unit's whole story is: each stage's results and its worker logs."""
    lines = []
    for stage in stages:
        logs = root / stage / "logs"
        if logs.is_dir():
            lines.append(
                f"{stage}: errors with their last frames in {root / stage / 'results.parquet'}; "
                f"whole tracebacks and worker output in {logs}/"
            )
    return lines


def _jobs_tables(
    ledger: Ledger, stages: dict[str, int], run_dir: str, gone: bool, limit: int = 50
) -> list[str]:
    """One table per stage of jobs (name → its count of jobs), as Slurm users read a queue:
    state, exit code or signal, start, end, node and where the job's stdout/stderr are
    (relative to the run directory); the first `limit` jobs by start. `gone`: the run's
    runner died without ending it."""
    lines: list[str] = []
    root = Path(run_dir).resolve()
    for stage, count in stages.items():
        rows = list(ledger.rows(stage, by_start=True, limit=limit))
        lines += ["", f"jobs of stage {stage}:"]
        lines += _table(
            ("job", "state", "exit", "start", "end", "node", "stdout", "stderr"),
            [_job_row(r, root, gone) for r in rows],
        )
        if count > limit:
            lines.append(f"... and {count - limit} more")
        # why the memory limit ended a job, and how the limit is enforced
        lines += [
            f"{r.unit}: {r.state.label}: {r.error}"
            for r in ledger.rows(stage, state=UnitState.out_of_memory)
        ]
    return lines


def _job_row(row: UnitRow, root: Path, gone: bool) -> tuple[str, ...]:
    result = row.result if isinstance(row.result, dict) else {}
    code, sig = result.get("exit_code"), result.get("signal")
    return (
        row.unit,
        _state(row, gone, label=True),
        str(code) if code is not None else sig or "-",
        _clock(row.started),
        _clock(row.ended),
        row.node_ip or "-",
        _under(result.get("stdout"), root),
        _under(result.get("stderr"), root),
    )


def _clock(stamp: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _under(path: str | None, root: Path) -> str:
    """A log path relative to the run directory when it lies inside it."""
    if not path:
        return "-"
    return os.path.relpath(path, root) if Path(path).is_relative_to(root) else path


def _table(header: tuple[str, ...], rows: Iterable[tuple[object, ...]]) -> list[str]:
    text = [tuple(str(c) for c in header), *(tuple(str(c) for c in r) for r in rows)]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in text]
