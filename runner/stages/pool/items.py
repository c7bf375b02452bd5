"""Item sources of a `pool` stage: range, list, glob, file (JSONL/CSV/parquet), or another stage.

Each item has a stable id (what the ledger keys on), a payload (what the worker is called with)
and an identity (what its fingerprint hashes: content for values and rows, a content digest
for `glob` files, cached by path, size and mtime so a resumed run re-reads only a file whose
mtime moved). A file source is read and checked once, at spec-check time: a corrupt or empty
file, a row without its id, or a duplicate id is a spec problem naming the file and the row.
"""

from __future__ import annotations

import functools
import glob as globlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from runner.identity import FileDigests, file_digest
from runner.jsondata import line_error

SOURCES = ("range", "list", "glob", "file", "from")
OPTIONS = ("id",)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# one row of an item file: a JSON object, or a table's row as JSON
Row = dict[str, object]


class Item(NamedTuple):
    """One item: `id` keys the ledger, `payload` goes to the worker, `identity` is hashed (a
    tuple: a million of them are made in a plan, and a frozen dataclass is slow to build)."""

    id: str
    # a JSON value: an integer of a range, a list's entry, a glob's path, a file's row
    payload: object
    identity: str


def check(items: Mapping[str, object]) -> list[tuple[str, str]]:
    """Problems with an items mapping as (sub-key, message); empty when it is usable."""
    problems: list[tuple[str, str]] = []
    given = [k for k in items if k in SOURCES]
    for key in items:
        if key not in SOURCES and key not in OPTIONS:
            from runner.spec import did_you_mean

            allowed = ", ".join((*SOURCES, *OPTIONS))
            problems.append((key, f"unknown key{did_you_mean(key, SOURCES)} (allowed: {allowed})"))
    if len(given) != 1:
        # none beside an unknown key: that key is the source, misspelt, and said already
        if given or not problems:
            what = "no item source" if not given else f"several sources ({', '.join(given)})"
            problems.append(("", f"{what}: give exactly one of {', '.join(SOURCES)}"))
        return problems
    source, value = given[0], items[given[0]]
    if source == "range":
        if _range_args(value) is None:
            problems.append(
                (
                    "range",
                    f"= {value!r}: expected N or [start, stop] or [start, stop, step] of integers",
                )
            )
    elif source == "list":
        if not isinstance(value, list) or not value:
            problems.append(("list", f"= {value!r}: expected a non-empty list"))
    elif source == "glob":
        if not isinstance(value, str) or not globlib.glob(value, recursive=True):
            problems.append(("glob", f"= {value!r}: matches no files"))
    elif source == "file":
        problems += _check_file(value, items.get("id"))
    elif not isinstance(value, str):
        problems.append(("from", f"= {value!r}: expected a stage name"))
    return problems


def _check_file(value: object, id_field: object) -> list[tuple[str, str]]:
    if not isinstance(value, str):
        return [("file", f"= {value!r}: expected a path")]
    path = Path(value)
    if not path.is_file():
        return [("file", f"= {value!r}: no such file")]
    if path.suffix not in FILE_SUFFIXES:
        return [("file", f"= {value!r}: unknown format; use one of {', '.join(FILE_SUFFIXES)}")]
    if id_field is not None and not isinstance(id_field, str):
        return [("id", f"= {id_field!r}: expected the name of a field of {value}")]
    try:
        _file_items(value, id_field, *_stamp(path))
    except ItemsError as exc:
        return [(exc.key, exc.message)]
    return []


