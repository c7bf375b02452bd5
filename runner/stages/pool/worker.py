"""What runs inside a pool worker's Ray actor: the worker built once from its spec, batches of
items run through it, and every outcome returned as plain data.

A module of its own, importing nothing of the driver's (scheduler, ledger, Hydra's composer):
each worker is a fresh process that imports it before its first item, so what it imports is
paid at every worker's start and every replacement.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NotRequired, TextIO, TypedDict

from runner.build import build, locate
from runner.carry import Dest
from runner.placement import Started, here

# a failed item's error keeps this many of its innermost frames (the log has them all)
ERROR_FRAMES = 3

# the worker as built from its spec: called once per item with its payload
Worker = Callable[[object], object]


class BatchReply(TypedDict):
    """What `PoolActor.run` answers for a batch (and the simulated cluster in its place)."""

    # per item run, in the batch's order: done, error or timeout; its result or error; seconds
    status: list[str]
    values: list[object]
    seconds: list[float]
    # seconds the batch took in all, and the worker's CPU seconds so far
    busy: float
    cpu: float
    # an item overran step_timeout: the worker takes no more
    poisoned: bool
    # the log's new bytes (without a shared filesystem)
    log: bytes
    # when the last item ended (the worker's clock) and which worker ran it: not in virtual time
    ended: NotRequired[float]
    worker: NotRequired[str]


@dataclass(frozen=True)
class WorkerOutput:
    """Where a pool worker's `print` and `logging` go: its own log file under the run
    directory and, with `show_output`, the worker process's own streams too (which Ray
    forwards to the console when `cluster.log_to_driver` is set). Without a shared filesystem
    the log is written on the worker's node and each batch's reply brings its new bytes."""

    log: Dest
    show: bool = False


class PoolActor:
    """Runs inside a Ray actor: builds the worker once, then runs batches of items."""

    def __init__(
        self,
        worker: Mapping[str, object],
        step_timeout: float | None,
        threads: int,
        output: WorkerOutput | None = None,
    ) -> None:
        if output is not None:
            _capture(output)
        # without a shared filesystem: the log on this node, read as it grows (the file is
        # unlinked at once, so a worker leaves nothing behind on its node)
        self._log_reader: BinaryIO | None = None
        if output is not None and output.log.carried:
            with contextlib.suppress(OSError):
                self._log_reader = open(output.log.here(), "rb")  # noqa: SIM115 (kept open: read as it grows)
                os.unlink(output.log.here())
        if not isinstance(locate(str(worker["_target_"])), type) and "_partial_" not in worker:
            # a plain function is the worker itself, called per item with the spec's kwargs
            worker = {**worker, "_partial_": True}
        self._fn = _worker(build(worker))
        self._timeout = step_timeout
        self._threads = _DaemonThreads(threads) if step_timeout else None
        # set once an item overran step_timeout: its thread is stuck, so take no more items
        self._poisoned = False
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # CPU spent starting up (imports, building the worker) is not the units' CPU time
        self._cpu0 = _cpu_seconds()

    def ready(self) -> Started:
        return here()

    def run(self, ids: list[str], payloads: list[object]) -> BatchReply:
        """A batch's outcomes, in its order: per item a status, a value and seconds, the
        items run one after another (the items after the last status were not started: a
        timed-out item stops the batch); when the last ended (this node's clock); busy time;
        CPU so far.

        Columns of plain data, never tuples: Ray pickles each tuple inside a reply one by one
        and sends lists of strings and numbers as they are. A result that is not JSON becomes
        that item's error, so one bad result never fails the batch it travels with."""
        status: list[str] = []
        values: list[object] = []
        seconds: list[float] = []
        started = clock = time.perf_counter()
        for uid, payload in zip(ids, payloads, strict=True):
            if self._poisoned:
                break
            state, value = self._one(uid, payload)
            now = time.perf_counter()
            status.append(state)
            values.append(value)
            seconds.append(now - clock)
            clock = now
            if state == "timeout":
                self._poisoned = True
        return BatchReply(
            status=status,
            values=values,
            seconds=seconds,
            busy=time.perf_counter() - started,
            ended=time.time(),
            cpu=_cpu_seconds() - self._cpu0,
            poisoned=self._poisoned,
            worker=self.name,
            log=self._new_log(),
        )

    def _one(self, uid: str, payload: object) -> tuple[str, object]:
        if self._threads is None:
            return _call(self._fn, uid, payload)
        future = self._threads.submit(self._fn, uid, payload)
        try:
            return future.result(timeout=self._timeout)
        except FutureTimeout:
            # the thread cannot be interrupted: report, and let the driver replace this actor
            print(f"item {uid}: step_timeout {self._timeout:g}s exceeded", file=sys.stderr)
            return "timeout", f"step_timeout {self._timeout:g}s exceeded"

    def _new_log(self) -> bytes:
        """Without a shared filesystem, the log's bytes written since the last reply (they
        travel back with it); else nothing."""
        if self._log_reader is None:
            return b""
        sys.stdout.flush()
        sys.stderr.flush()
        return self._log_reader.read()


def _worker(built: object) -> Worker:
    """The built worker, called per item; one that is not callable fails each item with
    the TypeError calling it raises."""
    if callable(built):
        return built

    def uncallable(payload: object) -> object:
        raise TypeError(f"{type(built).__name__!r} object is not callable")

    return uncallable


def _capture(output: WorkerOutput) -> None:
    """Send this process's `print` and `logging` to the worker's log file (and, with `show`,
    to its own streams as well). Python-level only: Ray keeps the process's file descriptors."""
    path = Path(output.log.here())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = path.open("a", buffering=1)
    except OSError as exc:
        print(f"runner: cannot open worker log {path}: {exc}", file=sys.stderr)
        return
    sys.stdout = _Tee(log_file, sys.stdout if output.show else None)
    sys.stderr = _Tee(log_file, sys.stderr if output.show else None)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


class _Tee(io.TextIOBase):
    """A text stream writing to a log file and, optionally, to a second stream."""

    def __init__(self, log_file: TextIO, also: TextIO | None) -> None:
        self._log, self._also = log_file, also
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._log.write(text)
            if self._also is not None:
                self._also.write(text)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        if self._also is not None:
            self._also.flush()


def _cpu_seconds() -> float:
    """CPU time of this process and the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _DaemonThreads:
    """Runs calls on daemon threads: a stuck item must never keep the actor process alive
    at exit (ThreadPoolExecutor joins its threads, so a killed actor would linger)."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[tuple[str, object]], Worker, str, object]] = (
            queue.SimpleQueue()
        )
        for n in range(count):
            threading.Thread(target=self._serve, name=f"item-{n}", daemon=True).start()

    def submit(self, fn: Worker, uid: str, payload: object) -> Future[tuple[str, object]]:
        future: Future[tuple[str, object]] = Future()
        self._jobs.put((future, fn, uid, payload))
        return future

    def _serve(self) -> None:
        while True:
            future, fn, uid, payload = self._jobs.get()
            future.set_result(_call(fn, uid, payload))


