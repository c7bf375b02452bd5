"""A stage's committed results table, written from the ledger (the source of truth).

Results are written once the stage has nothing left to run, from the ledger rows of the
plan's units: a resumed run's table holds every unit exactly once, old and new alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.kind import RunContext
from runner.plan import StagePlan
from runner.store import atomic_path

RESULTS = "results.parquet"


def write_results(ctx: RunContext, stage: StagePlan) -> Path:
    """Write `<run.dir>/<stage>/results.parquet` atomically; return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = {u.id: n for n, u in enumerate(stage.units or [])}
    rows = sorted(ctx.ledger.rows(stage.name, order), key=lambda r: order[r.unit])
    table = pa.table(
        {
            "id": pa.array([r.unit for r in rows], pa.string()),
            "input": _column([r.input for r in rows]),
            "result": _column([r.result for r in rows]),
            "status": pa.array([r.state.value for r in rows], pa.string()),
            "attempts": pa.array([r.attempts for r in rows], pa.int32()),
            "duration": pa.array([r.duration for r in rows], pa.float64()),
            "worker": pa.array([r.worker for r in rows], pa.string()),
            "error": pa.array([r.error for r in rows], pa.string()),
        }
    )
    path = ctx.stage_dir(stage.name) / RESULTS
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


class ResultError(TypeError):
    """A worker returned a value the ledger cannot keep (not JSON)."""


def json_value(value: Any) -> Any:
    """`value` as the ledger keeps it: JSON values as they are, numpy values (anything with
    `tolist()`) converted; anything else raises ResultError naming its type, so the item fails
    with that message instead of being silently stringified (or crashing its whole batch)."""
    converted = False

    def plain(obj: Any) -> Any:
        nonlocal converted
        if callable(getattr(obj, "tolist", None)):
            converted = True
            return obj.tolist()
        kind = type(obj)
        name = kind.__qualname__ if kind.__module__ == "builtins" else repr(kind)[8:-2]
        raise ResultError(f"a {name} cannot be stored")

    try:
        text = json.dumps(value, default=plain)
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the result is not JSON ({exc}): return dicts, lists, strings, numbers, booleans "
            "or None (numpy values are converted)"
        ) from None
    return json.loads(text) if converted else value


def _column(values: list[Any]) -> Any:
    """Native Arrow types where the values agree on one (numbers, structs), else JSON text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])
