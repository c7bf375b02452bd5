"""Progress of running stages: done / total, rate, ETA, and the units that ended otherwise
(failed, timed out, cancelled, each by its name).

On a terminal, rich draws one bar per running stage, and output that stages print through
`Progress.print` (shard output, job output) goes above the bars, never through them. When the
stream is not a terminal (a file, a CI log, where redrawn bars make unreadable logs), a plain
`progress ...` line per stage every few seconds. `run.progress=off` draws nothing. Counters are
thread-safe; stages never wait on the terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bars
from rich.text import Text

from runner.lifecycle import UnitState

BAR_WIDTH = 24


@dataclass
class _Stage:
    total: int
    started: float
    done: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    finished: bool = False
    task: TaskID | None = None

    @property
    def ended(self) -> int:
        """Units in a final state."""
        return self.done + self.failed + self.timed_out + self.cancelled

    def note(self) -> str:
        """'failed 2 timed out 5 cancelled 1': the ends other than done, each by its name."""
        ends = (
            ("failed", self.failed),
            ("timed out", self.timed_out),
            ("cancelled", self.cancelled),
        )
        return " ".join(f"{name} {n}" for name, n in ends if n)


# how a unit's final state is counted (the ledger's names); any other counts as failed
_ENDS = {"done": "done", "timeout": "timed_out", "cancelled": "cancelled"}


@dataclass
class Progress:
    """Per-stage counters, drawn as rich bars on a terminal or as periodic log lines."""

    mode: str = "auto"  # auto | bar | log | off
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    log_every: float = 10.0
    # put before each stage's name and each output line: a sweep's job (its overrides), whose
    # lines mix with others'
    label: str = ""
    _stages: dict[str, _Stage] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _bars: Bars | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode == "auto":
            self.mode = "bar" if self.stream.isatty() else "log"

    def start(self, stage: str, total: int) -> None:
        with self._lock:
            s = self._stages[stage] = _Stage(total, time.monotonic())
            if self.mode == "bar":
                bars = self._bars or self._start_bars()
                s.task = bars.add_task(stage, total=total or None, failed="")
            elif self.mode == "log" and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
                self._thread.start()

    def advance(self, stage: str, done: int = 0, failed: int = 0) -> None:
        if self.mode == "off":  # nothing shows the counts (a simulated run ends 100,000s)
            return
        with self._lock:
            s = self._stages[stage]
            s.done += done
            s.failed += failed
            self._moved(s, done + failed)

    def ended(self, stage: str, state: UnitState) -> None:
        """One unit reached its final `state`: counted under its own name (a timed-out unit
        is `timed out`, not `failed`)."""
        if self.mode == "off":
            return
        with self._lock:
            s = self._stages[stage]
            counter = _ENDS.get(state.value, "failed")
            setattr(s, counter, getattr(s, counter) + 1)
            self._moved(s, 1)

    def _moved(self, s: _Stage, count: int) -> None:
        if self._bars is not None and s.task is not None:
            self._bars.update(s.task, advance=count, failed=s.note())

    def finish(self, stage: str) -> None:
        with self._lock:
            s = self._stages[stage]
            s.finished = True
            if self._bars is not None and s.task is not None:
                self._bars.remove_task(s.task)
                self._bars.console.print(line(self.label + stage, s), markup=False, highlight=False)
                s.task = None

    def print(self, text: str) -> None:
        """Print a line of a stage's output (a shard's, a job's) above the bars; without bars,
        to stdout as it is. After the label, as the progress lines: a sweep's jobs print side
        by side."""
        text = self.label + text
        bars = self._bars
        if bars is not None and self._stdout_is_terminal():
            bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            bars, self._bars = self._bars, None
        if bars is not None:
            bars.stop()

    def _start_bars(self) -> Bars:
        console = Console(file=self.stream, force_terminal=True)
        self._bars = Bars(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=BAR_WIDTH),
            MofNCompleteColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[failed]}", style="red"),
            console=console,
            # stray writes to stdout land above the bars too, when stdout is this terminal
            redirect_stdout=self._stdout_is_terminal(),
            redirect_stderr=False,
            refresh_per_second=4,
        )
        self._bars.start()
        return self._bars

    def _stdout_is_terminal(self) -> bool:
        return self.stream is sys.stdout or sys.stdout.isatty()

    def _loop(self) -> None:
        while not self._wake.wait(self.log_every):
            self._log()

    def _log(self) -> None:
        with self._lock:
            lines = [line(self.label + n, s) for n, s in self._stages.items() if not s.finished]
        if lines:
            self.stream.write("".join(f"progress {text}\n" for text in lines))
            self.stream.flush()


class RateColumn(ProgressColumn):
    """Units per second, measured over the stage's life."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.1f}/s", style="cyan")


def line(name: str, s: _Stage) -> str:
    """'check [#####-----] 30/60 ETA 0:02 12.3/s failed 2 timed out 1'."""
    elapsed = max(time.monotonic() - s.started, 1e-6)
    count = s.ended
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
    if note := s.note():
        text += f" {note}"
    return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
