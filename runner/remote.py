"""The Ray boundary of the stage kinds: remote functions and actor classes made on first use,
and a Ray error told in one line.

A stage module must import without Ray (`mode=plan` never starts it, and importing Ray costs
about half a second), so `ray.remote(...)` waits until a stage really runs.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from typing import Any

_made: dict[Any, Any] = {}
_lock = threading.Lock()

# a traceback's last line: `SomeError: message`, `pkg.mod.CustomException: message`, `SystemExit`
_EXCEPTION_LINE = re.compile(r"[\w.]*(Error|Exception|Interrupt|Exit|Expired)(:|$)")
# longest error text kept in a ledger row or a stage message
MAX_ERROR = 300


def remote(target: Any) -> Any:
    """`ray.remote(target)`, made once per target (stages run on threads: made under a lock)."""
    with _lock:
        if target not in _made:
            import ray

            _made[target] = ray.remote(target)
        return _made[target]


def plain(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a dict of its fields (shallow), to travel as a task's argument:
    Ray packs builtins with msgpack, while an instance of a class of ours in the arguments
    takes its pickle path, about 0.3 ms of CPU more per task (driver and worker together)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def bounded(fn: Callable[[], object], seconds: float) -> bool:
    """Run `fn` on a daemon thread and wait at most `seconds`; False when it is still running.

    For clean-up on the way out: a Ray call to a GCS that a signal is taking down blocks with
    no timeout of its own, and must not keep an interrupted run from ending."""
    worker = threading.Thread(target=fn, name="bounded", daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def error_line(exc: BaseException) -> str:
    """The line of a Ray error worth showing: the exception a task or an actor raised (the
    traceback's last unindented line naming an error), else the error's first line."""
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    raised = [
        ln for ln in lines if not ln[0].isspace() and ("Error" in ln or _EXCEPTION_LINE.match(ln))
    ]
    line = raised[-1] if raised else lines[0] if lines else type(exc).__name__
    return line.strip()[:MAX_ERROR]
