"""The remote side of a `sleep` unit (all a Ray worker imports of the kind)."""

from __future__ import annotations

import time

from runner.placement import StartTo, announce


def sleep_unit(
    seconds: float, fail: bool, timeout: float | None, started_to: dict[str, object]
) -> dict[str, object]:
    """Say where it runs, sleep (at most `timeout`), and say how it went (a failure or a
    timeout is a reply, as the virtual backend can give one, so the kind reads both alike)."""
    announce(StartTo(**started_to))  # type: ignore[arg-type]
    if timeout is not None and seconds > timeout:
        time.sleep(timeout)
        return timed_out(timeout)
    time.sleep(seconds)
    if fail:
        return {"ok": False, "error": "told to fail this attempt"}
    return {"ok": True, "slept": seconds}


def timed_out(timeout: float) -> dict[str, object]:
    """The reply of a unit stopped at its timeout."""
    return {"ok": False, "timeout": True, "error": f"timeout: {timeout:g}s exceeded"}
