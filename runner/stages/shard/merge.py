"""Merging a shard stage's committed outputs into one table, with a summary of what is missing.

The merge starts from the plan's list of shards, never from a listing of the directory: a
shard counts only when its manifest exists and carries this plan's fingerprint for it, so a
stale output of an earlier plan, or a stray file a user dropped there, is never picked up.
Ranges without a committed output are named in `merge_summary.json`, and so are ids that more
than one shard wrote (an id repeated within its own shard's output is not one: R2R writes a
row per mismatched token of a sample).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from runner.identity import digest
from runner.store import atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd

SUMMARY = "merge_summary.json"
# ids written by more than one shard listed in the summary (the count is always complete)
DUPLICATE_SAMPLE = 20


class ShardOutput(TypedDict):
    """One committed shard in the merge's summary."""

    shard: str
    # the ids of its input range, as its manifest lists them
    input_ids: object
    rows: int
    output: str


class MergeSummary(TypedDict):
    """What `merge_summary.json` holds."""

    # what the merged output depends on (`merge_key`): an equal key finds it up to date
    merge_key: str
    output: str
    total_rows: int
    shards: list[ShardOutput]
    committed_shards: int
    planned_shards: int
    missing_ranges: list[str]
    duplicate_ids: int
    duplicate_id_sample: list[object]


@dataclass(frozen=True)
class Committed:
    """Where one shard of the plan keeps its committed output and manifest."""

    label: str
    fingerprint: str
    output: Path
    manifest: Path


def manifest_of(shard: Committed) -> dict[str, object] | None:
    """The shard's manifest when it commits this plan's output, else None."""
    try:
        data: object = json.loads(shard.manifest.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("fingerprint") != shard.fingerprint or not shard.output.is_file():
        return None
    return data


def read_table(path: Path) -> pd.DataFrame:
    """A shard output or input as a DataFrame; its suffix tells the format (CSV, parquet,
    JSONL)."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame atomically in the format its suffix names."""
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)


def merge_key(shards: list[Committed], sort_by: list[str], target: Path) -> str:
    """What a merged output depends on: the order, the format, and each shard's commit (its
    fingerprint and commit time, from its manifest), so a recommitted shard merges again."""
    commits = [json.dumps([s.fingerprint, (manifest_of(s) or {}).get("committed")]) for s in shards]
    return digest(target.name, *sort_by, *commits)


def up_to_date(shards: list[Committed], sort_by: list[str], target: Path) -> MergeSummary | None:
    """The summary of an earlier merge of exactly these shards, when it is complete and its
    output is still there: a resumed run with nothing left to do then reads no data."""
    try:
        summary: MergeSummary = json.loads((target.parent / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    fresh = summary.get("merge_key") == merge_key(shards, sort_by, target)
    complete = not summary.get("missing_ranges")
    return summary if fresh and complete and target.is_file() else None


def merge(
    shards: list[Committed], id_column: str, sort_by: list[str], target: Path
) -> MergeSummary:
    """Write the committed shards of the plan, sorted, to `target`; return the summary."""
    import pandas as pd

    if (earlier := up_to_date(shards, sort_by, target)) is not None:
        return earlier

    frames: list[pd.DataFrame] = []
    per_shard: list[ShardOutput] = []
    missing: list[str] = []
    for shard in shards:
        manifest = manifest_of(shard)
        if manifest is None:
            missing.append(shard.label)
            continue
        frame = read_table(shard.output)
        frames.append(frame)
        per_shard.append(
            {
                "shard": shard.label,
                "input_ids": manifest.get("input_ids"),
                "rows": len(frame),
                "output": str(shard.output),
            }
        )
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({id_column: []})
    keys = [k for k in sort_by if k in merged.columns]
    if keys and len(merged):
        merged = merged.sort_values(keys, kind="stable", ignore_index=True)
    write_table(merged, target)
    duplicated = _shared_ids(frames, id_column)
    summary: MergeSummary = {
        "merge_key": merge_key(shards, sort_by, target),
        "output": str(target),
        "total_rows": len(merged),
        "shards": per_shard,
        "committed_shards": len(per_shard),
        "planned_shards": len(shards),
        "missing_ranges": missing,
        "duplicate_ids": len(duplicated),
        "duplicate_id_sample": [_plain(v) for v in duplicated[:DUPLICATE_SAMPLE]],
    }
    write_json(target.parent / SUMMARY, summary)
    return summary


def _shared_ids(frames: list[pd.DataFrame], id_column: str) -> list[object]:
    """The ids found in more than one shard's output, in the order they are met."""
    import pandas as pd

    owned = [f[id_column].drop_duplicates() for f in frames if id_column in f.columns]
    ids = pd.concat(owned, ignore_index=True) if owned else pd.Series([], dtype=object)
    return list(ids[ids.duplicated(keep="first")].unique())


def _plain(value: object) -> object:
    """numpy scalars as Python values, for JSON."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
