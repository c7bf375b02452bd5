"""The Ray boundary of the stage kinds: remote functions and actor classes made on first use,
actors killed only once they are up (`ActorKills`), and a Ray error told in one line.

A stage module must import without Ray (`mode=plan` never starts it, and importing Ray costs
about half a second), so `ray.remote(...)` waits until a stage really runs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast, runtime_checkable

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from ray import ObjectRef

log = logging.getLogger(__name__)

T = TypeVar("T")


class RemoteCall(Protocol):
    """An actor's method as Ray hands it: called with `.remote(...)`, it answers a reference."""

    def remote(self, *args: object, **kwargs: object) -> ObjectRef[object]: ...


class Made(Protocol):
    """A function or a class as `ray.remote` makes it: options set, then started with
    `.remote(...)` (a task's reference, or an actor's handle)."""

    def options(self, **options: object) -> Made: ...

    def remote(self, *args: object, **kwargs: object) -> object: ...


@runtime_checkable
class Actor(Protocol):
    """A Ray actor's handle, as far as asking whether it is up goes (every actor has it)."""

    @property
    def __ray_ready__(self) -> RemoteCall: ...


_made: dict[Callable[..., object], Made] = {}
_lock = threading.Lock()

# a traceback's last line: `SomeError: message`, `pkg.mod.CustomException: message`, `SystemExit`
_EXCEPTION_LINE = re.compile(r"[\w.]*(Error|Exception|Interrupt|Exit|Expired)(:|$)")
# longest error text kept in a ledger row or a stage message
MAX_ERROR = 300


def remote(target: object) -> Made:
    """`ray.remote(target)`, made once per target (stages run on threads: made under a lock)."""
    if not callable(target):
        raise TypeError(f"not a function or a class for Ray to run: {target!r}")
    with _lock:
        if target not in _made:
            import ray

            # Ray's own types follow the target's signature; the kinds call it by `Made`
            _made[target] = cast(Made, ray.remote(target))
        return _made[target]


def plain(obj: DataclassInstance) -> dict[str, object]:
    """A dataclass instance as a dict of its fields (shallow), to travel as a task's argument:
    Ray packs builtins with msgpack, while an instance of a class of ours in the arguments
    takes its pickle path, about 0.3 ms of CPU more per task (driver and worker together).
    Field names are looked up once per class (`dataclasses.fields` walks them per call)."""
    names = _field_names.get(type(obj))
    if names is None:
        names = _field_names[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
    return {name: getattr(obj, name) for name in names}


_field_names: dict[type, tuple[str, ...]] = {}


def bounded(fn: Callable[[], object], seconds: float) -> bool:
    """Run `fn` on a daemon thread and wait at most `seconds`; False when it is still running.

    For clean-up on the way out: a Ray call to a GCS that a signal is taking down blocks with
    no timeout of its own, and must not keep an interrupted run from ending."""
    worker = threading.Thread(target=fn, name="bounded", daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


class Asked(Generic[T]):
    """`fn` asked on a daemon thread, its answer taken once it has come (`answered`): for a
    question to Ray's GCS while the run goes on, which blocks with no timeout of its own when
    the GCS is gone (`ray.nodes()` waits out Ray's minute of reconnecting)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.value: T | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        threading.Thread(target=self._ask, args=(fn,), name="asked", daemon=True).start()

    def _ask(self, fn: Callable[[], T]) -> None:
        try:
            self.value = fn()
        except Exception as exc:  # told to the asker, as the answer
            self.error = exc
        self.done.set()

    def answered(self, wait: float = 0.0) -> bool:
        """Whether the answer (or the error) has come, waiting at most `wait` seconds for it."""
        return self.done.wait(wait) if wait > 0 else self.done.is_set()


class ActorKills:
    """Actors to kill, each once Ray has made it.

    Ray 2.60 may keep what an actor holds when it is killed while being created: when the
    kill reaches the worker leased for it before the actor does, the worker ignores it
    ("Mismatched ActorID: ignoring KillActor"), and keeps the actor's CPUs until the driver's
    job ends (a pool worker killed as its stage ended before it was up held half a CPU of
    the session's Ray for good; killed 5 ms after it was asked for, 6 of 10 series of ten
    such actors left one so, none of 100 killed once up). So an actor not known to be up is
    asked whether it is (`__ray_ready__`, Ray's own method of every actor) and killed once it
    answers, or fails to come up."""

    def __init__(self) -> None:
        # the answer to `__ray_ready__`, and its actor
        self.pending: dict[ObjectRef[object], Actor] = {}

    def kill(self, actor: object, now: bool) -> None:
        """Kill `actor` now (it is known to be up, or the run is stopping), else once up."""
        if now or not isinstance(actor, Actor):
            _kill(actor)
        else:
            self.pending[actor.__ray_ready__.remote()] = actor

    def reap(self) -> None:
        """Kill the actors that are up now (or failed to come up)."""
        if not self.pending:
            return
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            _kill(self.pending.pop(ref))

    def close(self, seconds: float) -> None:
        """The run ends: wait at most `seconds` for the actors still coming up, then kill
        every one left."""
        if not self.pending:
            return
        import ray

        ray.wait(list(self.pending), num_returns=len(self.pending), timeout=seconds)
        for actor in self.pending.values():
            _kill(actor)
        self.pending.clear()


def _kill(actor: object) -> None:
    import ray
    from ray.actor import ActorHandle

    try:
        if not isinstance(actor, ActorHandle):
            raise ValueError(f"not an actor: {actor!r}")  # as ray.kill says it
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # gone already
        log.debug("kill: %s", exc)


def error_line(exc: BaseException) -> str:
    """The line of a Ray error worth showing: the exception a task or an actor raised (the
    traceback's last unindented line naming an error), else the error's first line."""
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    raised = [
        ln for ln in lines if not ln[0].isspace() and ("Error" in ln or _EXCEPTION_LINE.match(ln))
    ]
    line = raised[-1] if raised else lines[0] if lines else type(exc).__name__
    return line.strip()[:MAX_ERROR]
