"""The results table's `input` and `result` columns: native Arrow values where the values
agree on one type, else the JSON texts, exactly as decoding each value and `pa.array` give.

Arrow's JSON reader does the decoding for speed; these cases are where it would read values
differently from `pa.array` (timestamps from strings, huge integers as doubles, NaN)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from runner.stages.pool.results import _json_column

CASES: list[list[Any]] = [
    [i * i for i in range(50)],
    [1, None, 2.5],
    [{"ok": True, "score": 0.5, "name": "p1"}, {"ok": False, "score": 1, "name": "p2"}],
    [{"a": 1}, {"b": "x"}],
    [[1, 2], [], None],
    [None, None],
    ["héllo", "☃"],
    ["a", 3],
    ["2020-01-01", "2021-02-03 10:00:00"],
    [{"when": {"at": "2020-01-01T00:00:00"}}],
    [2**70, 1],
    [2**63, 1.5],
    [{"big": 2**64}],
    [float("nan"), 1.0],
]


def reference(values: list[Any]) -> pa.Array:
    """What the column must hold: the decoded values as `pa.array` types them, else the texts."""
    texts = [None if v is None else json.dumps(v) for v in values]
    try:
        return pa.array([None if t is None else json.loads(t) for t in texts])
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array(texts, pa.string())


@pytest.mark.parametrize("values", CASES, ids=[json.dumps(c)[:30] for c in CASES])
def test_a_column_of_results_reads_as_its_values_agree(values: list[Any]) -> None:
    texts = pa.chunked_array([pa.array([None if v is None else json.dumps(v) for v in values])])
    column = _json_column(texts.cast(pa.string()))
    expected = reference(values)
    assert column.type == expected.type
    assert repr(column.to_pylist()) == repr(expected.to_pylist())


@pytest.mark.parametrize(
    "values",
    [[{}, {}], [{}, None], [{"score": 1, "notes": {}}], [[{}], []], [{"a": [{"b": {}}]}]],
    ids=str,
)
def test_a_column_holding_empty_objects_is_written_as_json_texts(values: list[Any]) -> None:
    """Parquet has no struct without fields: such values stay JSON text, and the table writes."""
    import io

    import pyarrow.parquet as pq

    texts = [None if v is None else json.dumps(v) for v in values]
    column = _json_column(pa.chunked_array([pa.array(texts, pa.string())]))
    out = io.BytesIO()
    pq.write_table(pa.table({"result": column}), out)
    read = pq.read_table(io.BytesIO(out.getvalue())).column("result").to_pylist()
    assert [None if t is None else json.loads(t) for t in read] == values
