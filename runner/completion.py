"""Shell completion of a key's value from the schema: `mode=<TAB>` offers every mode.

Hydra completes `KEY=` with the key's current value alone (`mode=run`), since a composed
config holds one value per key. For a key whose values the schema fixes — `mode`, a string
field with `choices` (`run.progress`, `cluster.kind`, a shard's `outputs`), a boolean — every
allowed value is offered instead.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping

from hydra.plugins.completion_plugin import CompletionPlugin
from omegaconf import DictConfig, OmegaConf
from omegaconf.base import Container

from runner.schema import ClusterConfig, Mode, RunConfig
from runner.spec import KindSchema

# the schema of the keys directly under each top-level mapping
_SECTIONS: dict[str, type] = {"run": RunConfig, "cluster": ClusterConfig}


def choices(config: DictConfig, key: str, kinds: Mapping[str, KindSchema]) -> list[str]:
    """Every value the schema allows for `key` (a dotted path of the composed `config`; a
    stage's keys from its kind's schema in `kinds`), or nothing when its values are open (a
    number, a path, a free-form mapping's entry)."""
    parts = key.split(".")
    if parts == ["mode"]:
        return [m.value for m in Mode]
    schema: type | None = None
    if len(parts) == 2:
        schema = _SECTIONS.get(parts[0])
    elif len(parts) == 4 and parts[:2] == ["pipeline", "stages"]:
        kind = OmegaConf.select(config, f"pipeline.stages.{parts[2]}.kind", default=None)
        found_kind = kinds.get(str(kind))
        schema = found_kind.spec_type if found_kind is not None else None
    if schema is None:
        return []
    found = {f.name: f for f in dataclasses.fields(schema)}.get(parts[-1])
    if found is None:
        return []
    if "choices" in found.metadata:
        return [str(c) for c in found.metadata["choices"]]
    hint = typing.get_type_hints(schema)[found.name]
    return ["true", "false"] if bool in (hint, *typing.get_args(hint)) else []


_installed = False


def install(kinds: Mapping[str, KindSchema]) -> None:
    """Complete `KEY=PARTIAL` from `choices` (a stage's keys from its kind in `kinds`) where
    the schema fixes the values, once (Hydra's completion offers no hook; hydra-core is pinned
    to 1.3)."""
    global _installed
    if _installed:
        return
    _installed = True
    matches = staticmethod(_matching(CompletionPlugin._get_matches, kinds))
    CompletionPlugin._get_matches = matches  # type: ignore[method-assign,assignment]


def _matching(
    get_matches: Callable[[Container, str], list[str]], kinds: Mapping[str, KindSchema]
) -> Callable[[Container, str], list[str]]:
    def matches(config: Container, word: str) -> list[str]:
        key, eq, partial = word.partition("=")
        # the whole config only: Hydra calls this again on nested nodes with the word's tail
        if eq and isinstance(config, DictConfig) and config._get_parent() is None:
            allowed = choices(config, key, kinds)
            if allowed:
                return [f"{key}={c}" for c in allowed if c.startswith(partial)]
        return get_matches(config, word)

    return matches
