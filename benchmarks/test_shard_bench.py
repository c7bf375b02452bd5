"""The `shard` stage: resuming a finished stage, and the cost of its commit-and-merge protocol.

Resume: a completed 1M-row, 8-shard stage run again (nothing to do) against its first run. A
resume must decide from metadata (the input's path, size and mtime, the ledger, the shards'
manifests and the merge summary) and never read the data again: the benchmark counts every
pandas/pyarrow read during the resumed runs and fails if there is one. The ratio says how much
of a first run a resume costs; the floor is the CLI itself (Hydra compose, ledger, summary).

Checkpoint and merge: the same 8 frames written and merged with the stage's own code (each
shard written under a temporary name as its task does, then `runner.stages.shard.files.commit`:
row count from the parquet footer, fsync, rename, manifest; then `runner.stages.shard.merge.merge`:
manifests checked, frames read, concatenated, sorted by id, written atomically, duplicate ids
counted, a summary written)
against what a hand-written script does for the same merged file: `to_parquet` per frame, then
`read_parquet` + `concat` + `sort_values` + `to_parquet`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from benchmarks.runs import run_cli

ROWS, SHARDS = 1_000_000, 8


@pytest.fixture(scope="session")
def million_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1M-row parquet file (shuffled ids, a number, a short string), made once."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    ids = rng.permutation(ROWS)
    frame = pd.DataFrame(
        {"id": ids, "x": rng.random(ROWS), "text": pd.Series(ids % 1000).map("row-{}".format)}
    )
    path = tmp_path_factory.mktemp("shard-data") / "rows.parquet"
    frame.to_parquet(path, index=False)
    return path


@contextmanager
def counting_reads() -> Iterator[list[str]]:
    """Count every pandas/pyarrow table read while the block runs (schema/footer reads are
    metadata and are not counted)."""
    import pandas as pd
    import pyarrow.parquet as pq

    calls: list[str] = []
    originals = {
        (pd, "read_parquet"): pd.read_parquet,
        (pd, "read_csv"): pd.read_csv,
        (pq, "read_table"): pq.read_table,
    }

    def spy(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{name}({args[0] if args else ''})")
            return fn(*args, **kwargs)

        return wrapped

    for (module, name), fn in originals.items():
        setattr(module, name, spy(name, fn))
    try:
        yield calls
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


@pytest.mark.usefixtures("ray_session")
def test_shard_resume_1m_rows(
    compare: Callable[..., None], benchmark: Any, million_rows: Path, tmp_path: Path
) -> None:
    runs: list[Path] = []
    overrides = [f"pipeline.stages.copy.input={million_rows}"]
    reads: list[str] = []

    def first_run() -> None:
        run_dir = tmp_path / f"first-{len(runs)}"
        run_cli("bench_shard", run_dir, *overrides)
        if runs:  # keep only the newest completed run: the one the resumes go over
            shutil.rmtree(runs[-1], ignore_errors=True)
        runs.append(run_dir)

    def resume() -> None:
        with counting_reads() as calls:
            run_cli("bench_shard", runs[-1], *overrides)
        reads.extend(calls)

    compare(resume, first_run, rounds=2)
    summary = json.loads((runs[-1] / "summary.json").read_text())["attempts"][-1]["stages"]["copy"]
    assert (summary["skipped"], summary["merged_rows"]) == (SHARDS, ROWS)
    benchmark.extra_info["data_reads_during_resume"] = len(reads)
    assert not reads, f"a resume read the data again: {reads}"


def rows_file(root: Path, rows: int) -> Path:
    """A parquet file of `rows` shuffled ids and a number (two columns keep 10M rows small)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    path = root / f"rows-{rows}.parquet"
    pd.DataFrame({"id": rng.permutation(rows), "x": rng.random(rows)}).to_parquet(path, index=False)
    return path


