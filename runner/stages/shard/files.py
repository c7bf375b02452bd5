"""One shard's files under `<run.dir>/<stage>/shards/`, the placeholders its command sees,
and how its output is committed.

A command writes a temporary output (`part`, `{output}`), or files of its own naming into a
directory of its own (`{output_dir}`, R2R's step-2 contract). The driver commits it only once
it is readable and keeps the stage's `outputs` policy (`one_per_id`: one row per input row;
`subset`: ids of the range, repeated or not; `any`): fsync, rename, then the manifest (and only
after that the ledger row). A CSV output left by an earlier attempt can be resumed: its
complete rows' ids are listed in `{done}`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

from runner.plan import Unit
from runner.stages.shard.merge import Committed, read_table, write_table
from runner.stages.shard.ranges import Shard
from runner.stages.shard.schema import ShardStage
from runner.store import write_json

# log lines quoted when a shard fails for good
TAIL_LINES = 15
# how the task opens each attempt's lines in the shard's log (`task.py`)
ATTEMPT_LINE = "--- runner: attempt "
# what a command may write into {output_dir}; line formats can be resumed through {done}
DATA_SUFFIXES = (".csv", ".parquet", ".jsonl")
LINE_SUFFIXES = (".csv", ".jsonl")
# the folder of a stage's shard files, in its stage directory
SHARDS = "shards"


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

    @property
    def out_dir(self) -> Path:
        return self._at(".out")

    @property
    def out_dir_owner(self) -> Path:
        return self._at(".out.fingerprint")

    def committed(self, label: str, fingerprint: str) -> Committed:
        """Where the shard keeps its committed output and manifest, for `fingerprint`'s plan."""
        return Committed(label, fingerprint, self.output, self.manifest)


def output_format(spec: ShardStage) -> str:
    """The format of a stage's shard outputs and merge (`merge.format`, parquet if unset)."""
    return str(spec.merge.get("format", "parquet"))


def shard_files(root: Path, spec: ShardStage, index: int, count: int) -> Files:
    """The files of shard `index` of `count` in `root` (the stage's `SHARDS` folder): the
    planner checks the committed ones, the run writes them, so both name them here."""
    width = max(4, len(str(count - 1)))
    return Files(root, f"shard-{index:0{width}d}", output_format(spec), Path(spec.input).suffix)


class Contract(TypedDict):
    """What a shard's commit checks (see `contract`)."""

    outputs: str
    output_dir: bool
    done: bool


class ShardPayload(TypedDict):
    """A shard unit's payload, as the shard planner builds it and the ledger keeps it: the
    input, the range and its contract."""

    input: str
    id_column: str
    num_shards: int
    contract: Contract
    index: int
    # ids of the input (integers, numbers or strings), both included
    low: object
    high: object
    rows: int
    end: object
    ids: int
    count: int


def payload_of(unit: Unit) -> ShardPayload:
    """The payload of a unit the shard planner made (a `ShardPayload`)."""
    payload = unit.payload
    assert isinstance(payload, dict)
    return cast(ShardPayload, payload)


def contract(command: list[str] | None, outputs: str) -> Contract:
    """What a shard's commit checks, kept in each unit's payload: the `outputs` policy, and
    whether the command writes into `{output_dir}` and resumes from `{done}`."""
    argv = " ".join(command or [])
    return {"outputs": outputs, "output_dir": "{output_dir}" in argv, "done": "{done}" in argv}


def launch_values(unit: Unit, files: Files, id_column: str, attempt: int) -> dict[str, str]:
    """Every placeholder of a shard's command (`{gpus}` is added on its node), with `{done}`
    written and `{output_dir}` readied: emptied unless it holds this config's partial output
    and the command resumes from `{done}`."""
    p, f = payload_of(unit), files
    terms = p["contract"]
    if terms.get("output_dir"):
        owner = f.out_dir_owner.read_text() if f.out_dir_owner.is_file() else None
        fresh = unit.reason == "fresh run" and attempt == 1
        if owner != unit.fingerprint or fresh or not terms.get("done"):
            shutil.rmtree(f.out_dir, ignore_errors=True)
        f.out_dir.mkdir(exist_ok=True)
        f.out_dir_owner.write_text(unit.fingerprint)
        ids = [i for path in _data_files(f.out_dir) for i in _resumable_ids(path, id_column)]
        f.done.write_text("".join(f"{i}\n" for i in ids))
    else:
        write_done_ids(f.part, f.done, id_column)
    end = p.get("end")
    return {
        "input": str(f.input.resolve()),
        "output": str(f.part.resolve()),
        "output_dir": str(f.out_dir.resolve()),
        "low": str(p["low"]),
        "high": "" if end is None else str(end),
        "last": str(p["high"]),
        "shard": str(p["index"]),
        "done": str(f.done.resolve()),
    }


