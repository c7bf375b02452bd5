"""The remote side of a `sleep` unit (all a Ray worker imports of the kind)."""

from __future__ import annotations

import time

from runner.placement import StartTo, announce


def sleep_unit(seconds: float, fail: bool, started_to: dict[str, object]) -> dict[str, object]:
    """Say where it runs, sleep, and say how it went (a failure is a reply, as the virtual
    backend can give one, so the kind reads both the same way)."""
    announce(StartTo(**started_to))  # type: ignore[arg-type]
    time.sleep(seconds)
    if fail:
        return {"ok": False, "error": "told to fail this attempt"}
    return {"ok": True, "slept": seconds}
