"""Where a grant runs (`Placement`), and proof of where a unit started (`Started`): what its
process says first, and how a task says it (`announce`, heard by `Starts`).

The scheduler decides where every unit runs; the cluster has to hear about it, or the runner's
per-node accounting is fiction on more than one node. Ray's own `ray.air.execution` managers
do the request/acquire half of this (`ResourceRequest` → `acquire_resources` →
`annotate_remote_entities`) but never choose a node, so the Ray backend writes the placement
into the actor's or task's options (`backends/ray.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict, cast

from runner.remote import error_line
from runner.resources import Resources

if TYPE_CHECKING:
    from ray import ObjectRef

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Placement:
    """Where one grant runs: the node's id and IP as Ray names them, what it holds, and the
    placement group that already holds it there, if any (the backend's handle). Not frozen,
    for one is made per grant (see `calls.py`); never changed once made."""

    node_id: str
    node_ip: str
    resources: Resources
    group: object = None


class StartedFields(TypedDict):
    """A `Started`'s fields, as a task sends them (JSON, or through the `Inbox`)."""

    node_id: str
    node_ip: str
    host: str
    pid: int
    time: float


@dataclass(slots=True)
class Started:
    """Sent by a unit's process as its first words: it really runs, here, since `time`.
    Never changed once made (not frozen, as `Placement`)."""

    node_id: str
    node_ip: str
    host: str
    pid: int
    time: float

    def fields(self) -> StartedFields:
        """The fields as plain data, to travel (cheaper than `dataclasses.asdict`)."""
        return StartedFields(
            node_id=self.node_id, node_ip=self.node_ip, host=self.host, pid=self.pid, time=self.time
        )

    @property
    def worker(self) -> str:
        """The process, as the ledger names it: `host:pid`."""
        return f"{self.host}:{self.pid}"

    @property
    def local(self) -> bool:
        """Whether the process runs on the runner's host (it can be signalled by pid)."""
        return self.host == socket.gethostname()


class _Post(Protocol):
    def remote(self, key: str, where: StartedFields) -> ObjectRef[None]: ...


class _Take(Protocol):
    def remote(self, wait: float) -> ObjectRef[dict[str, StartedFields]]: ...


class InboxHandle(Protocol):
    """Ray's handle of the run's `Inbox` actor: its methods, called with `.remote(...)`."""

    @property
    def post(self) -> _Post: ...

    @property
    def take(self) -> _Take: ...


@dataclass(frozen=True)
class StartTo:
    """Where one task announces its start: a file under the run directory, when every node
    sees it (`cluster.shared_fs`), else the run's `Inbox` actor."""

    key: str
    path: str | None = None
    inbox: InboxHandle | None = None


class StartToFields(TypedDict):
    """A `StartTo`'s fields, as it travels in a task's arguments (`remote.plain`)."""

    key: str
    path: str | None
    inbox: InboxHandle | None


def announce(to: StartTo) -> Started:
    """Inside a task: say where it runs, at once, and return that (`Announcement.say`)."""
    start = Announcement(to)
    start.say()
    return start.where


# seconds a task may run before it must have said where it runs (`Announcement`)
ANNOUNCE_AFTER = 0.05
# a reply's key for the start of a task that ended before it said it (`Announcement.reply`)
STARTED_KEY = "_started"


class Announcement:
    """Inside a task: where it runs, from its first moment (`here()`), said out of band.

    A plain task answers only when it ends, and Ray's streaming tasks cannot be cancelled
    safely in Ray 2.60 (a polite cancel may abort the driver), so a task announces its start
    out of band: through the run's inbox actor (no shared filesystem needed; the task waits
    for the inbox to have it, so a start is always heard before the task's reply), or by
    writing a file under the run directory (one write, no rename: a reader that finds it
    half-written reads it again the next turn). The executor hears it (`Starts`).

    A task that may end within a turn of the runner's loop (a job) says it only once it has
    run `ANNOUNCE_AFTER` seconds (`say_if_due`), and one that ends sooner carries it in its
    reply (`reply`): the start file (or the inbox post) was a third of a trivial job's own
    CPU time in its task, and reading it 7% of the driver's, for a start the runner
    would hear in the same turn as the end."""

    def __init__(self, to: StartTo | StartToFields) -> None:
        self.to = to if isinstance(to, StartTo) else StartTo(**to)
        self.where = here()
        self.due = self.where.time + ANNOUNCE_AFTER
        self.said = False

    def say(self) -> None:
        """Say it now (once)."""
        if self.said:
            return
        if self.to.inbox is not None:
            import ray

            ray.get(self.to.inbox.post.remote(self.to.key, self.where.fields()))
        else:
            assert self.to.path is not None
            _write_start(self.to.path, json.dumps(self.where.fields()).encode())
        self.said = True

    def say_if_due(self) -> float:
        """Say it if the task has run `ANNOUNCE_AFTER` seconds; the seconds until it is due
        (infinite once said). A start that cannot be said (a full disk, the inbox gone) is
        left to the reply: the job it is said for runs on."""
        if self.said:
            return math.inf
        left = self.due - time.time()
        if left > 0:
            return left
        self.due = math.inf
        try:
            self.say()
        except Exception as exc:  # an OSError, or Ray's error from the inbox
            log.warning("cannot say where %s runs (%s): it says so when it ends", self.to.key, exc)
        return math.inf

    def reply(self, value: dict[str, object]) -> dict[str, object]:
        """The task's reply, with its start in it when it was never said
        (`RayBackend` takes it out before the kind sees the reply)."""
        return value if self.said else {**value, STARTED_KEY: self.where.fields()}


def _write_start(path: str, text: bytes) -> None:
    try:
        fd = os.open(path, _NEW_FILE, 0o644)
    except FileNotFoundError:  # the first task of the run to announce makes the directory
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, _NEW_FILE, 0o644)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


