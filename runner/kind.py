"""What every stage kind provides, and what it is given to run: the seam between kinds and core."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.cluster import ClusterInfo
from runner.plan import StagePlan, StagePlanner
from runner.progress import Progress
from runner.scheduler import Scheduler
from runner.schema import StageSpec
from runner.spec import KindCheck
from runner.store import Ledger, RunStore

if TYPE_CHECKING:
    from runner.executor import Executor, StageRun
    from runner.sim import SimStage, Simulation


@dataclass
class RunContext:
    """A run's shared services, handed to each stage as it runs."""

    store: RunStore
    ledger: Ledger
    scheduler: Scheduler
    cluster: ClusterInfo
    # set on SIGINT/SIGTERM: admit nothing new, cancel what runs, return promptly
    stop: threading.Event
    progress: Progress

    def stage_dir(self, stage: str) -> Path:
        return self.store.stage_dir(stage)


@dataclass
class StageOutcome:
    """How a stage ended, for the summary and the exit code."""

    name: str
    kind: str
    total: int = 0
    done: int = 0
    failed: int = 0
    timeout: int = 0
    cancelled: int = 0
    skipped: int = 0
    wall: float = 0.0
    # CPU seconds the stage's processes used (for utilization)
    cpu_seconds: float = 0.0
    ok: bool = True
    interrupted: bool = False
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # mean seconds from a lease's grant to its process's start (Ray starting it)
    start_latency: float | None = None
    # ... and each attempt's, by unit, for units with a lease of their own (the first 10,000)
    start_latencies: dict[str, list[float]] = field(default_factory=dict)


# how a kind starts running one stage: (plan, context, executor) -> its StageRun
StageOpener = Callable[[StagePlan, RunContext, "Executor"], "StageRun"]
# how a kind runs one stage on the simulated cluster (`cluster=sim`), in virtual time: its asks,
# its units' durations, what a preempted unit does
StageSimulator = Callable[[StagePlan, "Simulation"], "SimStage"]


@dataclass(frozen=True)
class StageKind:
    """A stage kind: its schema, its own spec checks, how it plans, how it runs, and how it
    runs on the simulated cluster."""

    spec_type: type[StageSpec]
    check: KindCheck
    plan: StagePlanner
    open: StageOpener
    simulate: StageSimulator
