"""Live progress: rich bars on a terminal with stage output printed above them intact; plain
`progress` lines when the output is not a terminal; nothing when off."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from runner.progress import Progress
from tests.conftest import ROOT, TEST_SPECS

# a stage of 40 units printing a shard's output line by line while its bar advances
SCRIPT = """
import sys, time
from runner.progress import Progress
p = Progress()
assert p.mode == "bar", p.mode
p.start("check", 40)
p.start("merge", 0)
for i in range(40):
    p.print(f"[shard {i}-{i + 9}] wrote row {i} of the continuation output")
    p.advance("check", done=int(i != 7), failed=int(i == 7))
    if i % 8 == 0:
        time.sleep(0.3)  # let the bars redraw between lines
    sys.stdout.write(f"plain write {i}\\n") if i == 20 else None
p.finish("check")
p.close()
"""
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_a_terminal(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `python -c script ARGS` with stdout and stderr on a 120-column pseudo-terminal;
    what the terminal received."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", **(env or {})}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_bars_in_a_terminal_with_output_lines_printed_above_them_intact() -> None:
    raw = run_in_a_terminal(SCRIPT)
    # what stays on screen of each line: the text after its last carriage return
    lines = [ESCAPES.sub("", line.rstrip("\r").split("\r")[-1]) for line in raw.split("\n")]
    for i in range(40):
        wanted = f"[shard {i}-{i + 9}] wrote row {i} of the continuation output"
        assert wanted in lines, f"line {i} is not intact in:\n{raw!r}"
    assert "plain write 20" in lines  # stray stdout writes land above the bars too
    text = ESCAPES.sub("", raw)
    assert "━" in text  # a drawn bar
    assert re.search(r"check\s.*\d+/40", text)  # done / total
    assert "/s" in text and "failed 1" in text
    assert re.search(r"check \[#+\] 40/40 .*failed 1", text)  # the final line of the stage


def screen_lines(raw: str) -> list[str]:
    """What stays on screen of each line: the text after its last carriage return."""
    return [ESCAPES.sub("", line.rstrip("\r").split("\r")[-1]) for line in raw.split("\n")]


def runner_in_a_terminal(ray_session: str, run_dir: Path, *args: str) -> str:
    """`runner ARGS` on the session's Ray with a terminal of its own: what it received."""
    return run_in_a_terminal(
        "from runner.cli import main; main()",
        "--config-dir",
        str(TEST_SPECS),
        "cluster=ray",
        f"run.dir={run_dir}",
        *args,
        env={"RAY_ADDRESS": ray_session},
    )


def test_a_jobs_stage_with_show_output_prints_job_lines_above_its_bar(
    ray_session: str, tmp_path
) -> None:
    raw = runner_in_a_terminal(ray_session, tmp_path / "run", "pipeline=jobs_chatty")
    lines = screen_lines(raw)
    for job in "ab":
        for i in range(1, 13):
            wanted = f"[job {job}] line {i} of job {job}, written while it runs"
            assert wanted in lines, f"{wanted!r} is not intact in:\n{raw!r}"
    assert "[job b stderr] b says goodbye on stderr" in lines
    assert "[job c] job c is quick" in lines
    text = ESCAPES.sub("", raw)
    assert "━" in text  # the stage's bar, drawn while the jobs ran
    assert re.search(r"talk \[#+\] 3/3 ", text)  # the stage's final progress line
    # each job's output also stays in its files
    assert (tmp_path / "run" / "talk" / "c.out").read_text() == "job c is quick\n"


def test_without_a_terminal_progress_is_plain_lines() -> None:
    stream = io.StringIO()
    p = Progress(stream=stream, log_every=0.01)
    assert p.mode == "log"
    p.start("check", 10)
    p.advance("check", done=4, failed=1)
    p._log()
    p.finish("check")
    p.close()
    assert re.search(
        r"^progress check \[#+-+\] 5/10 ETA \d+:\d\d [\d.]+/s failed 1$", stream.getvalue(), re.M
    )
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_printed_output_goes_to_stdout_when_there_are_no_bars(capsys) -> None:
    p = Progress(mode="off", stream=io.StringIO())
    p.start("shard", 3)
    p.print("[shard 1-3] hello")
    p.close()
    assert capsys.readouterr().out == "[shard 1-3] hello\n"


def test_units_that_timed_out_are_counted_as_timed_out_not_failed(
    ray_session: str, tmp_path
) -> None:
    raw = runner_in_a_terminal(
        ray_session,
        tmp_path / "run",
        "pipeline=misbehave",
        "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
        "+pipeline.stages.work.worker.hang=[2,5]",
        "+pipeline.stages.work.step_timeout=1",
        "pipeline.stages.work.max_failures=2",
    )
    final = [ln for ln in screen_lines(raw) if re.match(r"work \[#+\] 12/12 ", ln)]
    assert final, raw
    assert final[-1].endswith(" timed out 2") and "failed" not in final[-1]


def test_a_sweep_jobs_output_lines_carry_its_label(capsys) -> None:
    """In a sweep, jobs print side by side: a shard's or a job's output line says whose it
    is, as the progress lines do."""
    progress = Progress("log", label="[cpus_per_task=1] ")
    progress.print("[shard 0-599] loaded 600 rows")
    progress.close()
    assert capsys.readouterr().out == "[cpus_per_task=1] [shard 0-599] loaded 600 rows\n"
