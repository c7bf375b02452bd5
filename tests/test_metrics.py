"""The scheduler's metrics are served for Prometheus on 127.0.0.1 under fixed names."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner.resources import Resources
from runner.scheduler.metrics import Metrics, serving

NAMES = (
    "runner_preemptions_total",
    "runner_preemption_latency_seconds",
    "runner_scheduling_latency_seconds",
    "runner_units",
    "runner_resources_granted",
    "runner_resources_capacity",
)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_are_served_in_prometheus_text_on_localhost_under_their_names() -> None:
    metrics = Metrics()
    metrics.preempted("rlhf", "label")
    metrics.preempt_done(0.2)
    metrics.admitted(10.0, 0.5)
    metrics.set_units("rlhf", {"running": 2, "pending": 1})
    metrics.set_units("rlhf", {"running": 3})
    metrics.set_resources(Resources(cpus=1.5, gpus=1), Resources(cpus=8, gpus=2, memory=2**30))
    with serving(0, metrics) as port:
        assert port
        text = scrape(port)
    for name in NAMES:
        assert f"# TYPE {name} " in text
    assert 'runner_preemptions_total{pool="rlhf",reason="label"} 1.0' in text
    assert "# TYPE runner_preemption_latency_seconds histogram" in text
    assert 'runner_preemption_latency_seconds_bucket{le="0.5"} 1.0' in text
    assert "runner_scheduling_latency_seconds_count 1.0" in text
    assert 'runner_units{stage="rlhf",state="running"} 3.0' in text
    assert 'runner_units{stage="rlhf",state="pending"} 0.0' in text
    assert 'runner_resources_granted{resource="CPU"} 1.5' in text
    assert 'runner_resources_capacity{resource="memory"} 1.073741824e+09' in text


def test_two_metrics_objects_keep_their_own_counts() -> None:
    a, b = Metrics(), Metrics()
    a.preempted("p", "same_pool")
    assert 'reason="same_pool"} 1.0' in a.render()
    assert 'reason="same_pool"' not in b.render()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.usefixtures("ray_session")
def test_metrics_are_served_during_a_run_and_gone_after(cli, tmp_path: Path) -> None:
    port, seen, done = free_port(), [], threading.Event()

    def poll() -> None:
        while not done.is_set() and not seen:
            try:
                seen.append(scrape(port))
            except (urllib.error.URLError, ConnectionError):
                done.wait(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        res = cli(
            "pipeline=jobs_sleep",
            f"run.dir={tmp_path}",
            f"pipeline.stages.work.cwd={tmp_path}",
            f"cluster.metrics_port={port}",
        )
    finally:
        done.set()
        poller.join()
    assert res.code == 0, res.text
    assert seen, "the endpoint never answered during the run"
    for name in NAMES:
        assert f"# TYPE {name} " in seen[0]
    assert 'runner_resources_capacity{resource="CPU"} 2.0' in seen[0]
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_the_same_metrics_go_through_ray_util_metrics_too(ray_session: str) -> None:
    """Where Ray's metrics agent runs (`ray[default]`), Ray exports these as `ray_runner_*`;
    here (no agent) the mirror must still take every update."""
    from ray.util import metrics as rm

    from runner.resources import Resources
    from runner.scheduler.metrics import Metrics

    m = Metrics()
    m.export_to_ray()
    assert m.ray is not None
    assert isinstance(m.ray.preemptions, rm.Counter) and isinstance(m.ray.units, rm.Gauge)
    assert m.ray.preempt_latency.info["name"] == "runner_preemption_latency_seconds"
    m.preempted("rlhf", "label")
    m.preempt_done(0.2)
    m.admitted(10.0, 0.5)
    m.set_units("work", {"running": 2, "done": 3})
    m.set_resources(Resources(cpus=1), Resources(cpus=2, gpus=4))
    assert "runner_preemptions_total" in m.render()  # the local endpoint is unchanged


def test_admissions_told_at_once_count_as_told_one_by_one() -> None:
    """The scheduler tells a pass's admissions in one call per priority (`admitted_many`):
    the counters, the totals (added in the same order) and the histogram are the same."""
    waits = [0.1, 0.7, 2.5, 0.3]
    one, many = Metrics(), Metrics()
    for w in waits:
        one.admitted(5.0, w)
    many.admitted_many(5.0, waits[:1])
    many.admitted_many(5.0, waits[1:])
    assert many.waited_by_priority == one.waited_by_priority
    assert many.schedule_latency == one.schedule_latency == [4, sum(waits)]
    assert "runner_scheduling_latency_seconds_count 4.0" in many.render()
    assert _latency_lines(many) == _latency_lines(one)


def _latency_lines(metrics: Metrics) -> list[str]:
    """The scheduling-latency histogram's buckets, count and sum (not its creation time)."""
    lines = metrics.render().splitlines()
    return [
        s
        for s in lines
        if s.startswith("runner_scheduling_latency_seconds_") and "_created" not in s
    ]
