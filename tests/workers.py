"""Workers used by the tests: each misbehaves in one precise way."""

from __future__ import annotations

import logging
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


class Tally:
    """Sleep `seconds` per item, then append the item to the file `path` (one line each): what
    the workers really finished, to hold against the ledger."""

    def __init__(self, path: str, seconds: float = 0.05) -> None:
        self.path, self.seconds = path, seconds

    def __call__(self, item: int) -> int:
        time.sleep(self.seconds)
        with open(self.path, "a") as f:
            f.write(f"{item}\n")
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


class Unstorable:
    """Return a lock (which neither pickles nor is JSON) for the items in `bad`, numpy
    integers for the others."""

    def __init__(self, bad: list[int]) -> None:
        self.bad = set(bad)

    def __call__(self, item: int) -> Any:
        import threading

        import numpy as np

        return threading.Lock() if item in self.bad else {"n": np.int64(item)}


def double(item: int, plus: int = 0) -> int:
    """A plain function as a worker: called per item with the spec's kwargs."""
    print(f"doubling {item}")
    logging.getLogger("tests.double").info("doubled %d", item)
    return 2 * item + plus


class Gated:
    """Hold the items in `hold` while the file `gate` exists; return the item. With `marks`,
    a held item first leaves `started-ITEM` there."""

    def __init__(self, gate: str, hold: list[int], marks: str | None = None) -> None:
        self.gate, self.hold, self.marks = gate, set(hold), marks

    def __call__(self, item: int) -> int:
        if self.marks is not None and item in self.hold:
            with open(os.path.join(self.marks, f"started-{item}"), "w"):
                pass
        while item in self.hold and os.path.exists(self.gate):
            time.sleep(0.05)
        return item


class Big:
    """Return `size` characters per item (to fill a small disk)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, item: int) -> str:
        return str(item % 10) * self.size


class Returns:
    """Return an awkward value for the items in `bad` (`kind`: a lock, which neither pickles
    nor is JSON; a set or a datetime, which pickle but are not JSON); the item itself for the
    others."""

    def __init__(self, kind: str, bad: list[int]) -> None:
        self.kind, self.bad = kind, set(bad)

    def __call__(self, item: int) -> Any:
        import datetime
        import threading

        if item not in self.bad:
            return item
        return {
            "lock": lambda: threading.Lock(),
            "set": lambda: {item},
            "datetime": lambda: datetime.datetime(2026, 1, 2),
        }[self.kind]()


class Annotated:
    """Return `{"score": item, "notes": {}}`: a result holding an empty object on every item."""

    def __call__(self, item: int) -> dict[str, Any]:
        return {"score": item, "notes": {}}


class SlowStart:
    """A role actor (`runner.examples.rlhf.Rollout`) that takes `start_seconds` to be built,
    as one loading a model does: a replica granted meanwhile has not started yet."""

    def __init__(self, start_seconds: float, **rollout: Any) -> None:
        from runner.examples.rlhf import Rollout

        time.sleep(start_seconds)
        self._rollout = Rollout(**rollout)

    def run(self, ctx: Any) -> dict[str, Any]:
        return self._rollout.run(ctx)

    def state(self) -> dict[str, Any]:
        return self._rollout.state()

    def restore(self, state: dict[str, Any]) -> None:
        self._rollout.restore(state)


class Made:
    """An actor that writes `path` as it is made: whether Ray made it before it was killed."""

    def __init__(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
