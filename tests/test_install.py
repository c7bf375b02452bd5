"""Install and run anywhere: the package carries its config, example specs and their data, so
the installed command works from any directory; `runner --version` is runner's own.

Building the wheel and installing it in a clean venv outside the clone is `.ci/run`'s job
(minutes); here the same command runs as an installed user would start it, from a directory
that is not the clone.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from tests.conftest import ROOT, runner_in


def test_version_is_runners_own(tmp_path: Path) -> None:
    res = runner_in(tmp_path, "--version")
    assert res.code == 0, res.text
    assert res.out.startswith(f"runner {metadata.version('ray-stage-runner')} (ray-stage-runner;")


def test_help_and_the_demo_plan_work_from_any_directory(tmp_path: Path) -> None:
    res = runner_in(tmp_path, "--help")
    assert res.code == 0, res.text
    assert "Pipelines (pipeline=NAME): continuation, continuation_gpu, demo, jobs," in res.out

    plan = runner_in(tmp_path, "pipeline=demo", "mode=plan", "cluster.num_cpus=2")
    assert plan.code == 0, plan.text
    # the example data ship with the specs: 60 candidate solutions, 300 prompts in 3 shards
    assert "stage check (pool): 60 unit(s)" in plan.out
    assert "run       3  new                      [0-99, 100-199, 200-299]" in plan.out
    assert list(tmp_path.iterdir()) == []  # a plan writes nothing, not even runs/


def my_specs(tmp_path: Path, stage: str) -> tuple[Path, Path]:
    """A user's spec directory holding pipeline `mine` of one stage `work` (its keys as YAML
    text, `stage`) and an empty `data/`, and another directory to run it from."""
    specs, elsewhere = tmp_path / "my_specs", tmp_path / "elsewhere"
    (specs / "pipeline").mkdir(parents=True)
    (specs / "data").mkdir()
    elsewhere.mkdir()
    (specs / "pipeline" / "mine.yaml").write_text(f"name: mine\nstages:\n  work:\n    {stage}")
    return specs, elsewhere


def test_a_specs_data_paths_are_relative_to_its_spec_directory(tmp_path: Path) -> None:
    specs, elsewhere = my_specs(
        tmp_path,
        "kind: pool\n    worker: {_target_: runner.examples.arith.Describe}\n"
        "    items: {file: data/items.jsonl}\n",
    )
    (specs / "data" / "items.jsonl").write_text(
        "".join(json.dumps({"id": f"i{n}", "x": n}) + "\n" for n in range(7))
    )
    res = runner_in(elsewhere, "--config-dir", str(specs), "pipeline=mine", "mode=plan")
    assert res.code == 0, res.text
    assert "stage work (pool): 7 unit(s)" in res.out

    # a path given on the command line is relative to the working directory
    (elsewhere / "two.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    res = runner_in(
        elsewhere,
        "--config-dir",
        str(specs),
        "pipeline=mine",
        "mode=plan",
        "pipeline.stages.work.items.file=two.jsonl",
    )
    assert res.code == 0, res.text
    assert "stage work (pool): 2 unit(s)" in res.out

    missing = runner_in(
        elsewhere, "--config-dir", str(specs), "pipeline=mine", "mode=plan",
        "pipeline.stages.work.items.file=nope.jsonl",
    )  # fmt: skip
    assert missing.code == 2
    assert f"= '{elsewhere / 'nope.jsonl'}': no such file" in missing.err


def test_a_jobs_scns_working_directory_is_relative_to_its_spec_directory(tmp_path: Path) -> None:
    """SCNS's `current_working_directory` is its name for `cwd`, flat or in its nested body:
    relative, it is the spec directory's, as `cwd` is (it was the working directory's)."""
    specs, elsewhere = my_specs(
        tmp_path,
        "kind: jobs\n    jobs:\n"
        "      - {name: a, cwd: data, script: pwd}\n"
        "      - {name: b, current_working_directory: data, script: pwd}\n"
        "      - {job: {name: c, current_working_directory: data}, script: pwd}\n",
    )
    res = runner_in(elsewhere, "--config-dir", str(specs), "pipeline=mine", "mode=plan")
    assert res.code == 0, res.text
    assert "run       3  new" in res.out


def test_overriding_one_key_of_a_job_leaves_its_cwd_the_spec_directorys(tmp_path: Path) -> None:
    """An override of one job's script (`jobs.0.script=...`) is not one of its cwd: that
    stays relative to the spec directory (it became the working directory's, exit 2)."""
    specs, elsewhere = my_specs(
        tmp_path, "kind: jobs\n    jobs:\n      - {name: a, cwd: data, script: pwd}\n"
    )
    args = ("--config-dir", str(specs), "pipeline=mine", "mode=plan")
    res = runner_in(elsewhere, *args, "pipeline.stages.work.jobs.0.script=ls")
    assert res.code == 0, res.text
    # an override of the cwd itself is the working directory's, as any path on the line
    res = runner_in(elsewhere, *args, "pipeline.stages.work.jobs.0.cwd=data")
    assert res.code == 2
    assert f"jobs.0.cwd: = '{elsewhere / 'data'}': no such directory" in res.err


def test_shell_completion_offers_pipelines_and_every_schema_key(tmp_path: Path) -> None:
    install = runner_in(tmp_path, "--shell-completion", "install=bash")
    assert install.code == 0, install.text
    assert "complete -o nospace -o default -F hydra_bash_completion runner" in install.out

    pipelines = runner_in(tmp_path, "-sc", "query=bash", env={"COMP_LINE": "runner pipeline="})
    assert "pipeline=demo" in pipelines.out.split()
    assert "pipeline=pychecker" in pipelines.out.split()

    # a key the YAML of stage `square` leaves out, known from the schema
    keys = runner_in(
        tmp_path,
        "-sc",
        "query=bash",
        env={"COMP_LINE": "runner pipeline=demo pipeline.stages.square.cpus_per"},
    )
    assert keys.out.split() == ["pipeline.stages.square.cpus_per_worker="]


def test_shell_completion_offers_every_allowed_value_of_a_key(tmp_path: Path) -> None:
    def complete(line: str) -> list[str]:
        return runner_in(tmp_path, "-sc", "query=bash", env={"COMP_LINE": line}).out.split()

    assert complete("runner mode=") == [
        "mode=cancel",
        "mode=plan",
        "mode=report",
        "mode=run",
        "mode=status",
    ]
    assert complete("runner mode=st") == ["mode=status"]
    assert complete("runner pipeline=demo pipeline.stages.continue.outputs=") == [
        f"pipeline.stages.continue.outputs={v}" for v in ("any", "one_per_id", "subset")
    ]
    # an open value (a worker's argument) still completes to what the spec says
    assert complete("runner pipeline=demo pipeline.stages.square.worker.exponent=") == [
        "pipeline.stages.square.worker.exponent=2"
    ]


def test_the_wheel_carries_config_specs_and_data() -> None:
    """What setuptools is told to ship (the built wheel itself is checked by .ci/run)."""
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["runner"]
    shipped = {
        p.relative_to(ROOT / "runner").as_posix()
        for pattern in package_data
        for p in (ROOT / "runner").glob(pattern)
        if p.is_file()
    }
    for needed in (
        "conf/config.yaml",
        "conf/cluster/local.yaml",
        "specs/pipeline/demo.yaml",
        "specs/stage/pychecker.yaml",
        "specs/data/pychecker/problems.jsonl",
        "specs/data/continuation/demo_prompts.csv",
        "specs/data/continuation/corpus.txt",
    ):
        assert needed in shipped, needed
