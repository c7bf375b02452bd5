"""A bad spec exits 2 with one message naming file, key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_SPECS, run_runner, runner_in

SPEC = "tests/specs/pipeline"


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        pytest.param(
            "bad_kind",
            f"{SPEC}/bad_kind.yaml: pipeline.stages.check.kind: = 'pol': unknown stage kind; "
            "did you mean 'pool'? (allowed: ",
            id="unknown_stage_kind",
        ),
        pytest.param(
            "bad_key",
            f"{SPEC}/bad_key.yaml: pipeline.stages.check.num_workrs: unknown key; "
            "did you mean 'num_workers'? (allowed: batch_size, cpus_per_worker,",
            id="unknown_key",
        ),
        pytest.param(
            "bad_type",
            f"{SPEC}/bad_type.yaml: pipeline.stages.check.num_workers: = 'many': "
            "expected an integer",
            id="wrong_type",
        ),
        pytest.param(
            "bad_count",
            f"{SPEC}/bad_count.yaml: pipeline.stages.check.num_workers: = 0: must be >= 1",
            id="zero_count",
        ),
        pytest.param(
            "bad_count",
            f"{SPEC}/bad_count.yaml: pipeline.stages.check.retries: = -1: must be >= 0",
            id="negative_count",
        ),
        pytest.param(
            "bad_needs",
            f"{SPEC}/bad_needs.yaml: pipeline.stages.second.needs: = 'frist': no such stage; "
            "did you mean 'first'? (stages: first)",
            id="needs_missing_stage",
        ),
        pytest.param(
            "bad_cycle",
            f"{SPEC}/bad_cycle.yaml: pipeline.stages.a.needs: dependency cycle: a -> b -> a",
            id="dependency_cycle",
        ),
        pytest.param(
            "bad_target",
            f"{SPEC}/bad_target.yaml: pipeline.stages.check.worker._target_: = "
            "'tests.workers.NoSuchWorker': cannot import: module 'tests.workers' has no "
            "attribute 'NoSuchWorker'",
            id="target_not_importable",
        ),
        pytest.param(
            "bad_cpus",
            f"{SPEC}/bad_cpus.yaml: pipeline.stages.check.cpus_per_worker: = 0: must be >= 0.01",
            id="cpus_per_worker_out_of_range",
        ),
        pytest.param(
            "bad_items",
            f"{SPEC}/bad_items.yaml: pipeline.stages.check.items.file: = "
            f"'{TEST_SPECS}/data/no_such_file.jsonl': no such file",
            id="items_source_missing",
        ),
        pytest.param(
            "too_big",
            "plan cannot run on this cluster (1 problem):\n  - pipeline.stages.check: one worker "
            "needs 64 CPU, more than any node has: 64 CPUs wanted, 2 available on the largest node",
            id="more_than_the_cluster_can_give",
        ),
    ],
)
def test_invalid_spec_exits_2_with_its_message(pipeline: str, message: str) -> None:
    result = run_runner(f"pipeline={pipeline}", "cluster.num_cpus=2")
    assert result.code == 2, result.text
    assert message in result.err
    assert "Traceback" not in result.text


def test_every_problem_is_reported_at_once() -> None:
    result = run_runner("pipeline=many_problems")
    assert result.code == 2
    assert "invalid spec (4 problems):" in result.err
    for key in (
        "num_workers: = -2",
        "step_timeout: = 'soon'",
        "worker._target_: = 'no_such",
        f"items.glob: = '{TEST_SPECS}/nothing/*.txt': matches no files",
    ):
        assert key in result.err


def test_a_bad_override_is_named_as_the_command_line() -> None:
    result = run_runner(
        "pipeline=numbers",
        "pipeline.stages.scale.num_workers=-3",
        "++pipeline.stages.scale.retries=x",
    )
    assert result.code == 2
    assert (
        "command line 'pipeline.stages.scale.num_workers=-3': "
        "pipeline.stages.scale.num_workers: = -3: must be >= 1"
    ) in result.err
    assert (
        "command line '++pipeline.stages.scale.retries=x': pipeline.stages.scale.retries: "
        "= 'x': expected an integer"
    ) in result.err


def test_a_stage_that_needs_itself_is_one_problem(cli) -> None:
    res = cli("pipeline=numbers", "mode=plan", "pipeline.stages.scale.needs=[scale]")
    assert res.code == 2
    assert res.err == (
        "runner: error: invalid spec (1 problem):\n"
        "  - command line 'pipeline.stages.scale.needs=[scale]': pipeline.stages.scale.needs: "
        "a stage cannot need itself\n"
    )


@pytest.mark.parametrize(
    ("items", "message"),
    [
        pytest.param(
            "{fil: x.jsonl}",
            "pipeline.stages.scale.items.fil: unknown key; did you mean 'file'? (allowed: range, "
            "list, glob, file, from, id)",
            id="a_misspelt_source",
        ),
        pytest.param(
            "{id: x}",
            "pipeline.stages.scale.items: no item source: give exactly one of range, list, glob, "
            "file, from",
            id="no_source",
        ),
    ],
)
def test_an_items_mapping_without_its_source_is_one_problem(cli, items: str, message: str) -> None:
    res = cli(
        "pipeline=numbers",
        "mode=plan",
        "~pipeline.stages.scale.items",
        f"+pipeline.stages.scale.items={items}",
    )
    assert res.code == 2
    assert res.err == (
        "runner: error: invalid spec (1 problem):\n"
        f"  - command line '+pipeline.stages.scale.items={items}': {message}\n"
    )


def test_a_key_set_twice_is_named_by_the_override_that_won(cli) -> None:
    res = cli("pipeline=numbers", "mode=plan", "mode=stauts")
    assert res.code == 2
    assert "command line 'mode=stauts': mode: = 'stauts': not one of" in res.err


def test_a_bad_spec_starts_no_ray() -> None:
    code = (
        "import sys; from runner.cli import main; c = main(['--config-dir', 'tests/specs', "
        "'pipeline=bad_kind']); print('ray started:', 'ray' in sys.modules and "
        "sys.modules['ray'].is_initialized()); sys.exit(c)"
    )
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "ray started: False" in proc.stdout


def test_full_error_env_shows_the_traceback() -> None:
    result = run_runner("pipeline=bad_kind", env={"RUNNER_FULL_ERROR": "1"})
    assert result.code == 2
    assert "Traceback" in result.err
    assert "unknown stage kind" in result.err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param(
            "pipeline=bad_kindd",
            "runner: error: invalid spec: command line 'pipeline=bad_kindd': no pipeline "
            "'bad_kindd'; did you mean 'bad_kind'? (available: ",
            id="pipeline",
        ),
        pytest.param(
            "cluster=nope",
            "runner: error: invalid spec: command line 'cluster=nope': no cluster 'nope' "
            "(available: local, ray, sim); one of your own: --config-dir DIR with "
            "DIR/cluster/nope.yaml",
            id="cluster",
        ),
    ],
)
def test_unknown_config_group_option_is_one_line(override: str, message: str) -> None:
    """A pipeline or cluster on no search path: exit 2, one line naming the option given and
    the ones there are (Hydra's own is a dozen lines ending in a hint at its traceback)."""
    result = run_runner(override)
    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "HYDRA_FULL_ERROR" not in result.err
    if override.startswith("pipeline"):  # the test specs' own pipelines and the shipped ones
        assert "bad_key" in result.err and "demo" in result.err


# the shipped pipelines, as a message lists them (`runner` run outside the repository)
PIPELINES = "(available: continuation, continuation_gpu, demo, jobs, pychecker, rlhf, rlhf_large)"
ERROR = "runner: error: invalid spec: "
FORMS = "a list: KEY=[a,b]; a value with spaces, commas or brackets in quotes: KEY='...'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ("pipeline=3",),
            f"command line 'pipeline=3': pipeline takes the name of a pipeline file, not 3 "
            f"{PIPELINES}",
            id="pipeline_int",
        ),
        pytest.param(
            ("cluster=1",),
            "command line 'cluster=1': cluster takes the name of a cluster file, not 1 "
            "(available: local, ray, sim)",
            id="cluster_int",
        ),
        pytest.param(
            ("pipeline=null",),
            "command line 'pipeline=null': pipeline takes the name of a pipeline file, not null "
            f"{PIPELINES}",
            id="pipeline_null",
        ),
        pytest.param(
            ("~pipeline=3",),
            "command line '~pipeline=3': pipeline takes the name of a pipeline file, not 3 "
            f"{PIPELINES}",
            id="pipeline_deleted_by_an_int",
        ),
        pytest.param(
            ("+pipeline=jobs",),
            "command line '+pipeline=jobs': pipeline is chosen already; to choose another: "
            f"pipeline=jobs {PIPELINES}",
            id="pipeline_added",
        ),
        pytest.param(
            ("++cluster=sim",),
            "command line '++cluster=sim': cluster is chosen already; to choose another: "
            "cluster=sim (available: local, ray, sim)",
            id="cluster_force_added",
        ),
        pytest.param(
            ("=3",),
            "command line '=3': no key before '='; expected KEY=VALUE, e.g. pipeline=demo",
            id="no_key",
        ),
        pytest.param(
            ("pipeline.stages.square.num_workers=[1",),
            "command line 'pipeline.stages.square.num_workers=[1': cannot be parsed: no viable "
            f"alternative at input '[1'; expected KEY=VALUE ({FORMS})",
            id="unclosed_list",
        ),
        pytest.param(
            ("pipeline.stages.square.num_workers",),
            "command line 'pipeline.stages.square.num_workers': cannot be parsed: no '=' in it; "
            f"expected KEY=VALUE ({FORMS})",
            id="no_equals",
        ),
        pytest.param(
            ("pipeline=[demo,jobs]",),
            "command line 'pipeline=[demo,jobs]': pipeline takes one name, not a list (a list "
            "would merge those files into one pipeline); to run each: runner -m "
            f"pipeline=demo,jobs {PIPELINES}",
            id="pipeline_list",
        ),
        pytest.param(
            ("-m", "pipeline=[demo,jobs]"),
            "command line 'pipeline=[demo,jobs]': pipeline takes one name, not a list (a list "
            "would merge those files into one pipeline); to run each: runner -m "
            f"pipeline=demo,jobs {PIPELINES}",
            id="pipeline_list_in_a_sweep",
        ),
        pytest.param(
            ("-m", "pipeline=demo,jobs", "run.dir="),
            "command line 'run.dir=': run.dir: = '': must not be empty",
            id="empty_run_dir_of_a_sweep",
        ),
    ],
)
def test_a_bad_override_is_one_line_and_leaves_nothing(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """An override Hydra cannot use: exit 2, one line naming it as typed and what it takes
    (Hydra's own is a traceback, or names no override and hints at its traceback), and
    nothing written (no run directory, no `.hydra/`, no sweep directory)."""
    result = runner_in(tmp_path, *args)
    assert result.code == 2, result.text
    assert result.err == f"{ERROR}{message}\n"
    assert "Traceback" not in result.text and "HYDRA_FULL_ERROR" not in result.text
    assert list(tmp_path.iterdir()) == []


def test_an_empty_run_dir_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """`run.dir=` would be the working directory: the run's ledger, lock, plan and report
    among the user's files."""
    result = runner_in(tmp_path, "pipeline=jobs", "run.dir=")
    assert result.code == 2, result.text
    assert result.err == (
        "runner: error: invalid spec (1 problem):\n"
        "  - command line 'run.dir=': run.dir: = '': must not be empty\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_comma_sweep_of_pipelines_is_not_a_list(tmp_path: Path) -> None:
    """`-m pipeline=demo,jobs` is a sweep, one job per pipeline, not the list `[demo,jobs]`."""
    result = runner_in(tmp_path, "-m", "pipeline=demo,jobs", "mode=plan")
    assert result.code == 0, result.text
    assert "2 job(s)" in result.out, result.out
    assert "plan for pipeline 'demo'" in result.out and "plan for pipeline 'jobs'" in result.out


@pytest.mark.parametrize(
    ("override", "why"),
    [
        pytest.param("a b=1", "unexpected ' ' at column 2", id="lexer"),
        pytest.param("a=(1", "extraneous input '('", id="parser_token_set_left_out"),
    ],
)
def test_an_unparsable_override_says_where(override: str, why: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from runner.compose import unparsable

    with pytest.raises(OverrideParseException) as caught:
        OverridesParser.create().parse_overrides([override])
    assert unparsable(caught.value) == (
        f"command line '{override}': cannot be parsed: {why}; expected KEY=VALUE ({FORMS})"
    )


def test_an_option_chosen_by_a_defaults_list_is_named_as_one() -> None:
    from hydra.errors import MissingConfigException

    from runner.compose import missing_option

    exc = MissingConfigException("...", "cluster/big", ["local", "ray", "sim"])
    assert missing_option(exc, ["run.dir=x"]) == (
        "defaults list: cluster: big: no cluster 'big' (available: local, ray, sim); one of "
        "your own: --config-dir DIR with DIR/cluster/big.yaml"
    )
    assert missing_option(MissingConfigException("primary config", "config"), []) is None


@pytest.mark.parametrize(
    ("where", "config_dir"),
    [
        pytest.param("my_specs", "my_specs", id="a_directory_here"),
        pytest.param(".", ".", id="here"),
    ],
)
def test_a_pipeline_of_your_own_without_config_dir_says_which_to_add(
    tmp_path: Path, where: str, config_dir: str
) -> None:
    """The newcomer's first mistake: `runner pipeline=mine` beside my_specs/pipeline/mine.yaml."""
    (tmp_path / where / "pipeline").mkdir(parents=True)
    (tmp_path / where / "pipeline" / "mine.yaml").write_text("name: mine\nstages: {}\n")
    result = runner_in(tmp_path, "pipeline=mine", "mode=plan")
    assert result.code == 2
    assert result.err == (
        f"{ERROR}command line 'pipeline=mine': no pipeline 'mine' {PIPELINES}; "
        f"{Path(where) / 'pipeline' / 'mine.yaml'} is there: add --config-dir {config_dir}\n"
    )


def test_a_typo_in_a_pipelines_defaults_list_names_that_file(tmp_path: Path) -> None:
    shipped = (ROOT / "runner" / "specs" / "pipeline" / "pychecker.yaml").read_text()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "mine.yaml").write_text(shipped.replace(": pychecker", ": pychekcer"))
    result = runner_in(tmp_path, "--config-dir", str(tmp_path), "pipeline=mine", "mode=plan")
    assert result.code == 2
    assert result.err.strip() == (
        "runner: error: invalid spec: defaults list of pipeline/mine.yaml: stage: pychekcer: no "
        "stage 'pychekcer'; did you mean 'pychecker'? (available: pychecker); one of your own: "
        "--config-dir DIR with DIR/stage/pychekcer.yaml"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("form", ["--config-dir", "--config-dir=", "-cd"])
def test_a_config_dir_that_is_not_there_is_one_line(form: str, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    args = [f"{form}{missing}"] if form.endswith("=") else [form, str(missing)]
    result = runner_in(tmp_path, *args, "pipeline=demo", "mode=plan")
    assert result.code == 2
    assert result.err.strip() == f"runner: error: --config-dir {missing}: no such directory"


def test_another_hydra_apps_missing_option_keeps_hydras_exception(tmp_path: Path) -> None:
    """The runner's compose hooks are in Hydra's loader for the whole process: another Hydra
    app composing in it (a launcher's test suite, a notebook) still gets Hydra's exception."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    import runner.cli  # noqa: F401  (installs the hooks, as running the runner does)

    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "mysql.yaml").write_text("port: 3306\n")
    (tmp_path / "app.yaml").write_text("defaults:\n  - db: mysql\n")
    try:
        with initialize_config_dir(str(tmp_path), version_base="1.3"):
            assert compose("app")["db"]["port"] == 3306
            with pytest.raises(MissingConfigException, match="db/nope"):
                compose("app", overrides=["db=nope"])
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("mode", ["run", "plan"])
def test_a_keyword_the_target_does_not_take_is_named_before_anything_runs(
    mode: str, tmp_path: Path
) -> None:
    """The user audit's spec: a misspelled worker keyword is one line at validation, not a
    TypeError from every worker after Ray started and its items recorded as cancelled."""
    run_dir = tmp_path / "run"
    result = run_runner("pipeline=bad_kwarg", f"mode={mode}", f"run.dir={run_dir}")
    assert result.code == 2, result.text
    assert result.err == (
        "runner: error: invalid spec (1 problem):\n"
        f"  - {SPEC}/bad_kwarg.yaml: pipeline.stages.square.worker.exponnt: "
        "'runner.examples.arith.Power' takes no argument 'exponnt'; did you mean 'exponent'? "
        "(it takes: exponent)\n"
    )
    assert not run_dir.exists()


ROLE = "pipeline.stages.work.roles.low.actor"
SHARD = "pipeline.stages.generate.fn"
WORKER = "pipeline.stages.work.worker"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ("pipeline=order_roles", f"+{ROLE}.step_secnds=0.1"),
            f"command line '+{ROLE}.step_secnds=0.1': {ROLE}.step_secnds: "
            "'runner.examples.rlhf.Rollout' takes no argument 'step_secnds'; did you mean "
            "'step_seconds'? (it takes: step_seconds, ignore_cancel)",
            id="roles_actor",
        ),
        pytest.param(
            ("pipeline=shard_fn", f"+{SHARD}.max_wrds=3"),
            f"command line '+{SHARD}.max_wrds=3': {SHARD}.max_wrds: "
            "'runner.examples.continuation.continue_frame' takes no argument 'max_wrds'; did "
            "you mean 'max_words'? (it takes: seed, max_words, id_column, column)",
            id="shard_fn",
        ),
        pytest.param(
            ("pipeline=shard_fn", f"+{SHARD}.frame=3"),
            f"command line '+{SHARD}.frame=3': {SHARD}.frame: "
            "'runner.examples.continuation.continue_frame' is given 'frame' by the runner; "
            "leave it out (it takes: seed, max_words, id_column, column)",
            id="shard_fn_given_its_frame",
        ),
        pytest.param(
            (
                "pipeline=misbehave",
                f"{WORKER}._target_=tests.workers.double",
                f"+{WORKER}.item=1",
            ),
            f"command line '+{WORKER}.item=1': {WORKER}.item: 'tests.workers.double' is given "
            "'item' by the runner; leave it out (it takes: plus)",
            id="pool_function_given_its_item",
        ),
        pytest.param(
            ("pipeline=numbers", "+pipeline.stages.describe.worker.scale=2"),
            "command line '+pipeline.stages.describe.worker.scale=2': "
            "pipeline.stages.describe.worker.scale: 'runner.examples.arith.Describe' takes no "
            "argument 'scale' (it takes none)",
            id="pool_class_without_arguments",
        ),
    ],
)
def test_a_key_the_target_cannot_take_is_named_with_what_it_takes(
    cli, tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    """Each kind's target is bound as that kind calls it: a role's actor and a pool's class
    with the spec's keys alone, a shard's function and a pool's function after the DataFrame
    or item the runner passes it."""
    run_dir = tmp_path / "run"
    res = cli(*overrides, f"run.dir={run_dir}")
    assert res.code == 2, res.text
    assert res.err == f"runner: error: invalid spec (1 problem):\n  - {message}\n"
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ("pipeline=misbehave", f"{WORKER}._target_=tests.workers.Faulty"),
            f"command line '{WORKER}._target_=tests.workers.Faulty': {WORKER}: "
            "'tests.workers.Faulty' needs fail, which the spec leaves out (it takes: fail)",
            id="pool_class",
        ),
        pytest.param(
            (
                "pipeline=roles_stubborn",
                "pipeline.stages.work.roles.rollout.actor._target_=tests.workers.SlowStart",
            ),
            "command line 'pipeline.stages.work.roles.rollout.actor._target_="
            "tests.workers.SlowStart': pipeline.stages.work.roles.rollout.actor: "
            "'tests.workers.SlowStart' needs start_seconds, which the spec leaves out (it "
            "takes: start_seconds, **rollout)",
            id="roles_actor",
        ),
    ],
)
def test_a_required_argument_the_spec_leaves_out_is_named_before_anything_runs(
    cli, tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    """Not a TypeError from every worker once Ray has started, its items cancelled."""
    run_dir = tmp_path / "run"
    res = cli(*overrides, f"run.dir={run_dir}")
    assert res.code == 2, res.text
    assert res.err == f"runner: error: invalid spec (1 problem):\n  - {message}\n"
    assert not run_dir.exists()


def test_a_target_that_takes_any_keyword_is_not_second_guessed(cli) -> None:
    """SlowStart passes the keys it does not know on to the rollout (`**rollout`): which ones
    it accepts only it can say, so the spec check leaves them be."""
    res = cli(
        "pipeline=roles_stubborn",
        "mode=plan",
        "pipeline.stages.work.roles.rollout.actor._target_=tests.workers.SlowStart",
        "+pipeline.stages.work.roles.rollout.actor.start_seconds=2",
    )
    assert res.code == 0, res.text


def test_a_stage_with_a_wrong_spec_is_not_also_said_to_be_missing(cli) -> None:  # type: ignore[no-untyped-def]
    """In the demo, `total` reads `square`'s output: a wrong `square` is one problem, not a
    second one saying `total` names a stage that is not there; a stage that is really not
    there is still named, with the wrong one among those there are."""
    wrong = "pipeline.stages.square.items=5"
    res = cli("pipeline=demo", wrong, "mode=plan")
    assert res.code == 2, res.text
    assert "invalid spec (1 problem):" in res.err, res.err
    assert "pipeline.stages.square.items: = 5: expected a mapping" in res.err
    both = cli("pipeline=demo", wrong, "pipeline.stages.total.needs=[sqare]", "mode=plan")
    assert both.code == 2, both.text
    assert "invalid spec (2 problems):" in both.err, both.err
    assert (
        "pipeline.stages.total.needs: = 'sqare': no such stage; did you mean 'square'? "
        "(stages: check, square, continue, inspect)"
    ) in both.err


def test_a_command_of_the_wrong_type_is_one_problem(cli) -> None:  # type: ignore[no-untyped-def]
    """A job's `command` written as a string (it is a list; a string is `script`) is said
    once, not again as a job that sets neither script nor command."""
    res = cli("pipeline=jobs", "pipeline.stages.compute.jobs=[{name: b, command: echo hi}]")
    assert res.code == 2, res.text
    assert "invalid spec (1 problem):" in res.err, res.err
    assert "pipeline.stages.compute.jobs.0.command: = 'echo hi': expected a list" in res.err


def test_a_shard_command_with_a_number_runs_and_one_with_a_mapping_is_one_problem(  # type: ignore[no-untyped-def]
    cli,
) -> None:
    """An argv's numbers are its strings (`[--tp_size, 2]`); an entry that is no string nor
    number is said once, as a list of strings expected, not also as a stage without a
    command (it said `expected a list` of a list, then 'give exactly one of command or fn')."""
    args = ("pipeline=continuation", "mode=plan")
    res = cli(*args, "pipeline.stages.generate.command.1=2")
    assert res.code == 0, res.text
    res = cli(*args, "pipeline.stages.generate.command.1={a: 1}")
    assert res.code == 2, res.text
    assert "invalid spec (1 problem):" in res.err, res.err
    assert "expected a list of strings or null" in res.err, res.err


def test_a_pipeline_file_that_holds_a_list_is_named(tmp_path: Path) -> None:
    """Hydra composes a pipeline file of a list as it is; its first use (the output
    directory's `${pipeline.name}`) then failed in Hydra's words, naming no file."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "listed.yaml").write_text("- name: one\n- name: two\n")
    result = runner_in(tmp_path, "--config-dir", str(tmp_path), "pipeline=listed", "mode=plan")
    assert result.code == 2, result.text
    assert result.err.strip() == (
        "runner: error: invalid spec: pipeline/listed.yaml: a pipeline holds a mapping "
        "(name: ..., stages: ...), not a list"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
