"""The imports a run's end needs, done on a daemon thread while its units run.

The end of every run draws the timeline (matplotlib: ~0.3 s to import), and a pool stage
writes `results.parquet`, where pyarrow's first `pa.array` imports pandas (~0.4 s). On a
short run those imports are most of what the runner adds to Ray's own start-up; while units
run the main thread mostly waits on Ray, so they are started then, beside it. Anything the
thread does not finish (or fails at) is imported by the main thread when it needs it, as
before: the thread changes when the cost is paid, never what runs.

The thread starts once Ray is imported and running, and imports only libraries that never
import Ray or the runner, so it cannot meet the main thread in a circular import.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

# what the timeline picture imports (timeline.draw)
PICTURE = ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.dates")
# what results.parquet imports (stages/pool/results.py), pandas through pyarrow's first array
RESULTS = ("pandas",)


def start(modules: tuple[str, ...]) -> threading.Thread:
    """Import `modules` on a daemon thread; return it (joining it is never needed)."""
    thread = threading.Thread(target=_load, args=(modules,), name="runner-warm", daemon=True)
    thread.start()
    return thread


def _load(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the main thread imports it again, and reports it there
            log.debug("warm import of %s: %s", name, exc)