def _data_files(directory: Path) -> list[Path]:
    """The CSV / parquet / JSONL files a command wrote into its `{output_dir}`, by name."""
    return sorted(
        q for q in directory.iterdir() if q.is_file() and q.suffix.lower() in DATA_SUFFIXES
    )


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
    ids = _resumable_ids(part, id_column) if part.is_file() else []
    done.write_text("".join(f"{i}\n" for i in ids))


def _resumable_ids(path: Path, id_column: str) -> Iterable[object]:
    """The ids of a partial line-format output, its cut-off last line dropped first; any
    other file (a parquet cannot be half written and read) is removed: it starts again."""
    if path.suffix.lower() not in LINE_SUFFIXES:
        path.unlink(missing_ok=True)
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    try:
        return read_table(path)[id_column].tolist() if complete else []
    except Exception:  # unreadable or without the id column: start again
        path.unlink()
        return []


def tail(path: Path) -> list[str]:
    """The last lines of a shard's log from its latest attempt on: the log keeps every
    attempt's lines, earlier runs' too, which would pass for this failure's."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [n for n, line in enumerate(lines) if line.startswith(ATTEMPT_LINE)]
    return lines[starts[-1] if starts else 0 :][-TAIL_LINES:]


def commit(files: Files, shard: Shard, unit: Unit, id_column: str) -> str | None:
    """Check the shard's output against the stage's `outputs` policy, then put it into place
    atomically and write the manifest; why not, when it cannot be committed."""
    f, p = files, payload_of(unit)
    terms = p["contract"]
    policy = terms["outputs"]
    if terms.get("output_dir"):
        error = _commit_dir(f)
        if error is not None:
            return error
    elif not f.part.is_file():
        return f"finished but did not write its output {f.part}"
    try:
        rows, columns = _shape(f.part)
    except Exception as exc:  # any reader error means an unusable output
        f.part.unlink(missing_ok=True)
        return f"its output {f.part} is not readable: {exc}"
    if policy != "any" and id_column not in columns:
        return f"its output has no {id_column!r} column (columns: {', '.join(columns)})"
    if policy == "one_per_id" and rows != shard.rows:
        return _reject(f, f"its output has {rows} row(s); its input range has {shard.rows}")
    if policy == "subset" and (error := _outside(f.part, id_column, p)) is not None:
        return _reject(f, error)
    with open(f.part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(f.part, f.output)
    manifest = {
        "shard": shard.label,
        "index": shard.index,
        "low": shard.low,
        "high": shard.high,
        "end": p.get("end"),
        "input_ids": p.get("ids"),
        "input_rows": shard.rows,
        "rows": rows,
        "outputs": policy,
        "input": p["input"],
        "fingerprint": unit.fingerprint,
        "output": f.output.name,
        "committed": time.time(),
    }
    write_json(f.manifest, manifest)
    for leftover in (f.part_owner, f.done, f.input, f.out_dir_owner):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(f.out_dir, ignore_errors=True)
    return None


def _reject(f: Files, why: str) -> str:
    """Drop an output that breaks the policy (it cannot be resumed either), and say why."""
    f.part.unlink(missing_ok=True)
    shutil.rmtree(f.out_dir, ignore_errors=True)
    return why


def _commit_dir(f: Files) -> str | None:
    """Gather what the command wrote into `{output_dir}` into the temporary output, in the
    stage's format (several files are concatenated by name)."""
    import pandas as pd

    found = _data_files(f.out_dir) if f.out_dir.is_dir() else []
    if not found:
        return f"finished but wrote no CSV, parquet or JSONL file into its output_dir {f.out_dir}"
    try:
        frames = [read_table(path) for path in found]
    except Exception as exc:  # any reader error means an unusable output
        return f"its output in {f.out_dir} is not readable: {exc}"
    write_table(pd.concat(frames, ignore_index=True), f.part)
    return None


def _outside(part: Path, id_column: str, payload: ShardPayload) -> str | None:
    """Why an output breaks the `subset` policy: an id outside the shard's range. An id may
    repeat inside it (R2R writes one row per mismatched token of a sample); one that another
    shard wrote too is outside this one's range, or counted by the merge."""
    ids = read_table(part)[id_column]
    low, high = payload["low"], payload["high"]
    try:
        outside = ids[(ids < low) | (ids > high)]
    except TypeError as exc:
        return f"its output's ids cannot be compared with its range {low}..{high}: {exc}"
    if len(outside):
        sample = ", ".join(str(i) for i in outside.unique()[:5])
        return f"its output has {len(outside)} row(s) with ids outside {low}..{high}: {sample}"
    return None
