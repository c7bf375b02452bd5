"""`runner -m` sweeps: one run directory per job, named by its overrides, so a rerun resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest


@pytest.mark.usefixtures("ray_session")
def test_a_sweep_runs_each_job_in_its_own_dir_and_a_rerun_resumes(cli, tmp_path: Path) -> None:
    args = (
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=1,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    first = cli(*args)
    assert first.code == 0, first.text
    jobs = [tmp_path / f"pipeline.stages.scale.num_workers={n}" for n in (1, 2)]
    for job in jobs:
        assert json.loads((job / "summary.json").read_text())["stages"]["scale"]["done"] == 50

    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["overrides"] for r in rows] == sorted(
        (r["overrides"] for r in rows),
        key=lambda o: -float(next(x for x in rows if x["overrides"] == o)["items_per_s"]),
    )
    assert {r["overrides"] for r in rows} == {
        "pipeline=numbers pipeline.stages.scale.num_workers=1",
        "pipeline=numbers pipeline.stages.scale.num_workers=2",
    }
    assert "#  overrides" in first.out

    again = cli(*args)
    assert again.code == 0, again.text
    for job in jobs:
        stages = json.loads((job / "summary.json").read_text())["attempts"][-1]["stages"]
        assert stages["scale"]["skipped"] == 50 and stages["scale"]["done"] == 0


@pytest.mark.usefixtures("ray_session")
def test_a_failing_job_makes_the_sweep_exit_1_and_ranks_last(cli, tmp_path: Path) -> None:
    res = cli(
        "-m",
        "pipeline=misbehave",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        "+pipeline.stages.work.worker.fail=[1]",
        "pipeline.stages.work.max_failures=0,1",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 1
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["ok"] for r in rows] == ["True", "False"]
