"""Every bad input file is found before anything runs: exit 2 and one message naming where it
was set, the key, the value and what is allowed, and never a traceback.

Each row writes its input to a scratch directory and points a spec at it; `{f}` in the message
stands for that file's path. No Ray is needed: these are all found by `mode=plan`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, TEST_SPECS, runner_in

ITEMS = "pipeline.stages.work.items.file"
JOBS = "pipeline.stages.work.jobs_file"
SHARD = "pipeline.stages.copy.input"
ITEMS_SPEC = "tests/specs/pipeline/items_file.yaml"


def parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def items(name: str, content: bytes, message: str) -> tuple[object, ...]:
    return ("items_file", ITEMS, name, content, message, "pipeline.stages.work.num_workers=1")


def jobs(name: str, content: bytes, message: str) -> tuple[object, ...]:
    return ("jobs_file", JOBS, name, content, message, f"pipeline.stages.work.cwd={ROOT}")


def shard(name: str, content: bytes, message: str) -> tuple[object, ...]:
    return ("shard_copy", SHARD, name, content, message, "pipeline.stages.copy.gpus_per_shard=0")


CASES = [
    pytest.param(
        *items(
            "rows.jsonl",
            b'{"id": "a"}\n{"id": "b",\n',
            "command line '{key}={f}': {key}: = '{f}': line 2 is not JSON at column 12: "
            "Expecting property name enclosed in double quotes; expected one JSON object per "
            "line",
        ),
        id="items_jsonl_corrupt",
    ),
    pytest.param(
        *items(
            "rows.jsonl",
            b'{"id": "a"}\n[1, 2]\n',
            "command line '{key}={f}': {key}: = '{f}': line 2 is [1, 2], not an object; every "
            "item is an object",
        ),
        id="items_jsonl_row_not_an_object",
    ),
    pytest.param(
        *items(
            "rows.csv",
            b"id,x\n1,2\n3,4,5\n",
            "command line '{key}={f}': {key}: = '{f}': cannot read as CSV: Error tokenizing "
            "data. C error: Expected 2 fields in line 3, saw 3",
        ),
        id="items_csv_corrupt",
    ),
    pytest.param(
        *items(
            "rows.parquet",
            b"PAR1 this is not parquet",
            "command line '{key}={f}': {key}: = '{f}': cannot read as parquet: Could not open "
            "Parquet input source '{f}': Parquet magic "
            "bytes not found in footer. Either the file is corrupted or this is not a parquet "
            "file.",
        ),
        id="items_parquet_corrupt",
    ),
    pytest.param(
        *items(
            "rows.jsonl",
            b"\n\n",
            "command line '{key}={f}': {key}: = '{f}': holds no items; expected at least one row",
        ),
        id="items_jsonl_empty",
    ),
    pytest.param(
        *items(
            "rows.csv",
            b"id,x\n",
            "command line '{key}={f}': {key}: = '{f}': holds no items; expected at least one row",
        ),
        id="items_csv_header_only",
    ),
    pytest.param(
        *items(
            "rows.jsonl",
            b'{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n',
            f"{ITEMS_SPEC}: pipeline.stages.work.items.id: = 'id': id 'a' appears at line 1 and "
            "line 3 of {f}; ids must be unique",
        ),
        id="items_duplicate_ids",
    ),
    pytest.param(
        *items(
            "rows.jsonl",
            b'{"idx": "a", "x": 1}\n',
            f"{ITEMS_SPEC}: pipeline.stages.work.items.id: = 'id': line 1 of {{f}} has no field "
            "'id'; did you mean 'idx'? (fields: idx, x)",
        ),
        id="items_rows_lack_the_id_field",
    ),
    pytest.param(
        *items(
            "rows.csv",
            b"id,x\n1,a\n,b\n",
            f"{ITEMS_SPEC}: pipeline.stages.work.items.id: = 'id': row 2 of {{f}} has an empty "
            "'id'",
        ),
        id="items_csv_id_missing_in_a_row",
    ),
    pytest.param(
        *jobs(
            "jobs.yaml",
            b"- name: a\n  script: echo a\n- name: [b\n",
            "command line '{key}={f}': {key}: = '{f}': line 4: not valid YAML/JSON (expected ',' "
            "or ']', but got '<stream end>')",
        ),
        id="jobs_file_corrupt_yaml",
    ),
    pytest.param(
        *jobs(
            "jobs.jsonl",
            b'{"name": "a", "script": "echo a"}\n{"name": \n',
            "command line '{key}={f}': {key}: = '{f}': line 2 is not JSON at column 10: "
            "Expecting value; expected one job object per line",
        ),
        id="jobs_file_corrupt_jsonl",
    ),
    pytest.param(
        *jobs(
            "jobs.yaml",
            b"",
            "command line '{key}={f}': {key}: = '{f}': the file is empty; expected a list of "
            "jobs ({{name, script | command, ...}})",
        ),
        id="jobs_file_empty",
    ),
    pytest.param(
        *shard(
            "prompts.csv",
            b'id,prompt\n1,"a\n2,b\n',
            "command line '{key}={f}': {key}: = '{f}': cannot read: Error tokenizing data. "
            "C error: EOF inside string starting at row 1",
        ),
        id="shard_input_csv_corrupt",
    ),
    pytest.param(
        *shard(
            "prompts.csv",
            b"id,prompt\n",
            "{key}: = '{f}': holds no rows; expected at least one id in 'id'",
        ),
        id="shard_input_empty",
    ),
    pytest.param(
        *shard(
            "prompts.csv",
            b"id,prompt\n1,a\n,b\n3,c\n",
            "{key}: = '{f}': 1 row(s) have no value in id column 'id' (the first is row 2); "
            "every row needs an id",
        ),
        id="shard_input_nan_id",
    ),
    pytest.param(
        *shard(
            "prompts.parquet",
            parquet(pd.DataFrame({"id": [[1, 2], [3]], "prompt": ["a", "b"]})),
            "{key}: = '{f}': row 1 has array([1, 2]) as its id in 'id'; expected strings or "
            "numbers",
        ),
        id="shard_input_unhashable_ids",
    ),
]


@pytest.mark.parametrize(("pipeline", "key", "name", "content", "message", "extra"), CASES)
def test_a_bad_input_file_exits_2_with_one_message(
    cli,
    tmp_path: Path,
    pipeline: str,
    key: str,
    name: str,
    content: bytes,
    message: str,
    extra: str,
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    res = cli(
        f"pipeline={pipeline}", f"{key}={path}", extra, f"run.dir={tmp_path}/run", "mode=plan"
    )
    assert res.code == 2, res.text
    assert message.format(key=key, f=path) in res.err
    assert "Traceback" not in res.text
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


WORKERS = [
    pytest.param(
        "syntax_error_worker",
        "import os\n\nvalues = (1,\n",
        "module 'syntax_error_worker' has a syntax error at {f} line 3: '(' was never closed",
        id="worker_module_syntax_error",
    ),
    pytest.param(
        "missing_dependency_worker",
        "import os\nimport no_such_package_xyz.sub\n",
        "module 'missing_dependency_worker' imports 'no_such_package_xyz' at {f} line 2, which "
        "is not installed (pip install no_such_package_xyz, or the package that provides it)",
        id="worker_module_missing_dependency",
    ),
    pytest.param(
        "failing_worker",
        "import os\n\nraise RuntimeError('no GPU here')\n",
        "module 'failing_worker' fails on import at {f} line 3: RuntimeError: no GPU here",
        id="worker_module_raises_on_import",
    ),
]


@pytest.mark.parametrize(("module", "source", "message"), WORKERS)
def test_a_worker_module_that_cannot_import_names_module_line_and_cause(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, message: str
) -> None:
    path = tmp_path / f"{module}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    key = "pipeline.stages.work.worker._target_"
    res = cli("pipeline=items_file", f"{key}={module}.Work", "mode=plan")
    assert res.code == 2, res.text
    expected = f"{key}: = '{module}.Work': cannot import: " + message.format(f=path)
    assert expected in res.err
    assert "Traceback" not in res.text


MINE = """\
name: mine
stages:
  score:
    kind: pool
    worker: {_target_: scorer.Score}
    items: {range: 3}
