"""Item sources of a `pool` stage: range, list, glob, file (JSONL/CSV/parquet), or another stage.

Each item has a stable id (what the ledger keys on), a payload (what the worker is called with)
and an identity (what its fingerprint hashes: content for values and rows, path + size + mtime
for files, so a resumed run never re-reads a large input to know it is unchanged).
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("range", "list", "glob", "file", "from")
OPTIONS = ("id",)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True, slots=True)
class Item:
    """One item: `id` keys the ledger, `payload` goes to the worker, `identity` is hashed."""

    id: str
    payload: Any
    identity: str


def check(items: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with an items mapping as (sub-key, message); empty when it is usable."""
    problems: list[tuple[str, str]] = []
    given = [k for k in items if k in SOURCES]
    for key in items:
        if key not in SOURCES and key not in OPTIONS:
            from runner.spec import did_you_mean

            allowed = ", ".join((*SOURCES, *OPTIONS))
            problems.append((key, f"unknown key{did_you_mean(key, SOURCES)} (allowed: {allowed})"))
    if len(given) != 1:
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
        problems += _check_file(value)
    elif not isinstance(value, str):
        problems.append(("from", f"= {value!r}: expected a stage name"))
    return problems


def _check_file(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, str):
        return [("file", f"= {value!r}: expected a path")]
    path = Path(value)
    if not path.is_file():
        return [("file", f"= {value!r}: no such file")]
    if path.suffix not in FILE_SUFFIXES:
        return [("file", f"= {value!r}: unknown format; use one of {', '.join(FILE_SUFFIXES)}")]
    return []


def _range_args(value: Any) -> tuple[int, ...] | None:
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


def load(items: dict[str, Any]) -> Iterator[Item]:
    """The items of a (checked) non-`from` source, in a stable order."""
    if "range" in items:
        args = _range_args(items["range"])
        assert args is not None
        for i in range(*args):
            yield Item(str(i), i, str(i))
    elif "list" in items:
        for i, value in enumerate(items["list"]):
            yield Item(str(i), value, json.dumps(value, sort_keys=True, default=str))
    elif "glob" in items:
        for path in sorted(globlib.glob(items["glob"], recursive=True)):
            st = os.stat(path)
            yield Item(path, path, f"{path}:{st.st_size}:{st.st_mtime_ns}")
    else:
        yield from _rows(Path(items["file"]), items.get("id"))


def _rows(path: Path, id_field: str | None) -> Iterator[Item]:
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            records: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
    else:
        import pandas as pd

        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        records = json.loads(frame.to_json(orient="records"))
    seen: set[str] = set()
    for n, row in enumerate(records):
        uid = str(row[id_field]) if id_field and id_field in row else str(n)
        if uid in seen:
            raise ValueError(f"{path}: id {uid!r} (field {id_field!r}) appears more than once")
        seen.add(uid)
        yield Item(uid, row, json.dumps(row, sort_keys=True, default=str))
