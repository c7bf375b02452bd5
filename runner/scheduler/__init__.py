"""One scheduler admits every unit of a run: by priority, against what the cluster has."""

from __future__ import annotations

from runner.scheduler.core import Grant, Scheduler, Ticket
from runner.scheduler.request import Request

__all__ = ["Grant", "Request", "Scheduler", "Ticket"]