@pytest.mark.usefixtures("ray_session")
def test_shard_resume_10m_vs_10k_rows(
    compare: Callable[..., None], benchmark: Any, tmp_path: Path
) -> None:
    """A finished stage resumed over 10M rows against the same over 10k rows: a resume decides
    from metadata, so its cost must not grow with the data (goal: ratio <= 1.2)."""
    runs: dict[int, tuple[Path, list[str]]] = {}
    for rows in (10_000, 10_000_000):
        source = rows_file(tmp_path, rows)
        runs[rows] = (tmp_path / f"run-{rows}", [f"pipeline.stages.copy.input={source}"])
        run_cli("bench_shard", runs[rows][0], *runs[rows][1])  # the first run, not timed
    reads: list[str] = []

    def resume(rows: int) -> Callable[[], None]:
        def run() -> None:
            with counting_reads() as calls:
                run_cli("bench_shard", runs[rows][0], *runs[rows][1])
            reads.extend(calls)

        return run

    compare(resume(10_000_000), resume(10_000), rounds=5)
    attempts = json.loads((runs[10_000_000][0] / "summary.json").read_text())["attempts"]
    summary = attempts[-1]["stages"]["copy"]
    assert (summary["skipped"], summary["merged_rows"]) == (SHARDS, 10_000_000)
    benchmark.extra_info["data_reads_during_resume"] = len(reads)
    assert not reads, f"a resume read the data again: {reads}"


def _frames(source: Path) -> list[Any]:
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(source).sort_values("id", ignore_index=True)
    return [frame.iloc[c].reset_index(drop=True) for c in np.array_split(np.arange(ROWS), SHARDS)]


def _commit_and_merge(frames: list[Any], root: Path) -> None:
    """The stage's checkpoint protocol: the task's write, the driver's `commit`, the merge."""
    from runner.plan import Unit
    from runner.stages.shard.files import Files, commit, contract
    from runner.stages.shard.merge import Committed, merge, write_table
    from runner.stages.shard.ranges import Shard

    root.mkdir()
    shards = []
    for n, frame in enumerate(frames):
        files = Files(root, f"shard-{n:04d}", "parquet", ".parquet")
        shard = Shard(n, int(frame["id"].iloc[0]), int(frame["id"].iloc[-1]), len(frame))
        payload = {  # as the shard planner makes it, with the stage's default `outputs`
            "input": "rows.parquet",
            "id_column": "id",
            "num_shards": len(frames),
            "contract": contract(None, "subset"),
            "index": n,
            "low": shard.low,
            "high": shard.high,
            "rows": shard.rows,
            "end": shard.end,
            "ids": shard.ids,
            "count": len(frames),
        }
        unit = Unit(shard.label, f"fp{n}", payload)
        write_table(frame, files.part)  # what the shard's Ray task writes
        assert commit(files, shard, unit, "id") is None
        shards.append(Committed(shard.label, unit.fingerprint, files.output, files.manifest))
    summary = merge(shards, "id", ["id"], root / "merged.parquet")
    assert summary["total_rows"] == ROWS and not summary["missing_ranges"]


def _plain_write_and_merge(frames: list[Any], root: Path) -> None:
    import pandas as pd

    root.mkdir()
    paths = [root / f"part-{n}.parquet" for n in range(len(frames))]
    for frame, path in zip(frames, paths, strict=True):
        frame.to_parquet(path, index=False)
    merged = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    merged.sort_values("id", kind="stable", ignore_index=True).to_parquet(
        root / "merged.parquet", index=False
    )


def test_shard_checkpoint_and_merge(
    compare: Callable[..., None], million_rows: Path, tmp_path: Path
) -> None:
    frames = _frames(million_rows)
    count = iter(range(1_000))

    compare(
        lambda: _commit_and_merge(frames, tmp_path / f"runner-{next(count)}"),
        lambda: _plain_write_and_merge(frames, tmp_path / f"plain-{next(count)}"),
        rounds=3,
    )
