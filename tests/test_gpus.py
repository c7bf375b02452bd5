"""GPU inventory, eligibility and grouping through a table-driven fake of NVML, and what a user
of a GPU spec sees at plan time on machines with and without GPUs."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runner import gpus
from runner.resources import Resources
from runner.stages.shard.slots import GpuSlots
from tests.conftest import ROOT, TEST_SPECS, Result, run_runner
from tests.fake_nvml import h100s, install

# a switch pairs 0 with 2 and 1 with 3 (NVML level 20); other pairs meet at the host bridge
CROSSED = {(0, 2): 20, (1, 3): 20, (0, 1): 40, (0, 3): 40, (1, 2): 40, (2, 3): 40}


def plan_with_gpus(tmp_path: Path, table: dict[str, Any], *args: str) -> Result:
    """`runner ... mode=plan cluster=local` on a machine whose NVML reports `table`."""
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(table))
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "tests.fake_nvml", str(path), "--config-dir", str(TEST_SPECS)),
            *("cluster=local", "mode=plan", f"run.dir={tmp_path / 'run'}", *args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_inventory_lists_gpus_in_pci_bus_order(monkeypatch: pytest.MonkeyPatch) -> None:
    table = h100s(70, 60, 50)
    for device, bus in zip(table, ["0000:C1:00.0", "0000:41:00.0", "0000:81:00.0"], strict=True):
        device["bus"] = bus
    install(monkeypatch, table)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = gpus.inventory()
    assert [g.index for g in found] == [1, 2, 0]
    assert found[0].free_bytes == 60 * gpus.GB
    assert found[0].used_bytes == 20 * gpus.GB
    assert found[0].name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        pytest.param("2,0", [2, 0], id="by_index_in_its_order"),
        pytest.param("GPU-00000003-0000,GPU-00000001-0000", [3, 1], id="by_uuid"),
        pytest.param("00000001", [1], id="by_uuid_prefix_without_GPU"),
        pytest.param("1,7,2", [1], id="stops_at_an_unknown_entry_as_cuda_does"),
        pytest.param("", [], id="empty_hides_all"),
    ],
)
def test_inventory_honours_an_inherited_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, indices: list[int]
) -> None:
    install(monkeypatch, h100s(80, 80, 80, 80))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in gpus.inventory()] == indices


def test_without_an_nvml_driver_there_are_no_gpus_and_no_crash(monkeypatch) -> None:
    install(monkeypatch, h100s(80), driver=False)
    assert gpus.inventory() == []
    assert gpus.topology() == {}


def test_a_gpu_is_eligible_only_with_enough_free_memory(monkeypatch) -> None:
    install(monkeypatch, h100s(79.5, 12, 40, 39.9))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.index for g in gpus.eligible(gpus.inventory(), 40)] == [0, 2]
    assert [g.index for g in gpus.short_of_memory("1,2", 20)] == [1]


def test_groups_prefer_gpus_close_in_nvml_topology(monkeypatch) -> None:
    install(monkeypatch, h100s(80, 80, 80, 80), CROSSED)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = gpus.inventory()
    made = gpus.groups(found, 2, gpus.topology())
    assert [[g.index for g in group] for group in made] == [[0, 2], [1, 3]]
    # without topology: runs in bus order; a remainder too small for a group is left out
    assert [[g.index for g in grp] for grp in gpus.groups(found[:3], 2)] == [[0, 1]]


def test_a_gpu_spec_plans_on_the_eligible_gpus_grouped_by_topology(tmp_path: Path) -> None:
    table = {
        "devices": h100s(80, 80, 80, 80, 5),
        "topology": {f"{a},{b}": v for (a, b), v in CROSSED.items()},
    }
    res = plan_with_gpus(
        tmp_path,
        table,
        "pipeline=shard_copy",
        "pipeline.stages.copy.gpus_per_shard=2",
        "+pipeline.stages.copy.min_gpu_memory_gb=10",
    )
    assert res.code == 0, res.text
    assert "copy: 4 of 5 GPU(s) eligible; groups by topology: [0,2] [1,3]" in res.out
    assert "shard: 0 CPU, 2 GPU each; 10 wanted, 2 fit at once" in res.out


def test_too_little_free_gpu_memory_stops_at_plan_saying_what_was_found(tmp_path) -> None:
    res = plan_with_gpus(
        tmp_path,
        {"devices": h100s(79, 30)},
        "pipeline=shard_copy",
        "pipeline.stages.copy.gpus_per_shard=2",
        "+pipeline.stages.copy.min_gpu_memory_gb=40",
    )
    assert res.code == 2
    assert (
        "pipeline.stages.copy.gpus_per_shard: each shard needs 2 GPU(s) with at least 40 GB "
        "free; NVML found 1 such GPU(s) of 2: GPU 0 (79.0 GB free of 80.0), "
        "GPU 1 (30.0 GB free of 80.0)" in res.err
    )


def test_no_nvml_and_no_declared_gpus_is_said_in_plain_words(tmp_path: Path) -> None:
    res = plan_with_gpus(
        tmp_path, {"devices": [], "driver": False}, "pipeline=shard_copy", "cluster.num_gpus=0"
    )
    assert res.code == 2
    assert (
        "pipeline.stages.copy.gpus_per_shard: each shard needs 1 GPU(s) but none were found: "
        "NVML reports no GPU on this machine and the cluster declares 0 GPUs" in res.err
    )
    assert "Traceback" not in res.err


def test_on_a_ray_cluster_groups_are_runs_of_the_gpus_each_node_names() -> None:
    def node(*indices: int) -> Resources:
        named = tuple((gpus.resource(i), 1.0) for i in indices)
        return Resources(cpus=8, gpus=len(indices), custom=(*named, ("other", 1.0)))

    slots = GpuSlots.of(None, 2, [node(0, 1, 2, 3), node(0, 1), node(), Resources(cpus=4)])
    assert slots is not None
    assert (slots.groups, slots.nodes) == ([(0, 1), (2, 3)], {(0, 1): 2, (2, 3): 1})
    assert [slots.take(), slots.take(), slots.take(), slots.spare()] == [(0, 1), (0, 1), (2, 3), 0]
    assert slots.resources((2, 3), 1).ray_options()["resources"] == {
        "runner_gpu_2": 1.0,
        "runner_gpu_3": 1.0,
    }
    # a fraction of a GPU, or a cluster that names none: Ray picks the GPUs
    assert GpuSlots.of(None, 0.5, [node(0, 1)]) is None
    assert GpuSlots.of([[0, 1]], 2, [Resources(cpus=8, gpus=2)]) is None


def run_with_gpus(tmp_path: Path, table: dict[str, Any], *args: str) -> Result:
    """`runner pipeline=shard_copy cluster=local` with its own embedded Ray, every process of
    which (Ray's workers too) sees `table` through NVML (tests/nvml_shim)."""
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(table))
    shim = ROOT / "tests" / "nvml_shim"
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}", "RUNNER_TEST_NVML": str(path)}
    return run_runner(
        *("pipeline=shard_copy", "cluster=local", "cluster.num_cpus=2", "cluster.num_gpus=4"),
        *(f"run.dir={tmp_path / 'run'}", "pipeline.stages.copy.num_shards=4", *args),
        env=env,
    )


