"""A real multi-node Ray in one machine (Ray's own `ray.cluster_utils.Cluster`: a 2-CPU head,
a 1-CPU worker node with two logical GPUs, a 1-CPU worker node; the worker nodes are in
partitions by their Ray node labels): the scheduler's grants are
Ray's placements, so every unit's record names the node it really ran on."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.lifecycle import UnitState
from runner.store import read_ledger
from tests.conftest import Result, left_on_the_node, run_runner, runner_process, wait_until


class ThreeNodes:
    """The cluster and the ids of its nodes."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={"num_cpus": 2, "num_gpus": 0, "object_store_memory": 80 << 20},
        )
        # partitions are Ray node labels: `gpu` on the GPU node; `gpu` and `debug` on the
        # small one (one `runner.partition/NAME` label each); none on the head
        self.gpu_node = self.cluster.add_node(
            num_cpus=1,
            num_gpus=2,
            object_store_memory=80 << 20,
            labels={"runner.partition": "gpu"},
        )
        self.small_node = self.cluster.add_node(
            num_cpus=1,
            object_store_memory=80 << 20,
            labels={"runner.partition/gpu": "", "runner.partition/debug": ""},
        )
        self.cluster.wait_for_nodes()
        self.head = self.cluster.head_node.node_id

    @property
    def ids(self) -> set[str]:
        return {self.head, self.gpu_node.node_id, self.small_node.node_id}

    def run(self, *args: str, scratch: Path | None = None) -> Result:
        return run_runner("cluster=ray", *args, env=self.env(scratch))

    def env(self, scratch: Path | None = None) -> dict[str, str]:
        env = {"RAY_ADDRESS": self.cluster.address}
        if scratch is not None:
            env["RUNNER_TEST_SCRATCH"] = str(scratch)
        return env


@pytest.fixture(scope="module")
def nodes() -> Iterator[ThreeNodes]:
    three = ThreeNodes()
    try:
        yield three
    finally:
        three.cluster.shutdown()


def rows(run_dir: Path, stage: str) -> dict[str, object]:
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return {r.unit: r for r in ledger.rows(stage)}
    finally:
        ledger.close()


