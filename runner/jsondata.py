"""JSON data as a type: what a unit's input, its result and its saved state are.

Results and inputs go to the ledger as JSON, so they are typed as the values JSON gives back,
not as `Any`: a checker sees where code assumes more than that.
"""

from __future__ import annotations

from typing import TypeAlias

# a value JSON gives back: None, a boolean, a number, a string, or lists and objects of them
Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None
# a JSON object
JsonObject: TypeAlias = dict[str, Json]