"""


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param(
            "scorer.Score",
            "no module named 'scorer': my_specs/scorer.py is in the spec directory, which is not "
            "on Python's path: run with PYTHONPATH=my_specs (or move the module to the working "
            "directory)",
            id="beside_the_spec",
        ),
        pytest.param(
            "scorr.Score",
            "no module named 'scorr' in the working directory ({cwd}), on PYTHONPATH or among "
            "installed packages",
            id="nowhere",
        ),
    ],
)
def test_a_worker_module_python_cannot_find_says_where_it_looked(
    tmp_path: Path, target: str, message: str
) -> None:
    specs = tmp_path / "my_specs"
    (specs / "pipeline").mkdir(parents=True)
    (specs / "pipeline" / "mine.yaml").write_text(MINE.replace("scorer.Score", target))
    (specs / "scorer.py").write_text(
        "class Score:\n    def __call__(self, item):\n        return 1\n"
    )
    res = runner_in(tmp_path, "--config-dir", "my_specs", "pipeline=mine", "mode=plan")
    assert res.code == 2, res.text
    assert res.err == (
        "runner: error: invalid spec (1 problem):\n  - my_specs/pipeline/mine.yaml: "
        f"pipeline.stages.score.worker._target_: = '{target}': cannot import: "
        f"{message.format(cwd=tmp_path)}\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            ("pipeline=numbers", "mode=plan", "run.dir=/nonexistent/never-created"), id="plan"
        ),
        pytest.param(("--help",), id="help"),
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(args: tuple[str, ...]) -> None:
    """`runner mode=plan | head -1`, `runner --help | head`: the reader went away; no
    BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [*(sys.executable, "-m", "runner", "--config-dir", str(TEST_SPECS)), *args],
        cwd=ROOT,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a program the pipe ended
    assert proc.stderr == ""


