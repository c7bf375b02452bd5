"""Remote work as values: what a kind wants started on a lease (`Remote`) and asked of it
(`Call`), and how each ends in virtual time (`Expect`).

A kind never calls Ray: it describes the actor or task to start and the calls to make, and the
loop hands them to a backend. The Ray backend does them for real; the virtual backend
(`cluster=sim`) answers each after the time the kind expects, with the reply the kind expects,
so the same kind code runs in both.

They are slotted dataclasses, not frozen ones, as are the backend's events (`backend.py`):
one is made per launch, call and reply, a frozen dataclass's `__init__` costs three times a
plain one's (`object.__setattr__` per field), and none is changed once made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Expect:
    """How a call ends in virtual time: after `seconds`, answering `reply`. Asked to stop,
    a call that works in steps (`step` seconds each) ends at its next step, or at once when
    it `drops_step`, answering `stopped(seconds it ran)`; one without steps ends at once,
    cancelled."""

    seconds: float
    reply: object = None
    step: float | None = None
    stopped: Callable[[float], object] | None = None
    drops_step: bool = False


# made only when a virtual backend asks (a real run never pays for it)
Expectation = Callable[[], Expect]


class _NewGroup:
    """`Remote.group` for work that gets a placement group of its own, made on its node."""

    def __repr__(self) -> str:
        return "NEW_GROUP"


NEW_GROUP = _NewGroup()


@dataclass(slots=True)
class Remote:
    """Work to start on a lease's placement: an actor of class `target` built with `args`
    (`actor`), or a task, the function `target` called with `args`; with `target` None, only
    a placement group (a reserved group). `group`: `NEW_GROUP`, a group the backend made for
    another lease of the kind, or None (the node alone). A task that `announce`s its start is
    handed where to (`started_to=`); an actor answers `ready()`."""

    target: object
    args: tuple[object, ...] = ()
    actor: bool = False
    # more Ray options (a name, max_concurrency, ...): never resources or placement
    options: Mapping[str, object] = field(default_factory=dict)
    group: object = None
    announce: bool = False
    # a task's end in virtual time
    expect: Expectation | None = None


@dataclass(slots=True)
class Call:
    """A method call on a lease's actor; its reply comes back to the kind with `tag`. A call
    that `interrupts` asks the actor's running call to stop (a replica's `cancel()`): in
    virtual time that call then ends at its next step."""

    method: str
    args: tuple[object, ...] = ()
    tag: object = None
    expect: Expectation | None = None
    interrupts: bool = False
