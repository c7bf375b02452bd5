"""Workers used by the tests: each misbehaves in one precise way."""

from __future__ import annotations

import os
import time
from typing import Any


class Echo:
    """Return the item, times `factor` when numeric."""

    def __init__(self, factor: int = 1) -> None:
        self.factor = factor

    def __call__(self, item: Any) -> Any:
        return item * self.factor if isinstance(item, int) else item


class Sleepy:
    """Sleep `seconds` per item (forever for the items in `hang`)."""

    def __init__(self, seconds: float = 0.01, hang: list[int] | None = None) -> None:
        self.seconds, self.hang = seconds, set(hang or [])

    def __call__(self, item: int) -> int:
        while item in self.hang:
            time.sleep(0.05)
        time.sleep(self.seconds)
        return item


class Crashy:
    """Kill the whole worker process on the items in `crash`."""

    def __init__(self, crash: list[int]) -> None:
        self.crash = set(crash)

    def __call__(self, item: int) -> int:
        if item in self.crash:
            os._exit(1)
        return item


class Faulty:
    """Raise on the items in `fail`."""

    def __init__(self, fail: list[int]) -> None:
        self.fail = set(fail)

    def __call__(self, item: int) -> int:
        if item in self.fail:
            raise ValueError(f"bad item {item}")
        return item


class BrokenInit:
    """Fails while being built, as a worker with a missing model file would."""

    def __init__(self) -> None:
        raise FileNotFoundError("model.bin not found")

    def __call__(self, item: Any) -> Any:
        return item


class WhereAmI:
    """Return the Ray node id the item ran on, after `seconds` of work."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def __call__(self, item: int) -> str:
        import ray

        time.sleep(self.seconds)
        return str(ray.get_runtime_context().get_node_id())


def node_of_frame(frame: Any) -> Any:
    """A shard function: the rows, each marked with the Ray node that ran it."""
    import ray

    out = frame.copy()
    out["node"] = ray.get_runtime_context().get_node_id()
    return out