# Bad at run time: the unit fails alone with its message, the rest finish, the run ends 1.
# (A read-only run directory and a full disk end the run with exit 1 and one message: see
# tests/test_storage.py, which needs a tmpfs of its own.)
RESULTS = "the result is not JSON ({}): return dicts, lists, strings, numbers, booleans or None "
RUN_TIME = [
    pytest.param(
        "lock", RESULTS.format("a _thread.lock cannot be stored"), id="result_unpicklable"
    ),
    pytest.param("set", RESULTS.format("a set cannot be stored"), id="result_not_json"),
    pytest.param(
        "datetime", RESULTS.format("a datetime.datetime cannot be stored"), id="result_datetime"
    ),
]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(("kind", "message"), RUN_TIME)
def test_a_unit_bad_at_run_time_fails_alone_with_its_message(
    cli, tmp_path: Path, kind: str, message: str
) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.worker._target_=tests.workers.Returns",
        f"+pipeline.stages.work.worker.kind={kind}",
        "+pipeline.stages.work.worker.bad=[3]",
        "pipeline.stages.work.retries=0",
    )
    assert res.code == 1, res.text
    assert "work: 1 item(s) failed or timed out; max_failures allows 0" in res.out
    assert "Traceback" not in res.text
    table = pd.read_parquet(tmp_path / "work" / "results.parquet").set_index("id")
    assert table.loc["3", "error"] == (f"ResultError: {message}(numpy values are converted)")
    assert (table.drop("3")["status"] == "done").all() and len(table) == 12
