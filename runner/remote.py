"""The Ray boundary of the stage kinds: remote functions and actor classes made on first use,
and a Ray error told in one line.

A stage module must import without Ray (`mode=plan` never starts it, and importing Ray costs
about half a second), so `ray.remote(...)` waits until a stage really runs.
"""

from __future__ import annotations

import re
import threading
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


def error_line(exc: BaseException) -> str:
    """The line of a Ray error worth showing: the exception a task or an actor raised (the
    traceback's last unindented line naming an error), else the error's first line."""
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    raised = [
        ln for ln in lines if not ln[0].isspace() and ("Error" in ln or _EXCEPTION_LINE.match(ln))
    ]
    line = raised[-1] if raised else lines[0] if lines else type(exc).__name__
    return line.strip()[:MAX_ERROR]
