"""Small helpers for the scheduler's tests: a clock the test moves, and one request asked."""

from __future__ import annotations

from runner.resources import Resources
from runner.scheduler import Grant, Request, Scheduler, Ticket
from runner.scheduler.core import Notify


class Clock:
    """The scheduler's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ask(
    s: Scheduler,
    owner: str,
    resources: Resources,
    priority: float = 0.0,
    on_preempt: Notify | None = None,
    **fields: object,
) -> Ticket:
    """Queue one request for `owner` (preemptible when `on_preempt` is given)."""
    request = Request(resources, priority, preemptible=on_preempt is not None, **fields)  # type: ignore[arg-type]
    (ticket,) = s.submit(request, [owner], on_preempt)
    return ticket


def admitted(s: Scheduler, ticket: Ticket) -> Grant | None:
    """One admission pass: the ticket's grant, or None (the ticket then withdrawn)."""
    s.admit()
    if ticket.grant is None:
        s.withdraw(ticket)
    return ticket.grant