class ItemsError(Exception):
    """An item file that cannot be used: the items sub-key at fault and why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


def _range_args(value: object) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value) if value > 0 else None
    if (
        isinstance(value, list)
        and 2 <= len(value) <= 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and len(range(*value)) > 0
    ):
        return tuple(value)
    return None


def load(items: Mapping[str, object], digests: FileDigests | None = None) -> Iterator[Item]:
    """The items of a (checked) non-`from` source, in a stable order; `digests` remembers the
    content digests of `glob` files between runs."""
    if "range" in items:
        args = _range_args(items["range"])
        assert args is not None
        for i in range(*args):
            name = str(i)
            yield Item(name, i, name)
    elif "list" in items:
        values = items["list"]
        assert isinstance(values, list)
        for i, value in enumerate(values):
            yield Item(str(i), value, json.dumps(value, sort_keys=True, default=str))
    elif "glob" in items:
        for path in sorted(globlib.glob(str(items["glob"]), recursive=True)):
            yield Item(path, path, f"{path}:{file_digest(Path(path), digests)}")
    else:
        value, id_field = str(items["file"]), items.get("id")
        assert id_field is None or isinstance(id_field, str)
        yield from _file_items(value, id_field, *_stamp(Path(value)))


class Columns(NamedTuple):
    """A source's items as three parallel sequences: planning a million items builds no
    object per item beyond its id (and, for a `range`, its id is its identity)."""

    ids: list[str]
    payloads: Sequence[object]
    identities: list[str]


def columns(items: Mapping[str, object], digests: FileDigests | None = None) -> Columns:
    """`load`'s items as columns, in the same order."""
    if "range" in items:
        args = _range_args(items["range"])
        assert args is not None
        ids = list(map(str, range(*args)))
        return Columns(ids, range(*args), ids)
    loaded = list(load(items, digests))
    return Columns(
        [i.id for i in loaded], [i.payload for i in loaded], [i.identity for i in loaded]
    )


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _file_items(value: str, id_field: str | None, size: int, mtime_ns: int) -> tuple[Item, ...]:
    """Every item of a file, checked (read once for the check and the plan: the file's size
    and mtime are part of the cache key)."""
    path = Path(value)
    records = _records(path, value)
    if not records:
        raise ItemsError("file", f"= {value!r}: holds no items; expected at least one row")
    items: list[Item] = []
    first: dict[str, str] = {}
    for n, (where, row) in enumerate(records):
        uid = str(n) if id_field is None else _row_id(row, where, value, id_field)
        if uid in first:
            raise ItemsError(
                "id",
                f"= {id_field!r}: id {uid!r} appears at {first[uid]} and {where} of {value}; "
                "ids must be unique",
            )
        first[uid] = where
        items.append(Item(uid, row, json.dumps(row, sort_keys=True, default=str)))
    return tuple(items)


def _row_id(row: Row, where: str, value: str, id_field: str) -> str:
    """A row's id: a string or an integer that is there (a typo in `id:` must not renumber)."""
    from runner.spec import did_you_mean

    if id_field not in row:
        fields = [str(k) for k in row]
        raise ItemsError(
            "id",
            f"= {id_field!r}: {where} of {value} has no field {id_field!r}"
            f"{did_you_mean(id_field, fields)} (fields: {', '.join(fields)})",
        )
    uid = row[id_field]
    if uid is None or (isinstance(uid, float) and math.isnan(uid)) or uid == "":
        raise ItemsError("id", f"= {id_field!r}: {where} of {value} has an empty {id_field!r}")
    if isinstance(uid, float) and uid.is_integer():
        uid = int(uid)
    if not isinstance(uid, str | int) or isinstance(uid, bool):
        raise ItemsError(
            "id",
            f"= {id_field!r}: {where} of {value} has {uid!r} as its id; "
            "expected a string or an integer",
        )
    return str(uid)


def _records(path: Path, value: str) -> list[tuple[str, Row]]:
    """(where, row) for each row: `line N` of JSONL, `item N` of a JSON list, `row N` of a
    table (1-based, as an editor shows them)."""
    if path.suffix == ".jsonl":
        found = []
        with path.open() as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    found.append((f"line {n}", _json_row(line, f"line {n}", value)))
        return found
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ItemsError("file", f"= {value!r}: not JSON ({exc})") from None
        if not isinstance(data, list):
            raise ItemsError("file", f"= {value!r}: expected a JSON list of objects")
        return [(f"item {n}", _object(row, f"item {n}", value)) for n, row in enumerate(data, 1)]
    return [(f"row {n}", row) for n, row in enumerate(_table(path, value), start=1)]


def _json_row(line: str, where: str, value: str) -> Row:
    try:
        row = json.loads(line.rstrip("\r\n"))
    except ValueError as exc:
        raise ItemsError(
            "file",
            f"= {value!r}: {where} is not JSON {line_error(exc)}; expected one JSON object per "
            "line",
        ) from None
    return _object(row, where, value)


def _object(row: object, where: str, value: str) -> Row:
    if not isinstance(row, dict):
        raise ItemsError(
            "file", f"= {value!r}: {where} is {row!r}, not an object; every item is an object"
        )
    return row


def _table(path: Path, value: str) -> list[Row]:
    import pandas as pd

    kind = "CSV" if path.suffix == ".csv" else "parquet"
    try:
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return []
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ItemsError("file", f"= {value!r}: cannot read as {kind}: {first}") from None
    records: list[Row] = json.loads(frame.to_json(orient="records"))
    return records
