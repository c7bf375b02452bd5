"""Hydra as Hydra users expect: every documented key overridable without `++`, `--cfg job`
showing every effective value, one clear line for a broken YAML file or interpolation, one
`.hydra/` snapshot per run attempt, nothing written by plan or status, one directory per
sweep job under an explicit `run.dir`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TEST_SPECS, run_runner, runner_in


def test_cfg_job_shows_the_schema_defaults_a_yaml_omits() -> None:
    res = run_runner("pipeline=demo", "--cfg", "job")
    assert res.code == 0, res.text
    square = res.out.split("    square:\n", 1)[1].split("    total:", 1)[0]
    for line in ("cpus_per_worker: auto", "retries: 0", "step_timeout: null", "batch_size: auto"):
        assert f"      {line}\n" in square, line
    assert "  connect_timeout: 60.0\n" in res.out
    assert "  progress: log\n" in res.out


def test_a_key_the_yaml_omits_is_overridable_without_plus(tmp_path: Path) -> None:
    res = run_runner(
        "pipeline=demo",
        "mode=plan",
        f"run.dir={tmp_path}",
        "cluster.num_cpus=2",
        "pipeline.stages.square.cpus_per_worker=0.4",
        "+pipeline.stages.total.retries=2",  # `+` still adds a key as before
    )
    assert res.code == 0, res.text
    assert "square: cpus_per_worker=0.4 (from the spec)" in res.out


def test_a_misspelt_key_still_gets_a_did_you_mean() -> None:
    res = run_runner("pipeline=numbers", "mode=plan", "++pipeline.stages.scale.num_workrs=3")
    assert res.code == 2
    assert (
        "command line '++pipeline.stages.scale.num_workrs=3': pipeline.stages.scale.num_workrs: "
        "unknown key; did you mean 'num_workers'?" in res.err
    )


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("pipeline.stages.scale.num_workrs=3", "pipeline.stages.scale.num_workrs", "num_workers"),
        ("pipline.stages.scale.num_workers=3", "pipline", "pipeline"),
        ("pipeline.stages.scal.num_workers=3", "pipeline.stages.scal", "scale"),
        ("~pipeline.stages.scal", "pipeline.stages.scal", "scale"),
        ("pipeline.stages.scale.worker.factr=2", "pipeline.stages.scale.worker.factr", "factor"),
        # a mapping given whole is merged key by key: its misspelt key is named the same way
        ("pipeline={nme: x}", "pipeline.nme", "name"),
        ("pipeline.stages.scale={retrys: 2}", "pipeline.stages.scale.retrys", "retries"),
        (
            "pipeline.stages.scale.worker={_target_: tests.workers.Echo, factr: 2}",
            "pipeline.stages.scale.worker.factr",
            "factor",
        ),
    ],
)
def test_a_misspelt_key_path_gets_the_runners_one_line_with_a_did_you_mean(
    cli, override: str, key: str, hint: str
) -> None:
    res = cli("pipeline=numbers", "mode=plan", override)
    assert res.code == 2, res.text
    assert res.err.startswith(
        f"runner: error: invalid spec: command line '{override}': {key}: unknown key; "
        f"did you mean '{hint}'? (allowed: "
    )
    assert res.err.count("\n") == 1  # one line
    assert "RUNNER_FULL_ERROR=1" in res.err
    assert "HYDRA_FULL_ERROR" not in res.err and "not in struct" not in res.err


def test_a_mapping_given_whole_is_told_how_to_replace_the_one_there(cli) -> None:
    """`items={list: [1, 2]}` merges into the spec's `{range: 50}`: the message says so, and
    the override it offers runs."""
    res = cli("pipeline=numbers", "mode=plan", "pipeline.stages.scale.items={list: [1, 2]}")
    assert res.code == 2, res.text
    key = "pipeline.stages.scale.items"
    assert (
        f"{key}.list: unknown key (allowed: range); {key}={{...}} merges into the mapping there, "
        f"~{key} '+{key}={{list: [1, 2]}}' replaces it; +{key}.list=... adds it"
    ) in res.err
    assert res.err.count("\n") == 1
    offered = cli("pipeline=numbers", "mode=plan", f"~{key}", f"+{key}={{list: [1, 2]}}")
    assert offered.code == 0, offered.text
    assert "run       2  new                      [0, 1]" in offered.out


def test_only_a_free_form_mapping_is_offered_a_plus() -> None:
    worker = run_runner("pipeline=numbers", "mode=plan", "pipeline.stages.scale.worker.factr=2")
    assert "; +pipeline.stages.scale.worker.factr=2 adds it (RUNNER_FULL_ERROR" in worker.err
    whole = run_runner("pipeline=numbers", "mode=plan", "pipeline.stages.scale.worker={factr: 2}")
    assert "; +pipeline.stages.scale.worker.factr=... adds it (RUNNER_FULL_ERROR" in whole.err
    stage = run_runner("pipeline=numbers", "mode=plan", "pipeline.stages.scale.retrys=2")
    assert "adds it" not in stage.err
    full = run_runner(
        "pipeline=numbers", "pipeline.stages.scale.retrys=2", env={"RUNNER_FULL_ERROR": "1"}
    )
    assert full.code == 2
    assert "Traceback" in full.err and "Key 'retrys' is not in struct" in full.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: broken\nstages:\n  a:\n    kind: pool\n    items: {range: 3\n"
            "    worker: {_target_: x.y}\n",
            "runner: error: invalid spec: {spec}, line 6, column 11: expected ',' or '}}', but "
            "got ':' (while parsing a flow mapping that starts at line 5, column 12)\n",
            id="yaml_syntax",
        ),
        pytest.param(
            "name: broken\nstages:\n  a:\n    kind: pool\n    num_workers: ${nope.missing}\n"
            "    items: {range: 3}\n    worker: {_target_: runner.examples.arith.Power}\n",
            "  - {spec}, line 5: pipeline.stages.a.num_workers: = '${{nope.missing}}': cannot "
            "resolve: Interpolation key 'nope.missing' not found\n",
            id="bad_interpolation",
        ),
    ],
)
def test_a_broken_spec_file_exits_2_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    spec = tmp_path / "pipeline" / "broken.yaml"
    spec.parent.mkdir()
    spec.write_text(text)
    res = runner_in(tmp_path, "--config-dir", str(tmp_path), "pipeline=broken", "run.dir=run")
    assert res.code == 2, res.text
    assert message.format(spec=spec.relative_to(tmp_path)) in res.err
    assert "Traceback" not in res.err


def test_a_bad_interpolation_on_the_command_line_exits_2(tmp_path: Path) -> None:
    res = run_runner("pipeline=numbers", "pipeline.name=${oops}")
    assert res.code == 2, res.text
    assert res.err == (
        "runner: error: invalid spec: hydra.run.dir (built from run.dir and pipeline.name): "
        "cannot resolve: Interpolation key 'oops' not found\n"
    )


@pytest.mark.usefixtures("ray_session")
def test_each_attempt_keeps_its_own_snapshot_and_looking_writes_nothing(
    cli, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    for mode in ("plan", "status"):
        assert cli("pipeline=numbers", f"mode={mode}", f"run.dir={run_dir}").code == 0
        assert not run_dir.exists()
    for _ in range(2):
        assert cli("pipeline=numbers", f"run.dir={run_dir}").code == 0
    snapshots = sorted((run_dir / ".hydra").iterdir())
    assert len(snapshots) == 2
    for snapshot in snapshots:
        assert sorted(p.name for p in snapshot.iterdir()) == [
            "config.yaml",
            "hydra.yaml",
            "overrides.yaml",
        ]
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert cli("pipeline=numbers", "mode=status", f"run.dir={run_dir}").code == 0
    # SQLite's own shared-memory files of the read-only ledger aside
    after = [p.name for p in run_dir.rglob("*") if not p.name.endswith(("-shm", "-wal"))]
    assert sorted(after) == before


@pytest.mark.parametrize(
    "args",
    [
        ("pipeline=demo", "pipeline.stages.square.num_workers=abc"),
        ("pipeline=demo", "mode=status", "run.progress=loud"),
        ("pipeline=demo", "pipeline.stages.square.num_workrs=3"),
    ],
)
def test_an_invalid_command_leaves_nothing_in_the_working_directory(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    res = runner_in(tmp_path, *args)
    assert res.code == 2, res.text
    assert res.err.startswith("runner: error: invalid spec")
    assert list(tmp_path.iterdir()) == []  # no runs/demo/.hydra/, no runner.log


@pytest.mark.usefixtures("ray_session")
def test_a_sweep_with_a_run_dir_gets_one_directory_per_job(cli, tmp_path: Path) -> None:
    res = cli(
        "-m", "pipeline=numbers", "pipeline.stages.scale.worker.factor=1,2", f"run.dir={tmp_path}"
    )
    assert res.code == 0, res.text
    for factor in (1, 2):
        job = tmp_path / f"pipeline.stages.scale.worker.factor={factor}"
        summary = json.loads((job / "summary.json").read_text())
        assert summary["stages"]["scale"]["done"] == 50
    assert not (tmp_path / "ledger.sqlite").exists()
    assert (tmp_path / "sweep_summary.csv").is_file()


def test_test_specs_find_the_shipped_data() -> None:
    """tests/specs/data is the shipped specs' data, so test specs spell paths as users do."""
    assert (TEST_SPECS / "data" / "pychecker" / "problems.jsonl").is_file()
