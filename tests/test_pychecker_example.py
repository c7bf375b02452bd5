"""Tests for the PyChecker example worker and its dataset, calling the worker directly.

No Ray here: the worker is a plain callable, and its scoring tiers, its time limit
and its promise never to leave a child running are what these tests pin down.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from runner.examples.pychecker import PyChecker

DATASET = Path(__file__).resolve().parents[1] / "runner/specs/data/pychecker/problems.jsonl"
KINDS = {"correct", "wrong", "syntax", "loop"}

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def _item(candidate: str, tests: str = ADD_TESTS) -> dict[str, object]:
    return {"problem_id": "t", "candidate": candidate, "tests": tests, "kind": "test"}


def _load_rows() -> list[dict[str, str]]:
    with DATASET.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


ROWS = _load_rows()


def _rows_of(kind: str) -> list[object]:
    return [pytest.param(row, id=row["problem_id"]) for row in ROWS if row["kind"] == kind]


def _is_dead(pid: int) -> bool:
    """A pid is dead when it is gone or a zombie (killed, waiting only to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


@pytest.mark.parametrize(
    ("candidate", "score", "passed", "compiled", "detail"),
    [
        pytest.param("def add(a, b):\n    return a + b\n", 1.0, True, True, "ok", id="correct"),
        pytest.param(
            "def add(a, b):\n    return a * b\n",
            0.3,
            False,
            True,
            "AssertionError",
            id="wrong",
        ),
        pytest.param(
            "def add(a, b):\n    return undefined_name\n",
            0.3,
            False,
            True,
            "NameError: name 'undefined_name' is not defined",
            id="raises",
        ),
        pytest.param(
            "def add(a, b)\n    return a + b\n",
            0.0,
            False,
            False,
            "syntax error line 1",
            id="syntax",
        ),
        pytest.param(
            "def add(a, b):\n    x = 1\n  return a + b\n",
            0.0,
            False,
            False,
            "syntax error line 3",
            id="indentation",
        ),
    ],
)
def test_scoring_tiers(
    candidate: str, score: float, passed: bool, compiled: bool, detail: str
) -> None:
    result = PyChecker(time_limit=5)(_item(candidate))
    assert result == {"score": score, "passed": passed, "compiled": compiled, "detail": detail}


def test_looping_candidate_hits_time_limit() -> None:
    looping = "def add(a, b):\n    while True:\n        pass\n"
    result = PyChecker(time_limit=1)(_item(looping))
    assert result["score"] == 0.3
    assert result["passed"] is False
    assert result["compiled"] is True
    assert result["detail"] == "time limit 1.0s"


def test_timeout_kills_child_and_grandchildren(tmp_path: Path) -> None:
    """The whole process group goes on timeout, not just the direct child."""
    pidfile = tmp_path / "pids.txt"
    candidate = (
        "import os, subprocess, sys\n"
        "def add(a, b):\n"
        "    helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"    with open({str(pidfile)!r}, 'w') as fh:\n"
        "        fh.write(f'{os.getpid()} {helper.pid}')\n"
        "    while True:\n"
        "        pass\n"
    )
    result = PyChecker(time_limit=2)(_item(candidate))
    assert result["score"] == 0.3
    assert result["detail"] == "time limit 2.0s"
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    # SIGKILL is delivered at once, but an orphaned grandchild is reaped by init on its
    # own schedule; poll briefly rather than assert on the first look.
    deadline = time.monotonic() + 5
    while not all(_is_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if not _is_dead(pid)] == []


def test_child_runs_under_cpu_rlimit() -> None:
    """The kernel-enforced CPU cap is what stops a loop if the caller itself dies."""
    tests = (
        "import resource\n"
        "assert resource.getrlimit(resource.RLIMIT_CPU) == (3, 3)\n"
        "assert add(1, 2) == 3\n"
    )
    result = PyChecker(time_limit=1.5)(_item("def add(a, b):\n    return a + b\n", tests))
    assert result["detail"] == "ok"
    assert result["score"] == 1.0


def test_python_override_is_used() -> None:
    with pytest.raises(FileNotFoundError):
        PyChecker(python="/nonexistent/python3")(_item("def add(a, b):\n    return a + b\n"))
    ok = PyChecker(time_limit=5, python=sys.executable)(_item("def add(a, b):\n    return a + b\n"))
    assert ok["score"] == 1.0


@pytest.mark.parametrize(
    "time_limit", [pytest.param(0, id="zero"), pytest.param(-1.0, id="negative")]
)
def test_rejects_non_positive_time_limit(time_limit: float) -> None:
    with pytest.raises(ValueError, match="time_limit"):
        PyChecker(time_limit=time_limit)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        pytest.param("candidate", None, KeyError, id="missing-candidate"),
        pytest.param("tests", None, KeyError, id="missing-tests"),
        pytest.param("candidate", b"def add(a, b): ...", TypeError, id="bytes-candidate"),
    ],
)
def test_malformed_row_fails_loudly(key: str, value: object, error: type[Exception]) -> None:
    """A bad row is a pipeline bug, not a candidate to score 0.0."""
    item = _item("def add(a, b):\n    return a + b\n")
    if value is None:
        del item[key]
    else:
        item[key] = value
    with pytest.raises(error, match=key):
        PyChecker()(item)


def test_dataset_shape() -> None:
    assert len(ROWS) >= 50
    assert {row["kind"] for row in ROWS} == KINDS
    assert len({row["problem_id"] for row in ROWS}) == len(ROWS)
    for row in ROWS:
        assert set(row) == {"problem_id", "candidate", "tests", "kind"}
        assert all(isinstance(value, str) for value in row.values())
    assert sum(row["kind"] == "loop" for row in ROWS) == 5


@pytest.mark.parametrize("row", _rows_of("correct"))
def test_dataset_correct_rows_pass(row: dict[str, object]) -> None:
    result = PyChecker(time_limit=5)(row)
    assert (result["score"], result["detail"]) == (1.0, "ok")


@pytest.mark.parametrize("row", _rows_of("syntax"))
def test_dataset_syntax_rows_score_zero(row: dict[str, object]) -> None:
    result = PyChecker(time_limit=5)(row)
    assert result["score"] == 0.0
    assert result["compiled"] is False


@pytest.mark.parametrize("row", _rows_of("wrong"))
def test_dataset_wrong_rows_compile_but_fail(row: dict[str, object]) -> None:
    result = PyChecker(time_limit=5)(row)
    assert result["score"] == 0.3
    assert result["compiled"] is True
    assert not str(result["detail"]).startswith("time limit")
