"""Cancelling units of a running run from another command: `runner mode=cancel units=[...]`.

The running runner holds the run directory's lock, so a second command cannot act on the run
itself. It leaves a request in `<run.dir>/cancel-requests/` instead; the running executor reads
the requests about twice a second, stops the named units with their stage's grace, records them
CANCELLED, and answers beside the request which names it knew. The cancelling command then
waits for the ledger to show the units final.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RunnerError
from runner.lifecycle import UnitState
from runner.store import Ledger, read_ledger, write_json

REQUESTS = "cancel-requests"
# seconds the cancelling command waits for the runner to answer, and for the units to end
# (a job's cancel_grace is its own: the wait for the ledger adds it)
ANSWER_BOUND = 30.0
END_BOUND = 60.0


class CancelError(RunnerError):
    """A cancel that cannot be done: no run in progress, or names no running unit has."""

    exit_code = 2


@dataclass
class Request:
    """One cancel request as the executor reads it."""

    path: Path
    units: list[str]

    def answer(self, known: dict[str, str], unknown: list[str]) -> None:
        """Say which units are being cancelled (by stage) and which names no stage has."""
        write_json(_answer_path(self.path), {"known": known, "unknown": unknown})
        self.path.unlink(missing_ok=True)


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
    ledger = read_ledger(run_dir)
    last = ledger.last_run() if ledger is not None else None
    if ledger is None or last is None or last["ended"] is not None:
        raise CancelError(
            f"{run_dir}: no run in progress to cancel units of "
            f"(start one with `runner pipeline={pipeline}`)"
        )
    try:
        known, unknown = _ask(run_dir, units)
        if unknown:
            raise CancelError(
                f"{run_dir}: no unit of the running run is named "
                f"{', '.join(repr(u) for u in unknown)}"
            )
        return _await_end(ledger, known)
    finally:
        ledger.close()


def _ask(run_dir: Path, units: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leave the request; the runner's answer: {unit: its stage} and the names it lacks."""
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
    return dict(found["known"]), list(found["unknown"])


def _await_end(ledger: Ledger, known: dict[str, str]) -> int:
    """Wait (bounded) until every cancelled unit is final in the ledger; say how each ended."""
    deadline = time.monotonic() + END_BOUND
    while True:
        states = {
            unit: r.state
            for stage in set(known.values())
            for r in ledger.rows(stage)
            if (unit := r.unit) in known and known[unit] == stage
        }
        if all(s.final for s in states.values()) and len(states) == len(known):
            break
        if time.monotonic() > deadline:
            left = sorted(u for u in known if u not in states or not states[u].final)
            print(f"still stopping after {END_BOUND:g}s: {', '.join(left)}")
            return 1
        time.sleep(0.1)
    code = 0
    for unit, state in states.items():
        if state is UnitState.cancelled:
            print(f"{known[unit]}/{unit}: CANCELLED")
        else:
            print(f"{known[unit]}/{unit}: {state.label} before it could be cancelled")
            code = 1
    return code
