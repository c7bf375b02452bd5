"""Starting and reaching Ray: cluster=local is always a Ray of its own, cluster=ray gives up
on an unreachable address after `cluster.connect_timeout`, and an optional part of Ray that
is missing is named with the extra that brings it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from runner import cluster as clusters
from runner.schema import ClusterConfig
from tests.conftest import run_runner


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_cluster_gives_up_after_connect_timeout(tmp_path: Path) -> None:
    port = closed_port()
    res = run_runner(
        "pipeline=numbers",
        "cluster=ray",
        f"cluster.address=127.0.0.1:{port}",
        "cluster.connect_timeout=1",
        f"run.dir={tmp_path}",
        env={"RAY_ADDRESS": ""},
    )
    assert res.code == 2, res.text
    assert (
        f"runner: error: could not reach Ray at '127.0.0.1:{port}' within 1 s "
        "(cluster.connect_timeout): Connection refused\n" in res.err
    )
    assert "Traceback" not in res.err


def _missing(monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    from ray._private import utils

    monkeypatch.setattr(utils, check, lambda: ImportError("No module named 'grpc'"))


def test_a_ray_client_address_without_the_client_extra_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _missing(monkeypatch, "get_ray_client_dependency_error")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = ClusterConfig(kind="ray", address="ray://head:10001")
    with pytest.raises(clusters.ClusterError) as err:
        clusters._init_remote(cfg)
    assert str(err.value) == (
        "a ray:// address (ray://head:10001) needs Ray's optional packages (No module named "
        "'grpc'): pip install 'ray-stage-runner[client]'"
    )


def test_the_dashboard_without_its_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch, "get_dashboard_dependency_error")
    cfg = ClusterConfig(kind="local", dashboard=True, num_cpus=1)
    with pytest.raises(clusters.ClusterError) as err:
        clusters._init_local(cfg, clusters.describe_local(cfg))
    assert str(err.value).endswith("pip install 'ray-stage-runner[dashboard]'")
    assert str(err.value).startswith("the Ray dashboard (cluster.dashboard=true) needs")


def test_cluster_local_starts_its_own_ray_whatever_ray_address_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's `address="local"` ignores RAY_ADDRESS; the embedded start is asked for exactly
    that (a real second Ray is started by .ci/run's demo run with RAY_ADDRESS set)."""
    import ray

    asked: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        asked.update(kwargs)
        raise RuntimeError("not started in this test")

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(ray, "init", init)
    cfg = ClusterConfig(kind="local", num_cpus=1)
    with pytest.raises(clusters.ClusterError, match="could not start a local Ray"):
        clusters._init_local(cfg, clusters.describe_local(cfg))
    assert asked["address"] == "local"
    assert asked["include_dashboard"] is False
    assert asked["logging_level"] == 40  # ERROR: Ray's start-up warnings hidden by default
