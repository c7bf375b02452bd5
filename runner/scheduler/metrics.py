"""Scheduler metrics, and a Prometheus text endpoint on 127.0.0.1 (standard library only).

Counters: preemptions by pool and reason; summaries (count and sum, which is what a Prometheus
`rate(sum)/rate(count)` needs) of preemption latency and scheduling latency; gauges of units
by stage and state. `cluster.metrics_port` turns the endpoint on for the length of a run.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class Metrics:
    """Thread-safe counters the scheduler and the stages update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.preemptions: Counter[tuple[str, str]] = Counter()
        self.preempt_latency = [0, 0.0]
        self.schedule_latency = [0, 0.0]
        self.waited_by_priority: dict[float, list[float]] = {}
        self.units: dict[str, dict[str, int]] = {}

    def preempted(self, pool: str, reason: str) -> None:
        with self._lock:
            self.preemptions[(pool, reason)] += 1

    def preempt_done(self, seconds: float) -> None:
        """A victim gave its resources back `seconds` after it was chosen."""
        with self._lock:
            self.preempt_latency[0] += 1
            self.preempt_latency[1] += seconds

    def admitted(self, priority: float, waited: float) -> None:
        with self._lock:
            self.schedule_latency[0] += 1
            self.schedule_latency[1] += waited
            entry = self.waited_by_priority.setdefault(priority, [0, 0.0])
            entry[0] += 1
            entry[1] += waited

    def set_units(self, stage: str, by_state: Mapping[str, int]) -> None:
        with self._lock:
            self.units[stage] = dict(by_state)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lines = [
                "# HELP runner_preemptions_total Units preempted, by victim pool and reason.",
                "# TYPE runner_preemptions_total counter",
            ]
            for (pool, reason), n in sorted(self.preemptions.items()):
                lines.append(
                    f'runner_preemptions_total{{pool="{_esc(pool)}",reason="{reason}"}} {n}'
                )
            lines += _summary(
                "runner_preemption_latency_seconds",
                "From choosing a victim to its resources coming back.",
                self.preempt_latency,
            )
            lines += _summary(
                "runner_scheduling_latency_seconds",
                "From asking the scheduler to being admitted.",
                self.schedule_latency,
            )
            lines += [
                "# HELP runner_units Units by stage and state.",
                "# TYPE runner_units gauge",
            ]
            for stage, states in sorted(self.units.items()):
                for state, n in sorted(states.items()):
                    lines.append(f'runner_units{{stage="{_esc(stage)}",state="{state}"}} {n}')
        return "\n".join(lines) + "\n"


def _summary(name: str, help_text: str, data: list[float]) -> list[str]:
    return [
        f"# HELP {name} {help_text}",
        f"# TYPE {name} summary",
        f"{name}_count {int(data[0])}",
        f"{name}_sum {data[1]:.6f}",
    ]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# the process's metrics, as Prometheus client libraries keep a default registry
REGISTRY = Metrics()


def serve(metrics: Metrics, port: int) -> ThreadingHTTPServer:
    """Serve `metrics` at http://127.0.0.1:PORT/metrics on a daemon thread (port 0: any)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") not in ("", "/metrics"):
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes are not worth a log line each

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


@contextmanager
def serving(port: int | None, metrics: Metrics = REGISTRY) -> Iterator[int | None]:
    """The endpoint for the length of a block when `port` is set; yields the bound port."""
    if port is None:
        yield None
        return
    server = serve(metrics, port)
    bound = int(server.server_address[1])
    log.info("metrics: http://127.0.0.1:%d/metrics", bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