def _call(fn: Worker, uid: str, payload: object) -> tuple[str, object]:
    """One item: ("done", its result as JSON data) or ("error", type, message and the last
    frames); the whole traceback goes to the worker's log."""
    try:
        return "done", json_value(fn(payload))
    except Exception as exc:  # the item's own failure: a recorded outcome, not a crash
        print(f"item {uid} failed:\n{traceback.format_exc()}", file=sys.stderr, end="")
        return "error", _error_text(exc)


def _error_text(exc: BaseException) -> str:
    """`Type: message`, then the last frames (innermost last), as a results row keeps it."""
    head = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ResultError):
        return head
    frames = traceback.extract_tb(exc.__traceback__)[1:][-ERROR_FRAMES:]
    lines = [f"  at {f.filename}:{f.lineno} in {f.name}" for f in frames]
    return "\n".join([head, *lines])


# results kept as they are, without the encoder's check (what it would pass unchanged)
_SCALARS = frozenset({int, float, str, bool, type(None)})


class ResultError(TypeError):
    """A worker returned a value the ledger cannot keep (not JSON)."""


def json_value(value: object) -> object:
    """`value` as the ledger keeps it: JSON values as they are, numpy values (anything with
    `tolist()`) converted; anything else raises ResultError naming its type, so the item fails
    with that message instead of being silently stringified (or crashing its whole batch)."""
    if type(value) in _SCALARS:
        return value  # nothing to check: the commonest result, at no cost
    converted = False

    def plain(obj: object) -> object:
        nonlocal converted
        tolist = getattr(obj, "tolist", None)
        if callable(tolist):
            converted = True
            return tolist()
        kind = type(obj)
        name = kind.__qualname__ if kind.__module__ == "builtins" else repr(kind)[8:-2]
        raise ResultError(f"a {name} cannot be stored")

    try:
        text = json.dumps(value, default=plain)
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the result is not JSON ({exc}): return dicts, lists, strings, numbers, booleans "
            "or None (numpy values are converted)"
        ) from None
    return json.loads(text) if converted else value
