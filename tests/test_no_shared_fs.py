"""Nodes that do not share a filesystem (`cluster.shared_fs: false`, the default on an
existing Ray cluster): a task announces its start, and hands a job's logs and a shard's
files back, through Ray, never through the run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runner.lifecycle import UnitState
from runner.store import read_ledger
from tests.conftest import Result

Cli = Callable[..., Result]


def _rows(run_dir: Path) -> list[tuple[UnitState, str | None]]:
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return [(r.state, r.node_id) for r in ledger.rows("work")]
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("shared", "announced_in_run_dir"),
    [pytest.param("false", False, id="through-ray"), pytest.param("true", True, id="shared-fs")],
)
@pytest.mark.parametrize("kind", ["jobs", "shard"])
def test_units_start_and_finish_whether_or_not_the_nodes_share_the_run_directory(
    ray_session: str, cli: Cli, tmp_path: Path, kind: str, shared: str, announced_in_run_dir: bool
) -> None:
    import ray

    res = cli(
        f"pipeline=conform_{kind}",
        f"run.dir={tmp_path}",
        "cluster=ray",
        f"cluster.shared_fs={shared}",
    )
    assert res.code == 0, res.text
    here = ray.get_runtime_context().get_node_id()
    rows = _rows(tmp_path)
    assert rows and all(state is UnitState.done and node == here for state, node in rows)
    # RUNNING was heard through the run's inbox actor, not a file under the run directory
    assert (tmp_path / ".started").exists() is announced_in_run_dir
    if kind == "shard":  # each shard's log reached the run directory, whichever the way
        logs = sorted((tmp_path / "work" / "shards").glob("*.log"))
        assert len(logs) == 4 and all("--- runner: attempt 1" in p.read_text() for p in logs)


def test_job_logs_come_back_through_ray(ray_session: str, cli: Cli, tmp_path: Path) -> None:
    """Two jobs that end at once: their logs, and where they ran (said in their replies, not
    to the inbox), come back with their replies."""
    import ray

    res = cli("pipeline=carry_jobs", f"run.dir={tmp_path}", "cluster=ray")
    assert res.code == 0, res.text
    ledger = read_ledger(tmp_path)
    assert ledger is not None
    try:
        rows = sorted(ledger.rows("work"), key=lambda r: r.unit)
    finally:
        ledger.close()
    here = ray.get_runtime_context().get_node_id()
    assert [(r.unit, r.state, r.node_id) for r in rows] == [
        ("a", UnitState.done, here),
        ("b", UnitState.done, here),
    ]
    assert all(r.worker and r.worker.split(":")[1].isdigit() for r in rows), rows
    outs = sorted(tmp_path.rglob("*.out"))
    assert [p.read_text() for p in outs] == ["out-a\n", "out-b\n"]
    assert [p.read_text() for p in sorted(tmp_path.rglob("*.err"))] == ["err-a\n", "err-b\n"]


def test_the_default_is_a_shared_filesystem_only_for_the_embedded_ray() -> None:
    from runner.schema import ClusterConfig

    assert ClusterConfig(kind="local").shares_fs
    assert not ClusterConfig(kind="ray").shares_fs
    assert ClusterConfig(kind="ray", shared_fs=True).shares_fs
