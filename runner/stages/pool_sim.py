"""A pool stage on the simulated cluster: `num_workers` worker leases (`worker_ask`, as in a
real run) share the stage's items; each worker starts after the measured start-up latency,
then takes items one after another for their time (measured, times the measured worker time
per item time; else `cluster.sim_unit_seconds`). An item that overran its step timeout in
the measured run does so again, and its worker is replaced by a new lease. Workers not started
when the items run out are not started, as in a real pool."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plan import StagePlan
from runner.scheduler.core import Grant, Ticket
from runner.schema import PoolStage
from runner.sim import SimStage, Simulation, StageStats
from runner.stages.pool import worker_ask


@dataclass
class SimPool(SimStage):
    """Worker leases, as many as there are items (at most `num_workers`); items shared."""

    items: list[str | None] = field(default_factory=list)
    live: int = 0
    tickets: list[Ticket] = field(default_factory=list)
    scale: float = 1.0
    started: int = 0

    def start(self) -> None:
        spec = self.stage.spec
        assert isinstance(spec, PoolStage)
        if self.stage.units is not None:
            self.items = [u.id for u in self.stage.to_run]
        else:  # fed by an upstream stage: as many items as it has units (ids unknown yet)
            self.items = [None] * self._upstream_items(spec)
        self.items.reverse()  # taken from the end, in order
        workers = min(spec.num_workers, len(self.items))
        ask = worker_ask(self.stage)
        self.sim.stats[self.stage.name] = StageStats(
            "pool", workers, unit_label="worker", shape=ask.resources
        )
        m = self.sim.measure_of(self.stage.name)
        self.scale = m.scale if m is not None else 1.0
        if not workers:
            self.sim.stage_done(self.stage.name)
            return
        self.live = workers
        self.started = 0
        for _ in range(workers):
            self._ask()

    def _ask(self) -> None:
        self.started += 1
        owner = f"{self.stage.name}/worker-{self.started}"
        self.tickets.append(self.sim.submit(owner, worker_ask(self.stage), self._work))

    def _upstream_items(self, spec: PoolStage) -> int:
        source = spec.items.get("from")
        upstream = self.sim.plan.stages.get(str(source))
        return len(upstream.units or []) if upstream is not None else 0

    def _work(self, grant: Grant) -> None:
        self.granted()
        sim = self.sim
        sim.at(sim.clock.now + sim.latency(self.stage.name), lambda: self._next(grant))

    def _next(self, grant: Grant) -> None:
        sim = self.sim
        if not self.items:
            self._stop_growing()
            self.ended(grant)
            self.live -= 1
            if self.live == 0:
                sim.stage_done(self.stage.name)
            return
        item = self.items.pop()
        now = sim.clock.now
        sim.starts(self.stage.name, item, now)
        m = sim.measure_of(self.stage.name)
        if m is not None and item in m.timed_out:  # overran: its worker is replaced after it
            end = now + sim.duration(self.stage.name, item)
            sim.ran(now, end)
            sim.at(end, lambda: self._replace(grant))
            return
        end = now + sim.duration(self.stage.name, item) * self.scale
        sim.ran(now, end)
        sim.at(end, lambda: self._next(grant))

    def _replace(self, grant: Grant) -> None:
        """A worker that overran a step timeout is killed; a new one is asked for (it queues
        again like any other lease) while items are left."""
        self.ended(grant)
        if self.items:
            self._ask()
            return
        self.live -= 1
        if self.live == 0:
            self.sim.stage_done(self.stage.name)

    def _stop_growing(self) -> None:
        """No items left: workers not started yet are not started (as a real pool does)."""
        for ticket in self.tickets:
            if ticket.grant is None and self.sim.forget(ticket):
                self.live -= 1
        self.tickets = []


def simulate(stage: StagePlan, sim: Simulation) -> SimPool:
    return SimPool(sim, stage)
