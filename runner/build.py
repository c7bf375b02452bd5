"""Building a spec's `_target_` object inside a Ray worker, with Hydra's `instantiate` semantics.

`hydra.utils` costs about 0.15 s to import in a fresh worker process (it brings Hydra's config
machinery), and every pool worker, role replica and preemption's new replica is a fresh process.
Most specs are flat: a `_target_`, perhaps `_partial_`, and plain keyword values, which Hydra
builds by importing the target and calling it. Those are built here the same way; anything
else (nested `_target_`s, `_args_`, `_recursive_`, `_convert_`, a target importlib cannot
reach) goes to Hydra's own `instantiate`, so the semantics stay Hydra's.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping

# keys that ask for more of Hydra than importing and calling
HYDRA_KEYS = frozenset({"_args_", "_recursive_", "_convert_"})


def locate(path: str) -> object:
    """The object at a dotted path (`package.module.Name`), as Hydra's `get_object` finds it."""
    module, _, name = path.rpartition(".")
    if module:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            pass
    from hydra.utils import get_object

    return get_object(path)


def build(spec: Mapping[str, object]) -> object:
    """`instantiate(spec, _convert_="all")`: the target called with the spec's other keys."""
    if not _flat(spec):
        from hydra.utils import instantiate

        return instantiate(dict(spec), _convert_="all")
    target = locate(str(spec["_target_"]))
    if not callable(target):
        raise TypeError(f"_target_ {spec['_target_']!r} is not callable")
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
    if spec.get("_partial_"):
        return functools.partial(target, **kwargs)
    return target(**kwargs)


def _flat(spec: Mapping[str, object]) -> bool:
    """Whether Hydra would only import the target and call it with plain values."""
    if not isinstance(spec.get("_target_"), str) or HYDRA_KEYS & spec.keys():
        return False
    if not isinstance(spec.get("_partial_", False), bool):
        return False
    return not any(_has_target(v) for k, v in spec.items() if k not in ("_target_", "_partial_"))


def _has_target(value: object) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_target(v) for v in value)
    return False
