"""PyChecker: score a Python candidate against assert-style tests in a sandboxed child.

The scoring follows PettingLLMs' PyChecker so results are comparable with it:
0.0 when the candidate does not even compile, 0.3 when it compiles but the tests
fail (an assertion, any exception, or running past the time limit), and 1.0 when
every test passes. Partial credit for compiling code rewards syntactically valid
attempts over garbage, which is what that reward shaping is for.

Candidate code is untrusted, so it never runs in the calling process: it runs in
a fresh interpreter in its own session (its own process group), with a CPU-time
rlimit so that a busy loop dies on its own even if the caller is killed before
it can clean up, and with the whole group killed on a wall-clock timeout.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from runner import scratch

SCORE_SYNTAX = 0.0
SCORE_FAILED = 0.3
SCORE_PASSED = 1.0

# Keep details short: they end up in result rows, not in log files.
_DETAIL_MAX = 200
# Enough stderr to hold the final traceback line of any reasonable failure.
_STDERR_TAIL = 8192
# Cap on files the child writes (stderr included): bounds disk use by a chatty loop.
_FILE_SIZE_LIMIT = 64 * 1024 * 1024


def _text_field(item: dict[str, object], key: str) -> str:
    """Return ``item[key]`` as a string; a malformed row is a caller bug, so fail loudly."""
    if key not in item:
        raise KeyError(f"problem row is missing {key!r}")
    value = item[key]
    if not isinstance(value, str):
        raise TypeError(f"problem row field {key!r} must be str, got {type(value).__name__}")
    return value


def _shorten(text: str) -> str:
    """Clip a detail string so that one noisy candidate cannot bloat the results."""
    text = text.strip()
    if len(text) <= _DETAIL_MAX:
        return text
    return text[: _DETAIL_MAX - 3] + "..."


def _read_tail(stream: IO[bytes]) -> bytes:
    """Read only the end of the child's stderr: the exception line is last, the rest noise."""
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - _STDERR_TAIL))
    return stream.read()


def _last_error_line(stderr: bytes) -> str:
    """Pick the exception line (``AssertionError``, ``NameError: ...``) out of a traceback."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def _signal_name(signum: int) -> str:
    """Name a signal for the detail string, tolerating numbers Python has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _make_preexec(cpu_seconds: int) -> Callable[[], None]:
    """Build the child-side setup that bounds CPU time independently of the parent.

    The wall-clock timeout only works while the caller is alive to enforce it; the
    rlimit is enforced by the kernel, so a runaway child (and anything it forks,
    which inherits the limit) still dies if the caller is killed mid-check.
    """

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
        # No core files from candidates that crash or hit a limit: they are just litter.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


def _kill_group(pgid: int) -> None:
    """SIGKILL the child's whole process group so forked helpers cannot outlive a check."""
    # Group already empty (or gone) means nothing is left running, which is the goal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class PyChecker:
    """Worker that scores one problem row; instances are cheap and hold only settings."""

    def __init__(self, time_limit: float = 10.0, python: str | None = None) -> None:
        """Configure the per-item wall-clock limit and the interpreter that runs candidates.

        ``python`` overrides ``sys.executable`` so candidates can be checked with a
        different interpreter than the one running the pipeline.
        """
        if not time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {time_limit!r}")
        self.time_limit = float(time_limit)
        self.python = python if python is not None else sys.executable

    def __call__(self, item: dict[str, object]) -> dict[str, object]:
        """Score ``item`` (``candidate`` and ``tests`` sources) and say why it got that score."""
        candidate = _text_field(item, "candidate")
        tests = _text_field(item, "tests")

        # Compile in-process first: it is cheap, runs no candidate code, and gives the
        # 0.0 tier. dont_inherit keeps this module's __future__ flags out of the check.
        try:
            compile(candidate, "<candidate>", "exec", dont_inherit=True)
        except SyntaxError as exc:
            detail = f"syntax error line {exc.lineno}"
            return self._result(SCORE_SYNTAX, compiled=False, detail=detail)
        except ValueError as exc:  # e.g. source containing null bytes
            return self._result(SCORE_SYNTAX, compiled=False, detail=f"invalid source: {exc}")

        return self._run(candidate + "\n\n" + tests + "\n")

    def _run(self, program: str) -> dict[str, object]:
        """Run candidate+tests in a child interpreter; never return with the child alive."""
        cpu_seconds = math.ceil(self.time_limit) + 1
        # in the worker's scratch folder, swept should the worker be killed mid-check
        here = scratch.folder()
        with tempfile.TemporaryDirectory(
            prefix="pychecker-", dir=here, ignore_cleanup_errors=True
        ) as tmp:
            script = Path(tmp) / "check.py"
            script.write_text(program, encoding="utf-8")
            # stderr goes to a file, not a pipe: a chatty candidate cannot grow our
            # memory, and a forked helper holding the pipe cannot block us on EOF.
            # stdout is never used for scoring, so it is discarded.
            with open(Path(tmp) / "stderr.txt", "w+b") as err:
                # Popen rather than subprocess.run: run() kills only the direct child
                # on timeout and then drops its pid, so grandchildren could survive.
                # Keeping the Popen lets us kill the whole session's process group.
                proc = subprocess.Popen(
                    [self.python, "-I", str(script)],
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                    # preexec_fn puts the limits in place before the first candidate
                    # instruction. It is unsafe with threads in general (fork-time
                    # locks); the hook is kept to setrlimit calls only to keep that small.
                    preexec_fn=_make_preexec(cpu_seconds),
                )
                try:
                    proc.wait(timeout=self.time_limit)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
                    detail = f"time limit {self.time_limit}s"
                    return self._result(SCORE_FAILED, compiled=True, detail=detail)
                except BaseException:
                    # KeyboardInterrupt or similar while waiting: still reap the child.
                    _kill_group(proc.pid)
                    proc.wait()
                    raise
                finally:
                    # Sweep anything the candidate forked, even after a normal exit.
                    _kill_group(proc.pid)
                stderr = _read_tail(err)

        code = proc.returncode
        if code == 0:
            return self._result(SCORE_PASSED, compiled=True, detail="ok")
        if code < 0:
            # With soft == hard RLIMIT_CPU the kernel sends SIGKILL, not SIGXCPU, so a
            # CPU-limit death reads as "killed by SIGKILL" (as does the OOM killer).
            detail = f"killed by {_signal_name(-code)}"
        else:
            detail = _last_error_line(stderr) or f"exit code {code}"
        return self._result(SCORE_FAILED, compiled=True, detail=detail)

    @staticmethod
    def _result(score: float, *, compiled: bool, detail: str) -> dict[str, object]:
        """Build the result row in one place so every path has the same fields."""
        return {
            "score": score,
            "passed": score == SCORE_PASSED,
            "compiled": compiled,
            "detail": _shorten(detail),
        }