def test_every_kind_runs_and_records_the_node_it_really_ran_on(
    nodes: ThreeNodes, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = nodes.run("pipeline=multinode", f"run.dir={tmp_path / 'run'}", scratch=scratch)
    assert result.code == 0, result.text
    run = tmp_path / "run"

    items = rows(run, "items")
    assert len(items) == 16
    for row in items.values():
        # the worker returned the node it ran on: the ledger names the same one
        assert row.state is UnitState.done and row.result == row.node_id, row
        assert row.node_id in nodes.ids and row.node_ip

    (big,) = rows(run, "big").values()
    assert big.node_id == nodes.head  # the only node with 2 CPUs
    really_started = float((scratch / "big.started").read_text())
    assert abs(big.started - really_started) < 1.0

    merged = pd.read_parquet(run / "gpu" / "merged.parquet")
    for row in rows(run, "gpu").values():
        assert row.node_id == nodes.gpu_node.node_id  # the only node with GPUs
        assert set(merged.loc[merged["node"] == row.node_id, "node"]) == {row.node_id}
    assert set(merged["node"]) == {nodes.gpu_node.node_id}

    (solo,) = rows(run, "roles").values()
    assert solo.state is UnitState.done and solo.node_id in nodes.ids


def test_a_jobs_partition_places_it_only_on_nodes_labelled_with_it(
    nodes: ThreeNodes, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    jobs = [
        *({"name": f"debug{i}", "partition": "debug", "script": "sleep 0.3"} for i in range(3)),
        *({"name": f"gpu{i}", "partition": "gpu", "script": "sleep 0.3"} for i in range(4)),
        {"name": "anywhere", "script": "true"},
    ]
    file = tmp_path / "jobs.json"
    file.write_text(json.dumps(jobs))
    args = (
        "pipeline=jobs_file",
        f"pipeline.stages.work.jobs_file={file}",
        f"pipeline.stages.work.cwd={scratch}",
    )
    result = nodes.run(*args, f"run.dir={tmp_path / 'run'}")
    assert result.code == 0, result.text
    ran = {unit: row.node_id for unit, row in rows(tmp_path / "run", "work").items()}
    assert {ran[f"debug{i}"] for i in range(3)} == {nodes.small_node.node_id}
    assert {ran[f"gpu{i}"] for i in range(4)} <= {nodes.gpu_node.node_id, nodes.small_node.node_id}
    assert ran["anywhere"] in nodes.ids

    jobs.append({"name": "lost", "partition": "bigmem", "script": "true"})
    file.write_text(json.dumps(jobs))
    wrong = nodes.run(*args, f"run.dir={tmp_path / 'wrong'}")
    assert wrong.code == 2, wrong.text
    assert (
        "pipeline.stages.work: job 'lost': partition = 'bigmem': no node of the cluster has it "
        "(partitions: debug, gpu)" in wrong.err
    )


def test_a_unit_larger_than_every_node_is_a_plan_error_even_when_the_total_fits(
    nodes: ThreeNodes, tmp_path: Path
) -> None:
    result = nodes.run(
        "pipeline=node_loss", f"run.dir={tmp_path}", "pipeline.stages.work.cpus_per_task=3"
    )
    assert result.code == 2, result.text
    assert "needs 3 CPU, more than any node has: 3 CPUs wanted, 2 available" in result.err


def test_a_node_that_leaves_mid_run_has_its_units_requeued_and_the_run_finishes(
    nodes: ThreeNodes, tmp_path: Path
) -> None:
    began = time.time()
    doomed = nodes.cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    nodes.cluster.wait_for_nodes()
    proc = runner_process(
        "cluster=ray", "pipeline=node_loss", f"run.dir={tmp_path}", env=nodes.env()
    )
    try:

        def running_on_doomed() -> bool:
            if not (tmp_path / "ledger.sqlite").exists():
                return False
            try:
                found = rows(tmp_path, "work").values()
            except sqlite3.OperationalError:  # the runner is still creating the ledger
                return False
            return any(r.state is UnitState.running and r.node_id == doomed.node_id for r in found)

        wait_until(running_on_doomed, timeout=60, what="a job running on the doomed node")
        lost = next(u for u, r in rows(tmp_path, "work").items() if r.node_id == doomed.node_id)
        nodes.cluster.remove_node(doomed)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    final = rows(tmp_path, "work")
    assert {r.state for r in final.values()} == {UnitState.done}
    assert final[lost].node_id != doomed.node_id  # ran again on a node still there
    assert "left the cluster" in err
    # what its job wrote on the node that left (no shared filesystem) is not left behind
    assert not left_on_the_node(lost, began)
    time.sleep(0)  # keep the node list in the module cluster as it was for later tests


def test_a_sweep_survives_a_node_that_leaves_each_job_requeues_its_own_units(
    nodes: ThreeNodes, tmp_path: Path
) -> None:
    """Two jobs of a sweep side by side on the cluster; a node that ran units of both leaves:
    each job (each its own loop over the one shared scheduler) requeues its own units, and
    both finish."""
    doomed = nodes.cluster.add_node(num_cpus=2, object_store_memory=80 << 20)
    nodes.cluster.wait_for_nodes()
    proc = runner_process(
        "-m",
        "cluster=ray",
        "pipeline=node_loss",
        "pipeline.stages.work.retries=0,1",
        f"hydra.sweep.dir={tmp_path}",
        env=nodes.env(),
    )

    def jobs() -> list[Path]:
        return sorted(tmp_path.glob("*retries=*"))

    def on_doomed(job: Path) -> bool:
        try:
            found = rows(job, "work").values()
        except (sqlite3.OperationalError, AssertionError):  # being created
            return False
        return any(r.state is UnitState.running and r.node_id == doomed.node_id for r in found)

    try:
        wait_until(
            lambda: len(jobs()) == 2 and any(on_doomed(j) for j in jobs()),
            timeout=90,
            what="a job's unit running on the doomed node",
        )
        nodes.cluster.remove_node(doomed)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    for job in jobs():
        final = rows(job, "work")
        assert {r.state for r in final.values()} == {UnitState.done}, job
        assert all(r.node_id != doomed.node_id for r in final.values())
    assert "left the cluster" in err
