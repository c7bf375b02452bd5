"""A shard stage's id ranges: the sorted unique ids cut into contiguous ranges, or the ranges
an earlier run recorded in the ledger for the same input.

Ranges are over the sorted unique ids, so they do not depend on the file's row order; the
input is known by its identity (path, size, mtime), so a resume never re-reads the data.

A command sees a range as R2R's scheduler hands it out, half-open: `[low, end)`, `end` being
the first id of the next shard (of the last one, its last id + 1 for integer ids); `high`, the
last id included, is what the unit's label shows and the data is sliced by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import PlanError
from runner.schema import ShardStage
from runner.store import Ledger


@dataclass(frozen=True)
class Shard:
    """One id range: `low` and `high` are ids of the input, both included; `end` is the
    half-open bound (None past the last of non-integer ids); `ids` counts the unique ids."""

    index: int
    low: Any
    high: Any
    rows: int
    end: Any = None
    ids: int = 0

    @property
    def label(self) -> str:
        return f"{self.low}-{self.high}"


def input_identity(path: str) -> str:
    """What the fingerprints hash of the input: path, size and mtime, never its content."""
    source = Path(path).resolve()
    st = source.stat()
    return f"{source}:{st.st_size}:{st.st_mtime_ns}"


def split(path: Path, id_column: str, num_shards: int) -> list[Shard]:
    """Cut the sorted unique ids into `num_shards` contiguous ranges of near-equal size."""
    import numpy as np
    import pandas as pd

    if path.suffix == ".csv":
        ids = pd.read_csv(path, usecols=[id_column])[id_column]
    else:
        ids = pd.read_parquet(path, columns=[id_column])[id_column]
    if ids.isna().any():
        raise PlanError([f"{path}: {int(ids.isna().sum())} row(s) have no {id_column!r}"])
    try:
        counts = ids.value_counts(sort=False).sort_index()
    except TypeError as exc:
        raise PlanError([f"{path}: the ids in {id_column!r} cannot be ordered: {exc}"]) from None
    parts = np.array_split(np.arange(len(counts)), min(num_shards, len(counts)))
    chunks = [c for c in parts if len(c)]
    first = [_plain(counts.index[c[0]]) for c in chunks]
    last = [_plain(counts.index[c[-1]]) for c in chunks]
    ends = [*first[1:], past(last[-1])] if chunks else []
    return [
        Shard(n, first[n], last[n], int(counts.iloc[c].sum()), ends[n], len(c))
        for n, c in enumerate(chunks)
    ]


def past(last: Any) -> Any:
    """The half-open bound after the last id: last + 1 for integer ids, else None (there is
    no next id to name)."""
    return last + 1 if isinstance(last, int) and not isinstance(last, bool) else None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def recorded(ledger: Ledger | None, name: str, spec: ShardStage, source: str) -> list[Shard]:
    """The ranges an earlier run of this stage recorded for the same input file, if complete:
    a resume then plans from the ledger without reading the data."""
    if ledger is None:
        return []
    found: dict[int, Shard] = {}
    total = None
    for row in ledger.rows(name):
        p = row.input
        if (
            isinstance(p, dict)
            and p.get("input") == source
            and p.get("id_column") == spec.id_column
            and p.get("num_shards") == spec.num_shards
            and "ids" in p  # recorded before half-open bounds: cut again
        ):
            found[p["index"]] = Shard(
                p["index"], p["low"], p["high"], p["rows"], p.get("end"), p["ids"]
            )
            total = p.get("count")
    if not found or set(found) != set(range(len(found))) or total != len(found):
        return []
    return [found[n] for n in range(len(found))]