# how a start file is opened: written whole by one task, never inherited by its job
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


class Inbox:
    """The run's mailbox, a Ray actor on the runner's node: tasks post their start here, and
    the runner takes what came (waiting up to a bound for something to come: one call in
    flight per second while idle, none while no task is starting)."""

    def __init__(self) -> None:
        self.box: dict[str, StartedFields] = {}
        self.came = asyncio.Event()

    async def post(self, key: str, where: StartedFields) -> None:
        self.box[key] = where
        self.came.set()

    async def take(self, wait: float) -> dict[str, StartedFields]:
        if not self.box:
            self.came.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.came.wait(), wait)
        box, self.box = self.box, {}
        return box


# where tasks announce their start with a shared filesystem: a directory of the run directory
STARTED_DIR = ".started"
# seconds one `Inbox.take` waits for a start to come
TAKE_WAIT = 1.0
# seconds the runner waits for the inbox once a task has answered (its start is in by then)
TAKE_BOUND = 3.0


class Starts:
    """The runner's side of announced starts: where each task is to announce, and which have.

    With a shared filesystem a start is a file under `<run.dir>/.started/`, read each turn;
    without one (`cluster.shared_fs: false`) it comes back through Ray, from the `Inbox` actor
    made on the runner's node at the first task that needs it. Start files no runner will read
    (an earlier runner's, killed before it read them) are removed as the run begins."""

    def __init__(self, root: Path, shared_fs: bool) -> None:
        self.root, self.shared_fs = root, shared_fs
        _clear_starts(root / STARTED_DIR)
        self.inbox: InboxHandle | None = None
        self.taking: ObjectRef[dict[str, StartedFields]] | None = None
        self.came: dict[str, Started] = {}
        # the start files there at this turn's listing
        self.there: set[str] = set()
        self.prefix, self.count = uuid.uuid4().hex[:16], itertools.count()
        self.folder = str(root / STARTED_DIR)

    def turn(self) -> None:
        """Once per turn of the runner's loop: list the start files that are there (one
        listing, then only those are read: not one failed open per waiting task), or take
        what came to the inbox (one look, not one per waiting task)."""
        if not self.shared_fs:
            self._take(block=False)
            return
        try:
            self.there = set(os.listdir(self.root / STARTED_DIR))
        except OSError:  # no task has announced yet
            self.there = set()

    def address(self) -> StartTo:
        """A new place for one task to announce its start: a key of this runner's own (made
        random once) and a count, unique in the run directory across runner processes."""
        key = f"{self.prefix}-{next(self.count)}"
        if self.shared_fs:
            return StartTo(key, path=f"{self.folder}/{key}.json")
        if self.inbox is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from runner.remote import remote

            here_id = ray.get_runtime_context().get_node_id()
            strategy = NodeAffinitySchedulingStrategy(here_id, soft=False)
            made = remote(Inbox).options(num_cpus=0, scheduling_strategy=strategy)
            self.inbox = cast(InboxHandle, made.remote())  # Ray's handle of an Inbox
        return StartTo(key, inbox=self.inbox)

    def heard(self, to: StartTo, ended: bool = False) -> Started | None:
        """The start announced at `to`, once it has been (`ended`: the task has answered, so
        its start, if it got that far, is in the inbox: wait for it)."""
        if to.path is not None:  # named `<key>.json` (`address`)
            return _read_start(to.path) if ended or f"{to.key}.json" in self.there else None
        found = self.came.pop(to.key, None)
        if found is None and ended:  # its start is in the inbox by now (or never was sent)
            self._take(block=True, wait=0.0)  # the take in flight, or one that looks at once
            found = self.came.pop(to.key, None)
            if found is None:  # the one in flight was sent before the start came
                self._take(block=True, wait=0.0)
                found = self.came.pop(to.key, None)
        return found

    def forget(self, to: StartTo) -> None:
        """A lease that ended before its start was heard: drop what may still come of it."""
        self.came.pop(to.key, None)

    def _take(self, block: bool, wait: float = TAKE_WAIT) -> None:
        import ray

        if self.inbox is None:
            return
        if self.taking is None:
            self.taking = self.inbox.take.remote(wait)
        done, _ = ray.wait([self.taking], timeout=TAKE_BOUND if block else 0)
        if not done:
            return
        ref, self.taking = self.taking, None
        try:
            box = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the inbox died (Ray going down): made anew
            log.warning("the run's inbox of task starts is gone: %s", error_line(exc))
            self.inbox = None
            return
        for key, where in box.items():
            self.came[key] = Started(**where)

    def close(self) -> None:
        """Remove the inbox (Ray must be alive)."""
        if self.inbox is not None:
            import ray
            from ray.actor import ActorHandle

            if isinstance(self.inbox, ActorHandle):  # it is: made by `address`
                ray.kill(self.inbox)
            self.inbox = self.taking = None


def _clear_starts(folder: Path) -> None:
    """Remove the start files in `folder`: each is named by the key of the runner that was to
    read it, and the run directory is this runner's alone now (its lock)."""
    try:
        names = os.listdir(folder)
    except OSError:  # no task of an earlier run announced here
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(folder / name)


def _read_start(path: str) -> Started | None:
    """The start a task announced at `path`, once it has (the file is removed)."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return Started(**data)


def here() -> Started:
    """Where the calling Ray worker runs (call it inside a task or an actor)."""
    import ray

    ctx = ray.get_runtime_context()
    ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    return Started(ctx.get_node_id(), ip, socket.gethostname(), os.getpid(), time.time())
