"""JSON data as a type: what a unit's input, its result and its saved state are.

Results and inputs go to the ledger as JSON, so they are typed as the values JSON gives back,
not as `Any`: a checker sees where code assumes more than that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeAlias

# a value JSON gives back: None, a boolean, a number, a string, or lists and objects of them
Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None
# a JSON object
JsonObject: TypeAlias = dict[str, Json]


# Narrowing JSON read back (a run's summary, a ledger's record) where it is read: a reader
# states what it expects of an entry, and gets an empty value where the entry is not that.


def json_object(value: object) -> Mapping[str, object]:
    """`value` as a JSON object (empty when it is not one)."""
    return value if isinstance(value, dict) else {}


def json_list(value: object) -> list[object]:
    """`value` as a JSON list (empty when it is not one)."""
    return value if isinstance(value, list) else []


def json_number(value: object) -> float:
    """`value` as a number (0 when it is not one)."""
    return float(value) if isinstance(value, int | float) else 0.0


def line_error(exc: ValueError) -> str:
    """Why one line of a JSONL file is not JSON, with its column: the decoder's own `line 2
    column 1` counts past the line's newline, which names a line the file does not have."""
    if isinstance(exc, json.JSONDecodeError):
        return f"at column {exc.colno}: {exc.msg}"
    return str(exc)
