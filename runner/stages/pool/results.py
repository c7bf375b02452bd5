"""A pool stage's committed results table, written from the ledger (the source of truth).

Results are written once the stage has nothing left to run, from the ledger rows of the
plan's units: a resumed run's table holds every unit exactly once, old and new alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runner.kind import RunContext
from runner.plan import StagePlan
from runner.store import atomic_path

if TYPE_CHECKING:
    import pyarrow as pa

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


def _json_column(texts: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column of JSON texts as native Arrow values where they agree on one type (numbers,
    structs) that Parquet can hold; else the JSON texts themselves.

    Parquet has no struct without fields: values that are (or hold) an empty object, such as
    `{"score": 1, "notes": {}}` on every row, would decode to one and fail the whole table's
    write, so such a column stays JSON text."""
    column = _decoded(texts)
    return texts if _holds(column.type, _fieldless) else column


def _fieldless(kind: pa.DataType) -> bool:
    """A struct type without fields (`{}` decoded), which Parquet cannot write."""
    import pyarrow as pa

    return bool(pa.types.is_struct(kind)) and kind.num_fields == 0


def _decoded(texts: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """The JSON texts decoded as native Arrow values where they agree on one type; else the
    texts.

    Arrow's own JSON reader decodes the column in C++ (a third of the time of `json.loads`
    per value on a million results); where it cannot give what `pa.array` of the decoded
    values gives (values it rejects, such as NaN, or strings it would read as timestamps),
    the values are decoded in Python, a slice at a time."""
    import pyarrow as pa

    native = _read_json(texts)
    if native is not None:
        return native
    parts = []
    for start in range(0, len(texts), DECODE_ROWS):
        values = [
            None if t is None else json.loads(t)
            for t in texts[start : start + DECODE_ROWS].to_pylist()
        ]
        try:
            parts.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            return texts
    kinds = {p.type for p in parts if p.type != pa.null()}
    if len(kinds) > 1:  # slices that disagree (ints here, floats there): as a whole, as before
        return _column([None if t is None else json.loads(t) for t in texts.to_pylist()])
    kind = kinds.pop() if kinds else pa.null()
    return pa.chunked_array([p if p.type == kind else pa.nulls(len(p), kind) for p in parts], kind)


def _read_json(texts: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """The column read by `pyarrow.json` as one block (one type inferred for all rows), or
    None where its reading would differ from `pa.array` of the decoded values."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    if len(texts) == 0 or not pa.types.is_string(texts.type):
        return None
    # one `{"v": <text>}` line per row: the values buffer of the joined column is the document
    lines = pc.binary_join_element_wise('{"v":', pc.fill_null(texts, "null"), "}\n", "")
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    lines = lines.cast(pa.large_string())  # 64-bit offsets: no 2 GiB limit on the document
    first, last = lines.offset, lines.offset + len(lines)
    offsets = lines.buffers()[1]
    start = int.from_bytes(offsets[8 * first : 8 * first + 8], "little", signed=True)
    end = int.from_bytes(offsets[8 * last : 8 * last + 8], "little", signed=True)
    body = lines.buffers()[2][start:end]
    try:
        table = pj.read_json(
            pa.BufferReader(body), read_options=pj.ReadOptions(block_size=len(body) + 1)
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    column = table.column("v")
    if _holds(column.type, pa.types.is_timestamp):
        return None
    # an integer beyond int64 is read as a double (its digits lost); `pa.array` keeps the text
    if (
        _holds(column.type, pa.types.is_floating)
        and pc.any(pc.match_substring_regex(texts, r"\d{19}")).as_py()
    ):
        return None
    return column


def _holds(kind: pa.DataType, test: Callable[[pa.DataType], bool]) -> bool:
    """Whether an Arrow type, or a type nested in it, passes `test`: the reader's timestamps
    (`pa.array` keeps such strings as strings) and doubles (perhaps from huge integers)."""
    return test(kind) or any(_holds(kind.field(i).type, test) for i in range(kind.num_fields))


def _column(values: list[object]) -> pa.Array:
    """Native Arrow types where the values agree on one (numbers, structs), else JSON text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])
