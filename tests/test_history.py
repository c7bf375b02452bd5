"""A run directory's records describe the whole run, every attempt of it: a rerun with nothing
to do changes nothing but a line in the attempts list; Ctrl-C and resume keep both attempts."""

from __future__ import annotations

import json
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

from tests.conftest import (
    cpus_free_again,
    ledger_states,
    run_runner,
    runner_process,
    summary,
    wait_until,
)

ARTIFACTS = ("summary.json", "report.html", "trace.json", "timeline.png", "work/events.jsonl")


def records(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ARTIFACTS}


def attempts_table(page: str) -> list[str]:
    """The rows of report.html's attempts table."""
    table = page.split("<h2>Attempts</h2>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td.*?</tr>", table)


def without_attempts(page: str) -> str:
    head, rest = page.split("<h2>Attempts</h2>", 1)
    return head + rest.split("</table>", 1)[1]


def test_a_rerun_with_nothing_to_do_changes_only_the_attempts_list(
    ray_session: str, cli, tmp_path: Path
) -> None:
    first = cli("pipeline=roles_stubborn", f"run.dir={tmp_path}")
    assert first.code == 0, first.text
    before = records(tmp_path)
    again = cli("pipeline=roles_stubborn", f"run.dir={tmp_path}")
    assert again.code == 0, again.text
    after = records(tmp_path)

    # the events, the trace and the picture are the same files
    for name in ("trace.json", "timeline.png", "work/events.jsonl"):
        assert after[name] == before[name], name
    evs = [json.loads(line) for line in after["work/events.jsonl"].decode().splitlines()]
    assert {e["event"] for e in evs} >= {"arrived", "running", "preempt requested", "done"}

    old, new = (json.loads(x["summary.json"]) for x in (before, after))
    assert new["attempts"][:1] == old["attempts"] and len(new["attempts"]) == 2
    assert new["attempts"][1]["units_run"] == 0
    assert new["attempts"][1]["stages"]["work"]["skipped"] == 2
    assert {k: v for k, v in new.items() if k != "attempts"} == {
        k: v for k, v in old.items() if k != "attempts"
    }
    stage = new["stages"]["work"]
    assert stage["done"] == 2 and stage["preemptions"]["label"] == 1 and stage["requeues"] == 1

    old_page, new_page = (x["report.html"].decode() for x in (before, after))
    assert without_attempts(new_page) == without_attempts(old_page)
    assert attempts_table(new_page)[:1] == attempts_table(old_page)
    assert len(attempts_table(new_page)) == 2
    assert "3 unit attempts over" in new_page
    assert "attempt 2 of this run" in again.out

    # a runner killed once the ledger has the attempt's end left no summary.json: mode=report
    # writes it again, with everything else, the same as the run's end did
    (tmp_path / "summary.json").unlink()
    redrawn = cli("pipeline=roles_stubborn", f"run.dir={tmp_path}", "mode=report")
    assert redrawn.code == 0, redrawn.text
    assert records(tmp_path) == after  # mode=report draws the same whole run


def test_a_rerun_with_nothing_to_do_starts_no_ray(ray_session: str, cli, tmp_path: Path) -> None:
    """The shipped continuation example, done, run again by a user: the answer comes from the
    ledger (its merge made again) without an embedded Ray, which would have written its session
    under RAY_TMPDIR."""
    run_dir = tmp_path / "run"
    first = cli("pipeline=continuation", f"run.dir={run_dir}")
    assert first.code == 0, first.text
    merged = (run_dir / "generate" / "merged.csv").read_bytes()

    # Ray's socket paths must stay short: not under pytest's tmp_path
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        ray_tmp = Path(short) / "ray"
        env = {"RAY_TMPDIR": str(ray_tmp)}
        again = run_runner("pipeline=continuation", f"run.dir={run_dir}", env=env)
        assert again.code == 0, again.text
        assert not ray_tmp.exists()  # no Ray session was started
    assert "generate: 0 unit(s) to run, 4 skipped (done)" in again.text
    assert "attempt 2 of this run" in again.out
    assert (run_dir / "generate" / "merged.csv").read_bytes() == merged
    last = summary(run_dir)["attempts"][-1]
    assert last["exit_code"] == 0 and last["units_run"] == 0
    assert last["stages"]["generate"]["skipped"] == 4


def test_ctrl_c_then_resume_keeps_every_attempt_in_the_records(
    ray_session: str, tmp_path: Path
) -> None:
    args = (
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.roles.rollout.steps=60",
        "cluster=ray",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(
        lambda: "running" in ledger_states(tmp_path).values(), timeout=90, what="a running replica"
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    wait_until(cpus_free_again, what="every role actor to be gone")
    resumed = run_runner(*args, env=env)
    assert resumed.code == 0, resumed.text

    run = summary(tmp_path)
    assert [(a["attempt"], a["exit_code"]) for a in run["attempts"]] == [(1, 130), (2, 0)]
    assert run["stages"]["work"]["done"] == 2 and run["exit_code"] == 0
    assert run["attempts"][0]["stages"]["work"]["cancelled"] >= 1

    lines = (tmp_path / "work" / "events.jsonl").read_text().splitlines()
    evs: list[dict[str, Any]] = [json.loads(line) for line in lines]
    running = [(e["attempt"], e["unit"]) for e in evs if e["event"] == "running"]
    assert (1, "rollout/0") in running and (2, "rollout/0") in running

    # the cancelled attempt is drawn beside the one that finished
    trace = json.loads((tmp_path / "trace.json").read_text())
    states = [(e["name"], e["args"]["state"]) for e in trace if e["ph"] == "X"]
    assert states.count(("rollout/0", "done")) == 1
    assert ("rollout/0", "cancelled") in states
    page = (tmp_path / "report.html").read_text()
    first, second = attempts_table(page)
    assert "cancelled: " in first and '<td class="n">130</td>' in first
    assert "done: " in second
