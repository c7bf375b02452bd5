"""`runner -m` sweeps: one run directory per job, named by its overrides, so a rerun resumes."""

from __future__ import annotations

import csv
import itertools
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from runner import planfile, spans
from runner.lifecycle import UnitState
from runner.store import UnitRow, read_ledger
from tests.conftest import cpus_free_again, run_runner, runner_process, wait_until


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
    # the resumed sweep still ranks the work the jobs did, not the attempt that did nothing
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert len(rows) == 2 and all(float(r["items_per_s"]) > 0 for r in rows), rows

    # a later sweep of one of them still names the other (an earlier batch's) as it was named:
    # by its overrides, the pipeline shown, not by its directory's name
    one = cli("-m", "pipeline=numbers", "pipeline.stages.scale.num_workers=1", args[-1])
    assert one.code == 0, one.text
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == [
        "pipeline=numbers pipeline.stages.scale.num_workers=1",
        "pipeline=numbers pipeline.stages.scale.num_workers=2",
    ], rows


@pytest.mark.usefixtures("ray_session")
def test_looking_at_a_sweep_leaves_its_multirun_yaml_as_the_sweep_wrote_it(
    cli, tmp_path: Path
) -> None:
    """`multirun.yaml` is Hydra's record of the sweep that ran in the directory: plan, status,
    report and a simulation of its jobs leave it as it was (each wrote its own over it); a
    sweep that runs them again records itself."""
    args = ("-m", "pipeline=numbers", "pipeline.stages.scale.items.range=5,6")
    ran = cli(*args, f"hydra.sweep.dir={tmp_path}")
    assert ran.code == 0, ran.text
    record = tmp_path / "multirun.yaml"
    written = record.read_text()
    for look in ("mode=status", "mode=report", "mode=plan", "cluster=sim"):
        looked = cli(*args, look, f"hydra.sweep.dir={tmp_path}")
        assert looked.code == 0, looked.text
        assert record.read_text() == written, f"{look} rewrote the sweep's record"
    again = cli(*args, "hydra.launcher.max_parallel=1", f"hydra.sweep.dir={tmp_path}")
    assert again.code == 0, again.text
    assert "- hydra.launcher.max_parallel=1" in record.read_text()


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


def _ledger_rows(run_dir: Path) -> list[UnitRow]:
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return [row for stage in ledger.stages() for row in ledger.rows(stage["stage"])]
    finally:
        ledger.close()


def _cpu_steps(run_dir: Path) -> list[tuple[float, float]]:
    """The CPUs a job's units held over time, as the job's own records tell it."""
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        view = spans.read(ledger, planfile.load(run_dir / planfile.PLAN_FILE))
    finally:
        ledger.close()
    return view.usage.get("CPU", [])


def _most_at_once(steps_of_jobs: list[list[tuple[float, float]]]) -> float:
    """The most CPUs the jobs together held at any instant."""
    changes: list[tuple[float, float]] = []
    for steps in steps_of_jobs:
        level = 0.0
        for t, value in steps:
            changes.append((t, value - level))
            level = value
    total = most = 0.0
    for _, delta in sorted(changes):
        total += delta
        most = max(most, total)
    return most


