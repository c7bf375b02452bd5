"""A preempted unit's saved state in the ledger, so it survives a runner restart.

While a preempted unit is not done, its ledger row's `result` is `{"saved_state": STATE}`;
the run that picks the unit up again (same fingerprint, not `run.fresh`) hands STATE back to
it. Only a state that JSON keeps unchanged (dicts with string keys, lists, strings, numbers,
booleans, None) goes to the ledger: any other (a tensor, a tuple, an object) stays in the
runner's memory, so it still restores within the run, and a restarted runner starts that unit
from scratch; a warning says so when it is saved.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from runner.plan import Unit
from runner.store import Ledger

log = logging.getLogger(__name__)

KEY = "saved_state"


def as_result(stage: str, unit: str, state: object) -> dict[str, object] | None:
    """The ledger `result` that keeps `state` for a unit not yet done, or None when the state
    is absent or JSON would not give it back unchanged."""
    if state is None:
        return None
    try:
        kept = json.loads(json.dumps(state, allow_nan=False))
    except (TypeError, ValueError):
        kept = None
    if kept != state:
        log.warning(
            "%s: %s: its saved state (%s) is not JSON-storable; it is kept in memory only, "
            "so a restarted runner starts this unit from the beginning",
            stage,
            unit,
            type(state).__name__,
        )
        return None
    return {KEY: state}


def from_ledger(ledger: Ledger, stage: str, units: Iterable[Unit]) -> dict[str, object]:
    """The saved states the ledger holds for these units (by unit id): rows not done whose
    fingerprint is the unit's own, so a changed unit never resumes from an old state."""
    wanted = {u.id: u.fingerprint for u in units}
    found: dict[str, object] = {}
    for row in ledger.rows(stage, wanted, unfinished=True):
        result = row.result
        mine = row.fingerprint == wanted[row.unit]
        if mine and isinstance(result, dict) and result.get(KEY) is not None:
            found[row.unit] = result[KEY]
    return found
