"""Cancelling units of a running run from another command: `runner mode=cancel units=[...]`.

The running runner holds the run directory's lock, so a second command cannot act on the run
itself. It leaves a request in `<run.dir>/cancel-requests/` instead; the running executor reads
the requests about twice a second, stops the named units with their stage's grace, records them
CANCELLED, and answers beside the request which units those are. The cancelling command then
waits for the ledger to show the units final.

A unit is named by its id (`units=[3]`) or by its stage and id (`units=[square/3]`; a role
replica `rlhf/rollout/0`). An id that units of two running stages have is refused, with both
candidates named, and so is a name no unit has: such a request cancels nothing (exit 2).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from runner import procs
from runner.errors import RunnerError
from runner.lifecycle import UnitState
from runner.plan import StagePlan
from runner.store import Ledger, in_use, read_ledger, write_json

REQUESTS = "cancel-requests"
# seconds the cancelling command waits for the runner to answer, and for the units to end
# (a job's cancel_grace is its own: the wait for the ledger adds it)
ANSWER_BOUND = 30.0
END_BOUND = 60.0


class CancelError(RunnerError):
    """A cancel that cannot be done: no run in progress, or names no running unit has."""

    exit_code = 2


class HasId(Protocol):
    """A unit's work, as far as its id goes (the executor's `Work`)."""

    @property
    def id(self) -> str: ...


class Running(Protocol):
    """A running stage as far as naming its units goes (the executor's `StageRun`)."""

    @property
    def stage(self) -> StagePlan: ...

    @property
    def works(self) -> Sequence[HasId]: ...


def holds(run: Running, unit: str) -> bool:
    """Whether `unit` is one of the running stage's units (looked for without touching them)."""
    return any(u.id == unit for u in run.stage.to_run) or any(w.id == unit for w in run.works)


@dataclass
class Named:
    """What the names of a request are among the running stages: (stage, unit) each, or the
    names no unit has, or those that name units of more than one stage."""

    units: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)


def resolve(names: Sequence[str], stages: Mapping[str, Running]) -> Named:
    """Each name as a unit id of one stage or as `STAGE/ID`."""
    named = Named()
    for name in names:
        found: list[tuple[str, str]] = []
        for stage, run in stages.items():
            if holds(run, name):
                found.append((stage, name))
            if name.startswith(f"{stage}/") and holds(run, name[len(stage) + 1 :]):
                found.append((stage, name[len(stage) + 1 :]))
        if not found:
            named.unknown.append(name)
        elif len(found) > 1:
            named.ambiguous[name] = [f"{stage}/{unit}" for stage, unit in found]
        else:
            named.units += found
    return named


@dataclass
class Request:
    """One cancel request as the executor reads it."""

    path: Path
    units: list[str]

    def resolve(self, stages: Mapping[str, Running]) -> list[tuple[str, str]]:
        """The (stage, unit) pairs to cancel, answered beside the request; none when a name
        is unknown or ambiguous (the answer says which, and the command exits 2)."""
        named = resolve(self.units, stages)
        refused = bool(named.unknown or named.ambiguous)
        write_json(
            _answer_path(self.path),
            {
                "known": [] if refused else named.units,
                "unknown": named.unknown,
                "ambiguous": named.ambiguous,
            },
        )
        self.path.unlink(missing_ok=True)
        return [] if refused else named.units


