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
    """Write `<run.dir>/<stage>/results.parquet` atomically; return its path.

    Rows come from the ledger a chunk at a time into Arrow columns (input and result as the
    ledger's JSON text), are put in the plan's order by Arrow (`index_in` + `take`), and only
    then is the JSON decoded, a chunk at a time: a million-unit stage is written without a
    Python object per unit."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = ["id", "input", "result", "status", "attempts", "duration", "worker", "error"]
    text = pa.string()
    schema = pa.schema(
        zip(names, [text, text, text, text, pa.int32(), pa.float64(), text, text], strict=True)
    )
    batches = [
        pa.RecordBatch.from_arrays(
            [pa.array(c, f.type) for c, f in zip(zip(*chunk, strict=True), schema, strict=True)],
            schema=schema,
        )
        for chunk in ctx.ledger.result_rows(stage.name)
    ]
    found = pa.Table.from_batches(batches, schema)
    del batches
    # the plan's units in the plan's order; a unit the ledger does not have is left out
    planned = pa.array([u.id for u in stage.units or []], text)
    table = found.take(pc.index_in(planned, value_set=found.column("id")).drop_null())
    del found
    for name in ("input", "result"):
        table = table.set_column(names.index(name), name, _json_column(table.column(name)))
    path = ctx.stage_dir(stage.name) / RESULTS
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


# JSON values are decoded this many at a time
DECODE_ROWS = 100_000


def _json_column(texts: Any) -> Any:
    """A column of JSON texts as native Arrow values where they agree on one type (numbers,
    structs), decoded a slice at a time; else the JSON texts themselves."""
    import pyarrow as pa

    parts = []
    for start in range(0, len(texts), DECODE_ROWS):
        values = [
            None if t is None else json.loads(t)
            for t in texts[start : start + DECODE_ROWS].to_pylist()
        ]
        try:
            parts.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            return texts
    kinds = {p.type for p in parts if p.type != pa.null()}
    if len(kinds) > 1:  # slices that disagree (ints here, floats there): as a whole, as before
        return _column([None if t is None else json.loads(t) for t in texts.to_pylist()])
    kind = kinds.pop() if kinds else pa.null()
    return pa.chunked_array([p if p.type == kind else pa.nulls(len(p), kind) for p in parts], kind)


def _column(values: list[Any]) -> Any:
    """Native Arrow types where the values agree on one (numbers, structs), else JSON text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])