@pytest.mark.usefixtures("ray_session")
def test_a_pipeline_sweeps_jobs_run_side_by_side_never_holding_more_than_the_cluster(
    cli, tmp_path: Path
) -> None:
    """Three jobs of one 1-CPU worker each on the 2-CPU session Ray: they overlap in time
    (Hydra's basic launcher ran them one after another), and the CPUs their units held
    together never exceed the cluster's 2."""
    res = cli(
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=1",
        "pipeline.stages.scale.worker._target_=tests.workers.Sleepy",
        "~pipeline.stages.scale.worker.factor",
        "+pipeline.stages.scale.worker.seconds=0.05",
        "pipeline.stages.scale.items.range=20,21,22",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 0, res.text
    jobs = sorted(d for d in tmp_path.iterdir() if (d / "summary.json").exists())
    assert len(jobs) == 3
    spans_of = []
    for job in jobs:
        rows = [r for r in _ledger_rows(job) if r.started is not None and r.ended is not None]
        assert {r.state for r in rows} == {UnitState.done}
        spans_of.append((min(r.started or 0 for r in rows), max(r.ended or 0 for r in rows)))
    overlapping = [
        (a, b) for a, b in itertools.combinations(spans_of, 2) if a[0] < b[1] and b[0] < a[1]
    ]
    assert overlapping, f"the jobs ran one after another: {spans_of}"
    assert _most_at_once([_cpu_steps(job) for job in jobs]) <= 2.0
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert len(rows) == 3 and all(r["ok"] == "True" for r in rows)


@pytest.mark.usefixtures("ray_session")
def test_a_sweep_job_with_an_invalid_config_fails_alone_with_exit_2(cli, tmp_path: Path) -> None:
    res = cli(
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=1,0",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 2, res.text
    assert "pipeline.stages.scale.num_workers" in res.err
    assert (
        "runner: error: sweep job pipeline=numbers pipeline.stages.scale.num_workers=0 ended "
        "with exit 2 (its spec is invalid, as said above)"
    ) in res.err
    good = tmp_path / "pipeline.stages.scale.num_workers=1"
    assert json.loads((good / "summary.json").read_text())["stages"]["scale"]["done"] == 50
    rows = {r["overrides"]: r for r in csv.DictReader((tmp_path / "sweep_summary.csv").open())}
    assert rows["pipeline=numbers pipeline.stages.scale.num_workers=0"]["ok"] == "False"
    assert rows["pipeline=numbers pipeline.stages.scale.num_workers=1"]["ok"] == "True"


def test_a_sweep_job_whose_plan_cannot_fit_is_one_line_not_a_traceback(cli, tmp_path: Path) -> None:
    """A job that needs no Ray (here `mode=plan`) and fails as a single run does: its one
    line, exit 2 (before: a traceback out of the launcher, and the other jobs never ran)."""
    res = cli(
        "-m",
        "pipeline=too_big",
        "mode=plan",
        "pipeline.stages.check.items.range=3,4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 2, res.text
    assert "Traceback" not in res.text
    said = (
        "runner: error: plan cannot run on this cluster (1 problem):\n  - pipeline.stages.check: "
        "one worker needs 64 CPU, more than any node has"
    )
    assert res.err.count(said) == 2, res.err
    assert res.err.splitlines()[-1] == (
        "runner: error: sweep job pipeline=too_big pipeline.stages.check.items.range=3 ended "
        "with exit 2 (as said above)"
    )


def test_a_sweep_killed_with_sigkill_finishes_on_one_ray_when_run_again(tmp_path: Path) -> None:
    """SIGKILL of the sweep's driver mid-run, then the same sweep again: every job finishes,
    nothing lost (each item's result once), and the rerun's jobs all ran on one Ray (one node
    id across their ledgers: the basic launcher started a Ray per job)."""
    args = (
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=1",
        "pipeline.stages.scale.worker._target_=tests.workers.Sleepy",
        "~pipeline.stages.scale.worker.factor",
        "+pipeline.stages.scale.worker.seconds=0.1",
        "pipeline.stages.scale.items.range=30,31",
        f"hydra.sweep.dir={tmp_path}",
    )
    proc = runner_process(*args)

    def job_dirs() -> list[Path]:
        return [d for n in (30, 31) for d in tmp_path.glob(f"*items.range={n},*")]

    try:
        _wait_both_running(job_dirs)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    again = run_runner(*args, timeout=240)
    assert again.code == 0, again.text
    jobs = job_dirs()
    node_ids = set()
    for job, n in zip(jobs, (30, 31), strict=True):
        done = json.loads((job / "summary.json").read_text())["stages"]["scale"]
        assert done["done"] == n, done
        rows = [r for r in _ledger_rows(job) if r.stage == "scale"]
        assert sorted(int(r.unit) for r in rows) == list(range(n))
        assert all(r.state is UnitState.done for r in rows)
        node_ids |= {r.node_id for r in _ledger_rows(job) if r.node_id}
    assert len(node_ids) <= 2, node_ids  # the killed sweep's Ray, and the rerun's one
    last = {r.node_id for job in jobs for r in _ledger_rows(job) if r.stage == "describe"}
    assert len(last) == 1, last


def _wait_both_running(job_dirs: Callable[[], list[Path]]) -> None:
    """Until both jobs of the sweep have their run directory and a unit done in it."""
    wait_until(
        lambda: (
            len(job_dirs()) == 2
            and all(any(r.state is UnitState.done for r in _rows_or_none(j)) for j in job_dirs())
        ),
        timeout=120,
        what="both jobs running",
    )


def _rows_or_none(run_dir: Path) -> list[UnitRow]:
    try:
        return _ledger_rows(run_dir)
    except Exception:  # being created by the runner at this moment
        return []


def test_ctrl_c_stops_every_job_of_a_sweep_and_exits_130(ray_session: str, tmp_path: Path) -> None:
    """SIGINT to a sweep of two running jobs: each is stopped with its grace and recorded
    (no unit left `running` in either ledger), their actors are gone, and the sweep exits 130."""
    proc = runner_process(
        "-m",
        "pipeline=misbehave",
        "pipeline.stages.work.num_workers=1",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.seconds=0.3",
        "pipeline.stages.work.items.range=300,301",
        f"hydra.sweep.dir={tmp_path}",
        "cluster=ray",
        env={"RAY_ADDRESS": ray_session},
    )

    def job_dirs() -> list[Path]:
        return [d for d in tmp_path.iterdir() if d.is_dir() and "items.range=" in d.name]

    try:
        _wait_both_running(job_dirs)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    for job in job_dirs():
        states = {r.state for r in _ledger_rows(job)}
        assert UnitState.running not in states and UnitState.granted not in states, states
        assert UnitState.cancelled in states or UnitState.pending in states, states
    wait_until(cpus_free_again, what="every actor of the sweep to be gone")


@pytest.mark.usefixtures("ray_session")
def test_max_parallel_caps_the_jobs_that_run_at_once(cli, tmp_path: Path) -> None:
    res = cli(
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=1",
        "pipeline.stages.scale.worker._target_=tests.workers.Sleepy",
        "~pipeline.stages.scale.worker.factor",
        "+pipeline.stages.scale.worker.seconds=0.05",
        "pipeline.stages.scale.items.range=20,21",
        "hydra.launcher.max_parallel=1",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 0, res.text
    jobs = [d for d in tmp_path.iterdir() if (d / "summary.json").exists()]
    spans_of = sorted(
        (min(r.started or 0 for r in rows), max(r.ended or 0 for r in rows))
        for rows in ([r for r in _ledger_rows(j) if r.started and r.ended] for j in jobs)
    )
    assert len(spans_of) == 2 and spans_of[0][1] <= spans_of[1][0], spans_of


@pytest.mark.usefixtures("ray_session")
def test_the_optuna_sweeper_reads_each_pipelines_objective(cli, tmp_path: Path) -> None:
    """`hydra.launcher.objective` makes a key of each job's summary.json its return value:
    Optuna's trials (three at once) are told how many items each pipeline did, and the best
    is the smallest."""
    res = cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=3",
        "hydra.launcher.objective=stages.scale.done",
        "pipeline=numbers",
        "pipeline.stages.scale.items.range=choice(10,20,30)",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 0, res.text
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    done = {
        json.loads((d / "summary.json").read_text())["stages"]["scale"]["done"]
        for d in tmp_path.iterdir()
        if (d / "summary.json").exists()
    }
    assert best["best_value"] == min(done)
    assert best["best_params"]["pipeline.stages.scale.items.range"] == min(done)


@pytest.mark.usefixtures("ray_session")
def test_the_same_overrides_twice_in_a_batch_run_once(cli, tmp_path: Path) -> None:
    """A sampler may suggest the same point twice at once: one job in the one directory its
    overrides name (before: the second found the directory locked and failed, exit 2)."""
    res = cli(
        "-m",
        "pipeline=numbers",
        "pipeline.stages.scale.items.range=10,10",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert res.code == 0, res.text
    (job,) = [d for d in tmp_path.iterdir() if (d / "summary.json").exists()]
    assert json.loads((job / "summary.json").read_text())["stages"]["scale"]["done"] == 10
    assert res.out.count("run succeeded") == 1