def ledger_of(run_dir: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, str]]]:
    """The shards' rows (state, attempts, error, result) and the recorded events."""
    db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    rows = {
        u: {"state": s, "attempts": a, "error": e, "result": json.loads(r) if r else None}
        for u, s, a, e, r in db.execute("SELECT unit, state, attempts, error, result FROM units")
    }
    events = db.execute("SELECT unit, kind, detail FROM events").fetchall()
    db.close()
    return rows, events


def test_on_the_embedded_cluster_shards_run_on_exactly_the_planned_gpu_groups(
    tmp_path: Path,
) -> None:
    # GPU 1 is excluded at plan time; 0 and 3, 2 and 4 share a switch; by the time the
    # shards run, GPU 0 has filled up: the shard that lands there goes back to the queue
    # (no retry spent) and the pair is not used again
    table = {
        "devices": h100s(80, 5, 80, 80, 80),
        "workers": h100s(5, 5, 80, 80, 80),
        "topology": {"0,3": 20, "2,4": 20},
    }
    res = run_with_gpus(
        tmp_path,
        table,
        "pipeline.stages.copy.gpus_per_shard=2",
        "+pipeline.stages.copy.min_gpu_memory_gb=10",
        "pipeline.stages.copy.retries=0",
    )
    assert res.code == 0, res.text
    assert "copy: 4 of 5 GPU(s) eligible; groups by topology: [0,3] [2,4]" in res.text
    rows, events = ledger_of(tmp_path / "run")
    assert {u: r["state"] for u, r in rows.items()} == dict.fromkeys(rows, "done")
    assert all(r["attempts"] == 1 for r in rows.values())
    assert {r["result"]["cuda_visible_devices"] for r in rows.values()} == {"2,4"}
    short = "assigned GPU(s) have less than 10 GB free: GPU 0 (5.0 GB free of 80.0)"
    retired = f"{short}; GPU(s) 0,3 not used again by this stage"
    assert events == [("0-299", "retry", retired)]
    assert f"copy: shard 0-299 queued again: {retired}" in res.err
    assert "[shard 0-299] gpus 2,4 0-299" in res.out
    # every attempt, the returned one too, ran on a planned pair
    assert set(re.findall(r"CUDA_VISIBLE_DEVICES='([^']*)'", res.out)) == {"0,3", "2,4"}


def test_where_ray_picks_the_gpus_a_shard_on_a_full_gpu_is_queued_again_before_it_fails(
    tmp_path: Path,
) -> None:
    # no GPU named to Ray (NVML shows none to the runner, so 4 logical ones): whichever GPU
    # Ray picks is full by the time the shard runs; retries: 0, yet the shard is queued again
    # 3 times, with the reason, before it counts as a failure
    res = run_with_gpus(
        tmp_path,
        {"devices": [], "workers": h100s(5, 5, 5, 5)},
        "+pipeline.stages.copy.min_gpu_memory_gb=10",
        "pipeline.stages.copy.retries=0",
        "pipeline.stages.copy.num_shards=1",
    )
    assert res.code == 1, res.text
    rows, events = ledger_of(tmp_path / "run")
    short = "assigned GPU(s) have less than 10 GB free: GPU "
    assert [(u, k) for u, k, _ in events] == [("0-1199", "retry")] * 3
    assert all(detail.startswith(short) for _, _, detail in events)
    assert res.err.count("copy: shard 0-1199 queued again: " + short) == 3
    row = rows["0-1199"]
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert row["error"].startswith(f"shard 0-1199 failed after 1 attempt(s): {short}")
    assert "(4 times in a row: counted as a failure)" in row["error"]
