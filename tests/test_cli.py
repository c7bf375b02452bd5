"""The command line as users know it from Hydra: --help, --cfg, python -m, overrides, plan."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, run_runner


def test_help_explains_usage_modes_and_pipelines() -> None:
    res = run_runner("--help")
    assert res.code == 0
    assert "Usage: runner [pipeline=NAME] [mode=run|plan|status|report|cancel]" in res.out
    assert "pipeline: " in res.out and "demo" in res.out and "pychecker" in res.out
    assert "report (redraw timeline.png, trace.json, report.html,\nsummary.json)" in res.out
    assert "Exit codes: 0 success" in res.out
    assert "the run directory\ncannot be written" in res.out
    assert "or a run directory another runner holds" in res.out
    assert "or the Ray cluster went away (a rerun resumes)" in res.out


def test_help_shows_how_to_sweep_where_its_jobs_go_and_how_to_see_them() -> None:
    res = run_runner("--help")
    assert res.code == 0
    assert "Sweeps (-m, --multirun): the jobs run side by side on one Ray, each in" in res.out
    assert "multirun/<pipeline>/<overrides>/ (its own ledger and report)" in res.out
    assert "runner -m pipeline=demo pipeline.stages.square.worker.exponent=2,3,4\n" in res.out
    assert "exponent=2,3,4 mode=status" in res.out


def test_help_offers_only_config_groups_a_user_can_choose() -> None:
    res = run_runner("--help")
    groups = res.out.split("== Config groups", 1)[1].split("==", 2)[1].strip().splitlines()
    assert "cluster: local, ray, sim" in groups
    # each a group `GROUP=OPTION` picks (pipelines: the test specs' too, by --config-dir)
    assert sorted(g.split(":")[0] for g in groups) == ["cluster", "pipeline"]
    assert "schema" not in res.out


def test_python_dash_m_runner_is_the_same_program() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "pipeline=demo", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "_target_: runner.examples.pychecker.PyChecker" in proc.stdout
    assert "name: demo" in proc.stdout


def test_the_console_script_is_installed() -> None:
    from pathlib import Path

    script = Path(sys.executable).parent / "runner"
    proc = subprocess.run(
        [str(script), "pipeline=demo", "mode=plan", "run.dir=/nonexistent/never"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "plan for pipeline 'demo'" in proc.stdout


def test_plan_lists_units_resources_and_reasons_without_running(tmp_path) -> None:
    res = run_runner("pipeline=demo", "mode=plan", f"run.dir={tmp_path}", "cluster.num_cpus=2")
    assert res.code == 0, res.text
    assert "stage check (pool): 60 unit(s)" in res.out
    assert "worker: 0.9 CPU each; 2 wanted, 2 fit at once" in res.out
    assert "run      60  new" in res.out
    assert "stage total (pool): ? unit(s)  needs: square" in res.out
    assert not (tmp_path / "ledger.sqlite").exists()


def test_a_users_own_spec_directory_joins_the_search_path(tmp_path) -> None:
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "mine.yaml").write_text(
        "defaults:\n  - /stage@stages.check: pychecker\n  - _self_\n"
        "name: mine\nstages:\n  check:\n    num_workers: ${oc.env:MY_WORKERS,3}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--config-dir",
            str(tmp_path),
            "pipeline=mine",
            "mode=plan",
            "cluster.num_cpus=6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"MY_WORKERS": "4", "PATH": "/usr/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "worker: 1.35 CPU each; 4 wanted, 4 fit at once" in proc.stdout