def pending(run_dir: Path) -> list[Request]:
    """The requests left in `run_dir` that have no answer yet, oldest first."""
    folder = run_dir / REQUESTS
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        if path.name.endswith(".answer.json"):
            continue
        try:
            units = json.loads(path.read_text())["units"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: looked at again next time
        found.append(Request(path, [str(u) for u in units]))
    return found


def _answer_path(request: Path) -> Path:
    return request.with_name(request.stem + ".answer.json")


def cancel(run_dir: Path, units: list[str], pipeline: str) -> int:
    """Ask the runner of `run_dir` to cancel `units`; 0 once the ledger shows them CANCELLED,
    1 when some ended otherwise first."""
    if not units:
        raise CancelError("mode=cancel needs the units to cancel: units=[NAME,...]")
    if not _in_progress(run_dir):
        raise CancelError(
            f"{run_dir}: no run in progress to cancel units of "
            f"(start one with `runner pipeline={pipeline}`)"
        )
    known = _ask(run_dir, units)
    ledger = read_ledger(run_dir)
    if ledger is None:  # answered by a runner whose ledger is gone: nothing to wait for
        raise CancelError(f"{run_dir}: the run's ledger is gone")
    try:
        return _await_end(ledger, known)
    finally:
        ledger.close()


def _in_progress(run_dir: Path) -> bool:
    """Whether a run of `run_dir` is in progress: its ledger's last run has not ended and its
    runner still lives, or a runner holds the directory (a run still starting: its attempt is
    recorded once Ray is up, seconds later, and it answers requests from its first pass). A
    runner that died without ending its run (SIGKILL, the OOM killer) answers nothing: its
    run is the interrupted one `mode=status` names."""
    if in_use(run_dir):
        return True
    ledger = read_ledger(run_dir)
    if ledger is None:
        return False
    try:
        last = ledger.last_run()
    finally:
        ledger.close()
    if last is None or last["ended"] is not None:
        return False
    runner = last["pid"]
    return runner is None or procs.alive_since(int(runner), float(last["started"]))


def _ask(run_dir: Path, units: list[str]) -> list[tuple[str, str]]:
    """Leave the request; the runner's answer: the (stage, unit) pairs it is cancelling, or
    a CancelError for names it cannot tell (none are cancelled then)."""
    folder = run_dir / REQUESTS
    folder.mkdir(exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.json"
    write_json(path, {"units": units})
    answer = _answer_path(path)
    deadline = time.monotonic() + ANSWER_BOUND
    while not answer.exists():
        if time.monotonic() > deadline:
            path.unlink(missing_ok=True)
            raise CancelError(
                f"{run_dir}: the running runner did not answer within "
                f"{ANSWER_BOUND:g}s; is the run still in progress?"
            )
        time.sleep(0.05)
    found = json.loads(answer.read_text())
    answer.unlink(missing_ok=True)
    problems = [
        f"{name!r} is a unit of {len(stages)} stages: {', '.join(stages)}; "
        f"name one as units=[{stages[0]}]"
        for name, stages in found.get("ambiguous", {}).items()
    ]
    if found["unknown"]:
        names = ", ".join(repr(u) for u in found["unknown"])
        problems.insert(0, f"no unit of the running run is named {names}")
    if problems:
        raise CancelError(f"{run_dir}: nothing cancelled: {'; '.join(problems)}")
    return [(str(stage), str(unit)) for stage, unit in found["known"]]


def _await_end(ledger: Ledger, known: list[tuple[str, str]]) -> int:
    """Wait (bounded) until every cancelled unit is final in the ledger; say how each ended."""
    deadline = time.monotonic() + END_BOUND
    wanted = set(known)
    while True:
        states = {
            (stage, r.unit): r.state
            for stage in {s for s, _ in known}
            for r in ledger.rows(stage)
            if (stage, r.unit) in wanted
        }
        if all(s.final for s in states.values()) and len(states) == len(wanted):
            break
        if time.monotonic() > deadline:
            left = sorted(
                f"{s}/{u}" for s, u in known if not (st := states.get((s, u))) or not st.final
            )
            print(f"still stopping after {END_BOUND:g}s: {', '.join(left)}")
            return 1
        time.sleep(0.1)
    code = 0
    for (stage, unit), state in states.items():
        if state is UnitState.cancelled:
            print(f"{stage}/{unit}: CANCELLED")
        else:
            print(f"{stage}/{unit}: {state.label} before it could be cancelled")
            code = 1
    return code
