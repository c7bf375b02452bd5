"""One shard's files under `<run.dir>/<stage>/shards/`, and how its output is committed.

A command writes a temporary output (`part`); the driver commits it only once it is readable,
has the id column and one row per input row: fsync, rename, then the manifest (and only after
that the ledger row). A CSV `part` left by an earlier attempt can be resumed: its complete
rows' ids are listed in `{done}`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.merge import read_table
from runner.plan import Unit
from runner.stages.shard.ranges import Shard
from runner.store import write_json

# log lines quoted when a shard fails for good
TAIL_LINES = 15


@dataclass(frozen=True)
class Files:
    """A shard's files; `part` is the temporary output the command writes."""

    root: Path
    stem: str
    fmt: str
    input_suffix: str

    def _at(self, suffix: str) -> Path:
        return self.root / f"{self.stem}{suffix}"

    @property
    def output(self) -> Path:
        return self._at(f".{self.fmt}")

    @property
    def part(self) -> Path:
        return self._at(f".part.{self.fmt}")

    @property
    def part_owner(self) -> Path:
        return self._at(".part.fingerprint")

    @property
    def manifest(self) -> Path:
        return self._at(".manifest.json")

    @property
    def input(self) -> Path:
        return self._at(f".input{self.input_suffix}")

    @property
    def log(self) -> Path:
        return self._at(".log")

    @property
    def done(self) -> Path:
        return self._at(".done.txt")

    @property
    def pid(self) -> Path:
        return self._at(".pid")


def _shape(path: Path) -> tuple[int, list[str]]:
    """(rows, columns) of an output file; parquet from its footer alone."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.read_metadata(path)
        return meta.num_rows, [str(n) for n in meta.schema.names]
    frame = read_table(path)
    return len(frame), [str(c) for c in frame.columns]


def write_done_ids(part: Path, done: Path, id_column: str) -> None:
    """`{done}`: the ids a previous attempt already wrote to a CSV `{output}`, one per line.

    A cut-off last line is dropped from the partial output first, so a command may append
    the rest of its rows to `{output}` and skip these ids. Other formats resume from empty."""
    ids: Iterable[Any] = []
    if part.suffix == ".csv" and part.is_file():
        data = part.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            part.write_bytes(complete)
        try:
            ids = read_table(part)[id_column].tolist() if complete else []
        except Exception:  # unreadable or without the id column: start again
            part.unlink()
            ids = []
    else:
        part.unlink(missing_ok=True)
    done.write_text("".join(f"{i}\n" for i in ids))


def tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    except OSError:
        return []


def commit(files: Files, shard: Shard, unit: Unit, id_column: str) -> str | None:
    """Check the temporary output (readable, id column, one row per input row), then rename
    it into place and write the manifest; why not, when it cannot be committed."""
    f = files
    if not f.part.is_file():
        return f"finished but did not write its output {f.part}"
    try:
        rows, columns = _shape(f.part)
    except Exception as exc:  # any reader error means an unusable output
        f.part.unlink(missing_ok=True)
        return f"its output {f.part} is not readable: {exc}"
    if id_column not in columns:
        return f"its output has no {id_column!r} column (columns: {', '.join(columns)})"
    if rows != shard.rows:
        f.part.unlink(missing_ok=True)  # a partial output that cannot be resumed
        return f"its output has {rows} row(s); its input range has {shard.rows}"
    with open(f.part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(f.part, f.output)
    manifest = {
        "shard": shard.label,
        "index": shard.index,
        "low": shard.low,
        "high": shard.high,
        "rows": rows,
        "input": unit.payload["input"],
        "fingerprint": unit.fingerprint,
        "output": f.output.name,
        "committed": time.time(),
    }
    write_json(f.manifest, manifest)
    for leftover in (f.part_owner, f.done, f.input):
        leftover.unlink(missing_ok=True)
    return None
