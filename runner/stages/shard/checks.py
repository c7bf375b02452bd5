"""The spec checks of a shard stage: an input that exists and has the id column, exactly one of
`command` / `fn` with known placeholders, and the merge settings."""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.schema import StageSpec
from runner.spec import Problems, check_target, did_you_mean, unknown_key
from runner.stages.shard.schema import ShardStage

PLACEHOLDERS = ("input", "output", "output_dir", "low", "high", "last", "gpus", "shard", "done")
INPUT_SUFFIXES = (".csv", ".parquet")
FORMATS = ("parquet", "csv")
MERGE_KEYS = ("sort_by", "format")


def check(name: str, spec: StageSpec, problems: Problems, stages: Mapping[str, StageSpec]) -> None:
    """The input exists and has the id column; one of command / fn, with known placeholders."""
    assert isinstance(spec, ShardStage)
    path = f"pipeline.stages.{name}"
    _check_input(spec, path, problems)
    _check_work(spec, path, problems)
    _check_merge(spec.merge, f"{path}.merge", problems)
    if spec.gpus_per_shard > 1 and spec.gpus_per_shard != int(spec.gpus_per_shard):
        problems.add(
            f"{path}.gpus_per_shard",
            f"= {spec.gpus_per_shard!r}: above 1, GPUs per shard must be a whole number "
            "(a fraction below 1 shares a GPU)",
        )


def _check_input(spec: ShardStage, path: str, problems: Problems) -> None:
    source = Path(spec.input)
    if not source.is_file():
        problems.add(f"{path}.input", f"= {spec.input!r}: no such file")
        return
    if source.suffix not in INPUT_SUFFIXES:
        problems.add(
            f"{path}.input", f"= {spec.input!r}: unknown format; use a .csv or .parquet file"
        )
        return
    try:
        columns = _columns(source)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        problems.add(f"{path}.input", f"= {spec.input!r}: cannot read: {exc}")
        return
    if spec.id_column not in columns:
        problems.add(
            f"{path}.id_column",
            f"= {spec.id_column!r}: no such column in {spec.input}"
            f"{did_you_mean(spec.id_column, columns)} (columns: {', '.join(columns)})",
        )


def _columns(source: Path) -> list[str]:
    """The column names, from the header or the parquet schema alone."""
    if source.suffix == ".csv":
        import pandas as pd

        return [str(c) for c in pd.read_csv(source, nrows=0).columns]
    import pyarrow.parquet as pq

    return [str(c) for c in pq.read_schema(source).names]


def _check_work(spec: ShardStage, path: str, problems: Problems) -> None:
    # a command or fn of the wrong type is said already, and left out of the spec
    said = any(key in (f"{path}.command", f"{path}.fn") for key, _ in problems.items)
    if not said and (spec.command is None) == (spec.fn is None):
        problems.add(
            f"{path}.command",
            "give exactly one of `command` (an argv list) or `fn` ({_target_: pkg.mod.function})",
        )
    if spec.command is not None:
        for message in _command_problems(spec.command):
            problems.add(f"{path}.command", message)
    if spec.fn is not None:
        # the shard's task calls it with the shard's DataFrame, then the spec's keys
        check_target(
            problems, f"{path}.fn", spec.fn, "name the function, pkg.mod.function", lambda fn: 1
        )


def _command_problems(argv: list[str]) -> list[str]:
    if not argv:
        return ["= []: expected a non-empty argv list"]
    found: list[str] = []
    allowed = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    for arg in argv:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError:
            found.append(f"= {arg!r}: unbalanced brace; write {{{{ or }}}} for a literal brace")
            continue
        for placeholder in names:
            if placeholder not in PLACEHOLDERS:
                hint = did_you_mean(placeholder, PLACEHOLDERS)
                found.append(
                    f"= {arg!r}: unknown placeholder {{{placeholder}}}{hint} (allowed: {allowed})"
                )
    names_output = any("{output}" in arg for arg in argv)
    names_dir = any("{output_dir}" in arg for arg in argv)
    if not names_output and not names_dir:
        found.append(
            "the command never names {output} or {output_dir}: it must write its shard's rows there"
        )
    elif names_output and names_dir:
        found.append(
            "the command names both {output} and {output_dir}: name the one it writes "
            "(a file, or a directory it writes its own file into)"
        )
    return found


def _check_merge(merge_spec: dict[str, Any], path: str, problems: Problems) -> None:
    for key in merge_spec:
        if key not in MERGE_KEYS:
            problems.add(f"{path}.{key}", unknown_key(str(key), MERGE_KEYS))
    fmt = merge_spec.get("format", "parquet")
    if fmt not in FORMATS:
        problems.add(f"{path}.format", f"= {fmt!r}: not one of {', '.join(FORMATS)}")
    sort_by = merge_spec.get("sort_by")
    if sort_by is not None and not (
        isinstance(sort_by, str)
        or (isinstance(sort_by, list) and sort_by and all(isinstance(s, str) for s in sort_by))
    ):
        problems.add(f"{path}.sort_by", f"= {sort_by!r}: expected a column name or a list of them")
