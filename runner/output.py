"""A unit's output on the terminal: the complete new lines of its log files, each prefixed
with the unit's name, printed through `Progress.print` so they land above the progress bars
and never through them.

A unit writes its streams to files (they are what stays after the run); the runner follows
those files from its own loop rather than piping the streams, so a unit that floods its output
never blocks on the terminal, and a line cut in the middle waits until its newline is there.
"""

from __future__ import annotations

from pathlib import Path

from runner.progress import Progress


class Tail:
    """Where the runner is in each followed file: the bytes already shown."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.shown: dict[Path, int] = {}

    def start(self, path: Path, fresh: bool = False) -> None:
        """Follow `path` from its current end, so what an earlier attempt wrote is not shown
        again; `fresh`: from its start (an attempt that truncates the file)."""
        self.shown[path] = 0 if fresh or not path.exists() else path.stat().st_size

    def show(self, path: Path, prefix: str) -> None:
        """Print the complete lines written to `path` since the last look."""
        seen = self.shown.get(path, 0)
        try:
            if path.stat().st_size < seen:  # written afresh since the last look
                seen = 0
            with open(path, "rb") as fh:
                fh.seek(seen)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        if not end:
            return
        self.shown[path] = seen + end
        for line in data[:end].decode(errors="replace").splitlines():
            self.progress.print(f"{prefix}{line}")
