"""Scheduler metrics with prometheus_client, served on 127.0.0.1 during a run.

`runner_preemptions_total{pool,reason}` (reasons `label`, `same_pool`, `cross_pool`),
`runner_preemption_latency_seconds` and `runner_scheduling_latency_seconds` (histograms),
`runner_units{stage,state}`, `runner_resources_granted{resource}` and
`runner_resources_capacity{resource}` (CPU, GPU, memory in bytes). `cluster.metrics_port`
turns the endpoint on for the length of a run.

Beside them, ScheduleMesh's own metrics under its names and labels, so a ScheduleMesh Grafana
board works unchanged: `schedulemesh_preemption_count{pool,reason}` (a counter, exposed as Ray
exposes counters: `..._total`, and the plain name as a gauge),
`schedulemesh_preemption_execution_latency_ms{pool,reason}`,
`schedulemesh_task_schedule_latency_ms` and `schedulemesh_preemption_evaluation_latency_ms`
(histograms, in milliseconds).

`Metrics.export_to_ray()` mirrors the same names through `ray.util.metrics`: where Ray's
metrics export runs (`ray[default]`: each node's metrics agent), Ray serves them with its own
prefix, as `ray_runner_preemptions_total`, `ray_runner_units` and so on, beside Ray's metrics
(Ray's dashboard and Grafana read them there). Without the agent the mirror costs a little and
goes nowhere.

Each Metrics object has its own CollectorRegistry, so tests and the simulator can make as
many as they like. The plain counters beside the collectors (`preemptions`, latency counts,
`waited_by_priority`) are what the simulator's and the roles stage's summaries read.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import prometheus_client as prom

from runner.resources import Resources

log = logging.getLogger(__name__)

# seconds: from a scheduling pass (milliseconds) to a long wait behind a training run (hours)
LATENCY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200)
# the same in milliseconds, for ScheduleMesh's `*_latency_ms` histograms
MS_BUCKETS = tuple(1000 * b for b in LATENCY_BUCKETS)
# a preemption decision: from well under a millisecond to a long victim search
EVALUATION_MS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50, 100, 500, 1000)
SCHEDULEMESH_COUNT = "schedulemesh_preemption_count"


class _CountLikeRay:
    """`schedulemesh_preemption_count` as Ray's metrics agent exposes a counter: as a counter
    (`..._total`) and, for dashboards made before Ray 2.10, under its plain name as a gauge."""

    def __init__(self, counts: Counter[tuple[str, str]], lock: threading.Lock) -> None:
        self.counts, self.lock = counts, lock

    def describe(self) -> list[prom.Metric]:
        return []  # two families share the name: not checked for duplicates by the registry

    def collect(self) -> Iterator[prom.Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        help_ = "Preemptions, by victim pool and reason (ScheduleMesh's name)."
        counter = CounterMetricFamily(SCHEDULEMESH_COUNT, help_, labels=["pool", "reason"])
        gauge = GaugeMetricFamily(SCHEDULEMESH_COUNT, help_, labels=["pool", "reason"])
        with self.lock:
            counts = dict(self.counts)
        for (pool, reason), n in sorted(counts.items()):
            counter.add_metric([pool, reason], n)
            gauge.add_metric([pool, reason], n)
        yield counter
        yield gauge


class Metrics:
    """Thread-safe metrics the scheduler and the stages update."""

    def __init__(self, collectors: bool = True) -> None:
        """`collectors=False`: the plain counters only (the simulator: nothing is served, and a
        histogram observation per admission would cost more than the admission)."""
        self._lock = threading.Lock()
        self.collectors = collectors
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.preemptions: Counter[tuple[str, str]] = Counter()
        self.preempt_latency = [0, 0.0]
        # [admissions, seconds waited in all] by priority (`schedule_latency` sums them)
        self.waited_by_priority: dict[float, list[float]] = {}
        self.units: dict[str, dict[str, int]] = {}
        self._preemptions = prom.Counter(
            "runner_preemptions",
            "Units preempted, by victim pool and reason.",
            ["pool", "reason"],
            registry=self.registry,
        )
        self._preempt_latency = prom.Histogram(
            "runner_preemption_latency_seconds",
            "From choosing a victim to its resources coming back.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._schedule_latency = prom.Histogram(
            "runner_scheduling_latency_seconds",
            "From asking the scheduler to being admitted.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._units = prom.Gauge(
            "runner_units", "Units by stage and state.", ["stage", "state"], registry=self.registry
        )
        self._granted = prom.Gauge(
            "runner_resources_granted",
            "Resources the scheduler has granted (memory in bytes).",
            ["resource"],
            registry=self.registry,
        )
        self._capacity = prom.Gauge(
            "runner_resources_capacity",
            "Resources of the cluster the scheduler places on (memory in bytes).",
            ["resource"],
            registry=self.registry,
        )
        # ScheduleMesh's names, beside ours
        self.registry.register(_CountLikeRay(self.preemptions, self._lock))
        self._sm_execution = prom.Histogram(
            "schedulemesh_preemption_execution_latency_ms",
            "From choosing a victim to its resources coming back, in ms (ScheduleMesh's name).",
            ["pool", "reason"],
            buckets=MS_BUCKETS,
            registry=self.registry,
        )
        self._sm_schedule = prom.Histogram(
            "schedulemesh_task_schedule_latency_ms",
            "From asking the scheduler to being admitted, in ms (ScheduleMesh's name).",
            buckets=MS_BUCKETS,
            registry=self.registry,
        )
        self._sm_evaluation = prom.Histogram(
            "schedulemesh_preemption_evaluation_latency_ms",
            "Time to decide a preemption (choose victims or find none), in ms "
            "(ScheduleMesh's name).",
            buckets=EVALUATION_MS_BUCKETS,
            registry=self.registry,
        )

        # the same metrics through ray.util.metrics, once `export_to_ray` is called
        self.ray: RayMirror | None = None

    def export_to_ray(self) -> None:
        """Mirror every metric through `ray.util.metrics` (Ray must be initialized)."""
        self.ray = RayMirror()

    def preempted(self, pool: str, reason: str) -> None:
        with self._lock:
            self.preemptions[(pool, reason)] += 1
        if not self.collectors:
            return
        self._preemptions.labels(pool=pool, reason=reason).inc()
        if self.ray is not None:
            self.ray.preemptions.inc(1, tags={"pool": pool, "reason": reason})
            self.ray.sm_preemptions.inc(1, tags={"pool": pool, "reason": reason})

    def preempt_done(self, seconds: float, pool: str = "", reason: str = "") -> None:
        """A victim of `pool` preempted for `reason` gave its resources back `seconds` after
        it was chosen."""
        with self._lock:
            self.preempt_latency[0] += 1
            self.preempt_latency[1] += seconds
        if not self.collectors:
            return
        self._preempt_latency.observe(seconds)
        self._sm_execution.labels(pool=pool, reason=reason).observe(1000 * seconds)
        if self.ray is not None:
            self.ray.preempt_latency.observe(seconds)
            self.ray.sm_execution.observe(1000 * seconds, tags={"pool": pool, "reason": reason})

    def preempt_evaluated(self, seconds: float) -> None:
        """A preemption was decided (victims chosen, or none would do) in `seconds`."""
        if not self.collectors:
            return
        self._sm_evaluation.observe(1000 * seconds)
        if self.ray is not None:
            self.ray.sm_evaluation.observe(1000 * seconds)

    @property
    def schedule_latency(self) -> list[float]:
        """[admissions, seconds waited in all]: summed when asked, not on every admission."""
        with self._lock:
            entries = list(self.waited_by_priority.values())
        return [sum(e[0] for e in entries), sum(e[1] for e in entries)]

    def admitted(self, priority: float, waited: float) -> None:
        """One admission (on the scheduler's hot path: counted per priority only)."""
        with self._lock:
            entry = self.waited_by_priority.get(priority)
            if entry is None:
                entry = self.waited_by_priority[priority] = [0, 0.0]
            entry[0] += 1
            entry[1] += waited
        if not self.collectors:
            return
        self._observe_wait(waited)

    def admitted_many(self, priority: float, waits: list[float]) -> None:
        """Admissions at one priority, each with its wait, as one call: the scheduler tells them
        once a pass, not once a decision. Added one by one, in order, so the totals are the
        ones `admitted` gives."""
        with self._lock:
            entry = self.waited_by_priority.get(priority)
            if entry is None:
                entry = self.waited_by_priority[priority] = [0, 0.0]
            entry[0] += len(waits)
            total = entry[1]
            for waited in waits:
                total += waited
            entry[1] = total
        if not self.collectors:
            return
        for waited in waits:
            self._observe_wait(waited)

    def _observe_wait(self, waited: float) -> None:
        self._schedule_latency.observe(waited)
        self._sm_schedule.observe(1000 * waited)
        if self.ray is not None:
            self.ray.schedule_latency.observe(waited)
            self.ray.sm_schedule.observe(1000 * waited)

    def set_units(self, stage: str, by_state: Mapping[str, int]) -> None:
        """How many units of `stage` are in each state now (states not named drop to 0)."""
        with self._lock:
            before = self.units.get(stage, {})
            self.units[stage] = dict(by_state)
            for state in before.keys() - by_state.keys():
                self._units.labels(stage=stage, state=state).set(0)
            for state, n in by_state.items():
                self._units.labels(stage=stage, state=state).set(n)
                if self.ray is not None:
                    self.ray.units.set(n, tags={"stage": stage, "state": state})

    def set_resources(self, granted: Resources, capacity: Resources) -> None:
        """What the scheduler has granted now, and what it places on."""
        for gauge, res in ((self._granted, granted), (self._capacity, capacity)):
            gauge.labels(resource="CPU").set(res.cpus)
            gauge.labels(resource="GPU").set(res.gpus)
            gauge.labels(resource="memory").set(res.memory)
        if self.ray is not None:
            for ray_gauge, res in ((self.ray.granted, granted), (self.ray.capacity, capacity)):
                for name, value in (("CPU", res.cpus), ("GPU", res.gpus), ("memory", res.memory)):
                    ray_gauge.set(value, tags={"resource": name})

    def render(self) -> str:
        """The Prometheus text exposition format."""
        return prom.generate_latest(self.registry).decode()


class RayMirror:
    """The same metrics as `ray.util.metrics` objects (Ray adds its `ray_` prefix on export)."""

    def __init__(self) -> None:
        from ray.util import metrics as rm

        self.preemptions = rm.Counter(
            "runner_preemptions", "Units preempted, by victim pool and reason.", ("pool", "reason")
        )
        self.preempt_latency = rm.Histogram(
            "runner_preemption_latency_seconds",
            "From choosing a victim to its resources coming back.",
            list(LATENCY_BUCKETS),
        )
        self.schedule_latency = rm.Histogram(
            "runner_scheduling_latency_seconds",
            "From asking the scheduler to being admitted.",
            list(LATENCY_BUCKETS),
        )
        self.units = rm.Gauge("runner_units", "Units by stage and state.", ("stage", "state"))
        self.granted = rm.Gauge(
            "runner_resources_granted", "Resources granted (memory in bytes).", ("resource",)
        )
        self.capacity = rm.Gauge(
            "runner_resources_capacity",
            "Resources of the cluster (memory in bytes).",
            ("resource",),
        )
        # ScheduleMesh's own, as it emits them (through Ray's metrics)
        self.sm_preemptions = rm.Counter(
            SCHEDULEMESH_COUNT, "Preemptions, by victim pool and reason.", ("pool", "reason")
        )
        self.sm_execution = rm.Histogram(
            "schedulemesh_preemption_execution_latency_ms",
            "From choosing a victim to its resources coming back, in ms.",
            list(MS_BUCKETS),
            ("pool", "reason"),
        )
        self.sm_schedule = rm.Histogram(
            "schedulemesh_task_schedule_latency_ms",
            "From asking the scheduler to being admitted, in ms.",
            list(MS_BUCKETS),
        )
        self.sm_evaluation = rm.Histogram(
            "schedulemesh_preemption_evaluation_latency_ms",
            "Time to decide a preemption, in ms.",
            list(EVALUATION_MS_BUCKETS),
        )


# the run's metrics, as Prometheus client libraries keep a default registry
REGISTRY = Metrics()


@contextmanager
def serving(port: int | None, metrics: Metrics = REGISTRY) -> Iterator[int | None]:
    """Serve `metrics` at http://127.0.0.1:PORT/metrics for the length of a block when `port`
    is set (0: any free port); yields the bound port."""
    if port is None:
        yield None
        return
    server, thread = prom.start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    bound = int(server.server_address[1])
    log.info("metrics: http://127.0.0.1:%d/metrics", bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
