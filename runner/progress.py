"""Progress of running stages: done / total, rate, ETA and failures.

A bar redrawn in place on a terminal; a line every few seconds when output goes to a file or
a CI log (where carriage returns make unreadable logs). Counters are thread-safe; drawing
happens on one background thread so stages never wait on the terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 24


@dataclass
class _Stage:
    total: int
    started: float
    done: int = 0
    failed: int = 0
    finished: bool = False


@dataclass
class Progress:
    """Per-stage counters with a background renderer."""

    mode: str = "auto"  # auto | bar | log | off
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    log_every: float = 10.0
    _stages: dict[str, _Stage] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode == "auto":
            self.mode = "bar" if self.stream.isatty() else "log"

    def start(self, stage: str, total: int) -> None:
        with self._lock:
            self._stages[stage] = _Stage(total, time.monotonic())
        if self.mode != "off" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()

    def advance(self, stage: str, done: int = 0, failed: int = 0) -> None:
        with self._lock:
            s = self._stages[stage]
            s.done += done
            s.failed += failed

    def finish(self, stage: str) -> None:
        with self._lock:
            self._stages[stage].finished = True
        if self.mode == "bar":
            self._draw(final_stage=stage)

    def close(self) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        period = 0.25 if self.mode == "bar" else self.log_every
        while not self._wake.wait(period):
            self._draw()

    def _draw(self, final_stage: str | None = None) -> None:
        with self._lock:
            lines = [
                (name, line(name, s))
                for name, s in self._stages.items()
                if (not s.finished) or name == final_stage
            ]
        if not lines:
            return
        if self.mode == "bar":
            text = "  ".join(text for _, text in lines)
            end = "\n" if final_stage else ""
            self.stream.write(f"\r\033[K{text}{end}")
        else:
            self.stream.write("".join(f"progress {text}\n" for _, text in lines))
        self.stream.flush()


def line(name: str, s: _Stage) -> str:
    """'check [#####-----] 30/60 12.3/s ETA 0:02 failed 2'."""
    elapsed = max(time.monotonic() - s.started, 1e-6)
    count = s.done + s.failed
    rate = count / elapsed
    text = f"{name} "
    if s.total:
        filled = int(BAR_WIDTH * min(count / s.total, 1.0))
        text += f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {count}/{s.total}"
        if rate > 0 and count < s.total:
            text += f" ETA {_clock((s.total - count) / rate)}"
    else:
        text += f"{count}"
    text += f" {rate:.1f}/s"
    if s.failed:
        text += f" failed {s.failed}"
    return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
