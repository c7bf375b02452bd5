"""A shard stage's id ranges: the sorted unique ids cut into contiguous ranges, or the ranges
an earlier run recorded in the ledger for the same input.

Ranges are over the sorted unique ids, so they do not depend on the file's row order; the
input is known by its identity (path and content digest; the digest is remembered by path,
size and mtime), so a resume never re-reads the data and a `touch` reruns nothing.

A command sees a range as R2R's scheduler hands it out, half-open: `[low, end)`, `end` being
the first id of the next shard (of the last one, its last id + 1 for integer ids); `high`, the
last id included, is what the unit's label shows and the data is sliced by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.errors import InputError
from runner.identity import FileDigests, file_digest
from runner.stages.shard.schema import ShardStage
from runner.store import Ledger


@dataclass(frozen=True)
class Shard:
    """One id range: `low` and `high` are ids of the input, both included; `end` is the
    half-open bound (None past the last of non-integer ids); `ids` counts the unique ids."""

    index: int
    # ids of the input: integers, numbers or strings
    low: object
    high: object
    rows: int
    end: object = None
    ids: int = 0

    @property
    def label(self) -> str:
        return f"{self.low}-{self.high}"


def input_identity(path: str, digests: FileDigests | None = None) -> str:
    """What the fingerprints hash of the input: its path and the digest of its content."""
    source = Path(path).resolve()
    return f"{source}:{file_digest(source, digests)}"


def split(path: Path, id_column: str, num_shards: int, key: str = "input") -> list[Shard]:
    """Cut the sorted unique ids into `num_shards` contiguous ranges of near-equal size; an
    input that cannot be cut (unreadable, empty, ids missing or unsortable) is an InputError
    naming `key` and the file."""
    import numpy as np
    import pandas as pd

    def bad(message: str) -> InputError:
        return InputError([f"{key}: = {str(path)!r}: {message}"])

    kind = "CSV" if path.suffix == ".csv" else "parquet"
    try:
        if path.suffix == ".csv":
            ids = pd.read_csv(path, usecols=[id_column])[id_column]
        else:
            ids = pd.read_parquet(path, columns=[id_column])[id_column]
    except pd.errors.EmptyDataError:
        raise bad(f"holds no rows; expected at least one id in {id_column!r}") from None
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise bad(f"cannot read as {kind}: {line}") from None
    if ids.empty:
        raise bad(f"holds no rows; expected at least one id in {id_column!r}")
    if ids.dtype == object:  # strings, or values pandas could not type (lists, mappings)
        scalar = ids.map(lambda v: v is None or isinstance(v, str | int | float))
        if not scalar.all():
            n = int(np.argmin(scalar.to_numpy()))
            raise bad(
                f"row {n + 1} has {ids.iloc[n]!r} as its id in {id_column!r}; expected "
                "strings or numbers"
            )
    missing = ids.isna()
    if missing.any():
        first_row = int(np.argmax(missing.to_numpy())) + 1
        raise bad(
            f"{int(missing.sum())} row(s) have no value in id column {id_column!r} (the first "
            f"is row {first_row}); every row needs an id"
        )
    try:
        counts = ids.value_counts(sort=False).sort_index()
    except (TypeError, ValueError) as exc:
        raise bad(
            f"the ids in {id_column!r} cannot be sorted ({exc}); expected strings or numbers "
            "of one type"
        ) from None
    parts = np.array_split(np.arange(len(counts)), min(num_shards, len(counts)))
    chunks = [c for c in parts if len(c)]
    first = [_plain(counts.index[c[0]]) for c in chunks]
    last = [_plain(counts.index[c[-1]]) for c in chunks]
    ends = [*first[1:], past(last[-1])] if chunks else []
    return [
        Shard(n, first[n], last[n], int(counts.iloc[c].sum()), ends[n], len(c))
        for n, c in enumerate(chunks)
    ]


def past(last: object) -> int | None:
    """The half-open bound after the last id: last + 1 for integer ids, else None (there is
    no next id to name)."""
    return last + 1 if isinstance(last, int) and not isinstance(last, bool) else None


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (what JSON and the ledger take)."""
    item = getattr(value, "item", None)
    return item() if item is not None else value


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
