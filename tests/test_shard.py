"""The shard stage on a real Ray with 4 logical GPUs: placement, refill, commit, retries,
merge, resume after SIGKILL, and bad specs."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from runner.stages.shard.merge import Committed, merge
from tests.conftest import (
    TEST_SPECS,
    attempt,
    cpus_free_again,
    run_runner,
    runner_process,
    wait_until,
)

PROMPTS = 1200


def shard_rows(run_dir: Path, stage: str) -> dict[str, dict[str, Any]]:
    """The ledger's rows of a stage by shard range: state, attempts, error, result."""
    try:
        db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
        rows = db.execute(
            "SELECT unit, state, attempts, error, result FROM units WHERE stage=?", (stage,)
        ).fetchall()
        db.close()
    except sqlite3.Error:
        return {}
    return {
        u: {"state": s, "attempts": a, "error": e, "result": json.loads(r) if r else None}
        for u, s, a, e, r in rows
    }


def done(run_dir: Path, stage: str) -> set[str]:
    return {u for u, r in shard_rows(run_dir, stage).items() if r["state"] == "done"}


def merge_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "merge_summary.json").read_text())


@pytest.mark.usefixtures("ray_session")
def test_ten_gpu_shards_on_four_gpus_all_run_never_sharing_a_gpu_and_refill_at_once(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first shard is slow: a batch barrier would hold shards 4.. back until it ends
    monkeypatch.setenv("SHARD_SLOW", "3")
    res = cli("pipeline=shard_copy", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    rows = shard_rows(tmp_path, "copy")
    assert len(rows) == 10 and {r["state"] for r in rows.values()} == {"done"}
    runs = [r["result"] for r in rows.values()]
    assert all(len(r["cuda_visible_devices"].split(",")) == 1 for r in runs)
    for a, b in combinations(runs, 2):
        if a["started"] < b["ended"] and b["started"] < a["ended"]:
            assert a["cuda_visible_devices"] != b["cuda_visible_devices"], (a, b)
    slow = rows["0-119"]["result"]
    later = [r["result"] for u, r in rows.items() if int(u.split("-")[0]) >= 4 * 120]
    assert any(r["started"] < slow["ended"] for r in later), "refill waited for the slow shard"
    assert "[shard 120-239] gpus " in res.out
    merged = pd.read_csv(tmp_path / "copy" / "merged.csv")
    assert list(merged["id"]) == list(range(PROMPTS))
    assert merge_summary(tmp_path, "copy")["missing_ranges"] == []


@pytest.mark.usefixtures("ray_session")
def test_max_parallel_caps_how_many_shards_overlap(cli, tmp_path: Path) -> None:
    res = cli(
        "pipeline=shard_copy",
        f"run.dir={tmp_path}",
        "pipeline.stages.copy.num_shards=4",
        "+pipeline.stages.copy.max_parallel=1",
        "+pipeline.stages.copy.show_output=false",
    )
    assert res.code == 0, res.text
    runs = sorted(
        (r["result"] for r in shard_rows(tmp_path, "copy").values()), key=lambda r: r["started"]
    )
    assert all(a["ended"] <= b["started"] for a, b in pairwise(runs))
    assert "[shard" not in res.out
    assert "gpus" in (tmp_path / "copy" / "shards" / "shard-0000.log").read_text()


@pytest.mark.usefixtures("ray_session")
def test_a_failing_shard_is_retried_then_reported_with_its_log_and_missing_range(
    cli, tmp_path: Path
) -> None:
    res = cli("pipeline=shard_fail", f"run.dir={tmp_path}")
    assert res.code == 1
    rows = shard_rows(tmp_path, "copy")
    assert rows["600-899"]["state"] == "failed"
    assert rows["600-899"]["attempts"] == 2
    assert done(tmp_path, "copy") == {"0-299", "300-599", "900-1199"}
    assert "shard 600-899 failed after 2 attempt(s): command exited with code 1" in res.text
    assert "boom: cannot continue range 600" in res.text
    # its log's lines from the last attempt on: the first attempt's would pass for the last's
    said = res.text.split("last lines of ")[1].splitlines()
    assert said[1].startswith("    --- runner: attempt 2 of shard 600-899 on "), res.text
    assert said[2:4] == [
        "    boom: cannot continue range 600",
        "    --- runner: command exited with code 1",
    ]
    report = merge_summary(tmp_path, "copy")
    assert report["missing_ranges"] == ["600-899"]
    assert report["total_rows"] == 900
    assert not (tmp_path / "copy" / "shards" / "shard-0002.csv").exists()


@pytest.mark.usefixtures("ray_session")
def test_a_retried_shard_is_a_requeue_in_the_end_of_run_output_without_zero_preemptions(
    cli, tmp_path: Path
) -> None:
    res = cli("pipeline=shard_fail", f"run.dir={tmp_path}")
    assert res.code == 1, res.text
    assert "copy: requeues 1" in res.out.splitlines()
    assert "preemptions" not in res.out


@pytest.mark.usefixtures("ray_session")
def test_the_merge_reads_only_this_plans_committed_shards(cli, tmp_path: Path) -> None:
    shards = tmp_path / "generate" / "shards"
    shards.mkdir(parents=True)
    stale = pd.DataFrame({"id": [5000, 5001], "prompt": ["stale", "stale"]})
    stale.to_parquet(shards / "shard-0007.parquet")
    (shards / "shard-0007.manifest.json").write_text('{"fingerprint": "of another plan"}')
    stale.to_parquet(shards / "old-output.parquet")
    args = ("pipeline=shard_fn", f"run.dir={tmp_path}")
    res = cli(*args)
    assert res.code == 0, res.text
    merged = pd.read_parquet(tmp_path / "generate" / "merged.parquet")
    assert sorted(merged["id"]) == list(range(PROMPTS))
    assert list(merged["prompt"]) == sorted(merged["prompt"])  # merge.sort_by: [prompt, id]
    assert merged["continuation"].str.len().gt(0).all()
    report = merge_summary(tmp_path, "generate")
    assert report["total_rows"] == PROMPTS
    assert [s["rows"] for s in report["shards"]] == [400, 400, 400]
    assert report["missing_ranges"] == [] and report["duplicate_ids"] == 0
    again = cli(*args)
    assert again.code == 0, again.text
    assert attempt(tmp_path)["stages"]["generate"]["skipped"] == 3
    assert merge_summary(tmp_path, "generate") == report


@pytest.mark.usefixtures("ray_session")
def test_a_done_shard_whose_output_was_deleted_is_planned_and_run_again(
    cli, tmp_path: Path
) -> None:
    """The plan, the run's header and the run agree: only the shard whose committed output
    is gone runs again, and says why."""
    args = ("pipeline=shard_fn", f"run.dir={tmp_path}")
    assert cli(*args).code == 0
    first = shard_rows(tmp_path, "generate")
    (tmp_path / "generate" / "shards" / "shard-0001.parquet").unlink()
    plan = cli(*args, "mode=plan")
    assert plan.code == 0, plan.text
    assert re.search(r"run +1 +output missing +\[400-799\]", plan.out), plan.out
    assert re.search(r"skip +2 +done +\[0-399, 800-1199\]", plan.out), plan.out
    assert "1 unit(s) to run" in plan.out
    again = cli(*args)
    assert again.code == 0, again.text
    assert "generate: 1 unit(s) to run, 2 skipped" in again.text
    stage = attempt(tmp_path)["stages"]["generate"]
    assert (stage["done"], stage["skipped"]) == (1, 2)
    rows = shard_rows(tmp_path, "generate")
    rerun = [u for u in rows if rows[u]["result"] != first[u]["result"]]
    assert rerun == ["400-799"]
    merged = pd.read_parquet(tmp_path / "generate" / "merged.parquet")
    assert sorted(merged["id"]) == list(range(PROMPTS))
    assert merge_summary(tmp_path, "generate")["missing_ranges"] == []
    assert "skip      3  done" in cli(*args, "mode=plan").out


def test_sigkill_mid_stage_then_rerun_runs_only_unfinished_shards_and_merges_the_same(
    ray_session: str, cli, tmp_path: Path
) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process("pipeline=shard_slow", "cluster=ray", f"run.dir={killed}", env=env)
    wait_until(lambda: len(done(killed, "generate")) >= 2, timeout=60, what="2 committed shards")
    proc.kill()
    proc.communicate()
    finished = done(killed, "generate")
    assert len(finished) < 6
    wait_until(cpus_free_again, what="the killed runner's shard tasks to be gone")

    again = run_runner("pipeline=shard_slow", "cluster=ray", f"run.dir={killed}", env=env)
    assert again.code == 0, again.text
    assert attempt(killed)["stages"]["generate"]["skipped"] >= len(finished)
    rows = shard_rows(killed, "generate")
    assert all(rows[u]["attempts"] == 1 for u in finished)  # never run again
    assert cli("pipeline=shard_slow", f"run.dir={clean}").code == 0
    resumed = pd.read_csv(killed / "generate" / "merged.csv")
    pd.testing.assert_frame_equal(resumed, pd.read_csv(clean / "generate" / "merged.csv"))
    assert len(resumed) == PROMPTS and resumed["id"].is_unique


@pytest.mark.usefixtures("ray_session")
def test_a_spec_needing_more_gpus_than_the_cluster_has_stops_at_plan(cli, tmp_path) -> None:
    res = cli("pipeline=shard_copy", f"run.dir={tmp_path}", "pipeline.stages.copy.gpus_per_shard=8")
    assert res.code == 2
    assert (
        "pipeline.stages.copy.gpus_per_shard: each shard needs 8 GPU(s); "
        "the largest node has 4 GPU(s)" in res.err
    )


def test_bad_shard_specs_exit_2_naming_every_problem(cli) -> None:
    res = cli("pipeline=shard_bad")
    assert res.code == 2
    spec = "tests/specs/pipeline/shard_bad.yaml: pipeline.stages.gen"
    for message in (
        f"{spec}.id_column: = 'idx': no such column in {TEST_SPECS}/data/continuation/prompts.csv; "
        "did you mean 'id'? (columns: id, prompt)",
        f"{spec}.command: = '--out={{outptu}}': unknown placeholder {{outptu}}; did you mean "
        "'output'? (allowed: {input}, {output}, {output_dir}, {low}, {high}, {last}, {gpus}, "
        "{shard}, {done})",
        f"{spec}.command: the command never names {{output}} or {{output_dir}}",
        f"{spec}.outputs: = 'all': not one of one_per_id, subset, any",
        f"{spec}.merge.order: unknown key (allowed: sort_by, format)",
        f"{spec}.merge.format: = 'xlsx': not one of parquet, csv",
        f"{spec}.gpus_per_shard: = 1.5: above 1, GPUs per shard must be a whole number",
    ):
        assert message in res.err, message
    assert "Traceback" not in res.err


def test_a_missing_input_and_two_kinds_of_work_exit_2(cli) -> None:
    res = cli("pipeline=shard_bad_input")
    assert res.code == 2
    spec = "tests/specs/pipeline/shard_bad_input.yaml: pipeline.stages.gen"
    assert (
        f"{spec}.input: = '{TEST_SPECS}/data/continuation/no_such_prompts.csv': no such file\n"
        in res.err
    )
    assert f"{spec}.command: give exactly one of `command` (an argv list) or `fn`" in res.err
    assert (
        f"{spec}.fn._target_: = 'runner.examples.continuation.no_such_function': cannot import"
        in res.err
    )


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions `text` (to see that none is left)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_sigterm_cancels_running_shards_and_leaves_no_command_and_no_half_output(
    ray_session: str, tmp_path: Path
) -> None:
    proc = runner_process(
        "pipeline=shard_slow",
        "cluster=ray",
        f"run.dir={tmp_path}",
        env={"RAY_ADDRESS": ray_session},
    )
    logs = tmp_path / "generate" / "shards"
    wait_until(
        lambda: any("50/" in p.read_text() for p in logs.glob("*.log")),
        timeout=60,
        what="a shard command half way through its range",
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    rows = shard_rows(tmp_path, "generate")
    assert "cancelled" in {r["state"] for r in rows.values()}
    assert len(list(logs.glob("*.manifest.json"))) == len(done(tmp_path, "generate"))
    wait_until(lambda: not processes_naming(str(logs)), what="every shard command to be gone")
    wait_until(cpus_free_again, what="every shard task to be gone")


@pytest.mark.usefixtures("ray_session")
def test_the_continuation_example_runs_on_cpu(cli, tmp_path: Path) -> None:
    res = cli("pipeline=continuation", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    merged = pd.read_csv(tmp_path / "generate" / "merged.csv")
    assert list(merged["id"]) == list(range(PROMPTS))
    assert merged["continuation"].notna().all()
    assert "[shard 0-299] continuing 300 prompt(s), 0 already done; GPUs: none" in res.out


TOKENS = 4  # tokens per sample in the stand-in's input


def r2r_input(tmp_path: Path, ids: int = 1000) -> tuple[Path, list[tuple[int, int]]]:
    """R2R's step-1 output: for each token of each sample its prediction against its label
    (a `data_id` per token); returns the mismatched (data_id, token)s, which step 2 continues
    one row each."""
    data = tmp_path / "prediction_comparison.csv"
    pairs = [(i, t) for i in range(ids) for t in range(TOKENS)]
    frame = pd.DataFrame(
        {
            "data_id": [i for i, _ in pairs],
            "token": [t for _, t in pairs],
            "prediction": [(i * (t + 1)) % 3 for i, t in pairs],
            "label": [(i + t) % 3 for i, t in pairs],
        }
    )
    frame.to_csv(data, index=False)
    return data, [(i, t) for i, t in pairs if (i * (t + 1)) % 3 != (i + t) % 3]


def r2r_args(tmp_path: Path, data: Path, *more: str) -> tuple[str, ...]:
    """The stand-in's pipeline on `data`, run in `tmp_path/run`."""
    return (
        "pipeline=shard_r2r",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.continuation.input={data}",
        *more,
    )


@pytest.mark.usefixtures("ray_session")
def test_r2r_step_2_runs_unchanged_through_a_shard_stage(cli, tmp_path: Path) -> None:
    data, mismatches = r2r_input(tmp_path)
    assert len({i for i, _ in mismatches}) < len(mismatches)  # samples with several mismatches
    args = r2r_args(tmp_path, data)
    res = cli(*args)
    assert res.code == 0, res.text
    assert "[shard 0-249] [INFO] Task range: data_id [0, 250) (250 samples)" in res.out
    assert "[shard 750-999] [INFO] Task range: data_id [750, 1000) (250 samples)" in res.out
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sorted(calls, key=lambda c: int(c.split()[0])) == [
        "0 250",
        "250 500",
        "500 750",
        "750 1000",
    ]

    merged = pd.read_csv(tmp_path / "run" / "continuation" / "merged.csv")
    # every mismatched token once, a sample's tokens in the order its shard wrote them
    assert list(zip(merged["data_id"], merged["token"], strict=True)) == mismatches
    report = merge_summary(tmp_path / "run", "continuation")
    per_shard = {s["shard"]: (s["input_ids"], s["rows"]) for s in report["shards"]}
    assert per_shard == {
        label: (250, sum(low <= i < low + 250 for i, _ in mismatches))
        for label, low in (("0-249", 0), ("250-499", 250), ("500-749", 500), ("750-999", 750))
    }
    assert report["duplicate_ids"] == 0 and report["missing_ranges"] == []

    again = cli(*args)
    assert again.code == 0, again.text
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 4  # called zero times


@pytest.mark.usefixtures("ray_session")
def test_an_id_outside_its_shards_range_is_still_refused(cli, tmp_path: Path) -> None:
    data, mismatches = r2r_input(tmp_path, ids=100)
    low_0 = "pipeline.stages.continuation.command.7='0'"  # the second shard from 0 too
    res = cli(*r2r_args(tmp_path, data, "pipeline.stages.continuation.num_shards=2", low_0))
    assert res.code == 1
    below = [i for i, _ in mismatches if i < 50]
    sample = ", ".join(map(str, list(dict.fromkeys(below))[:5]))
    assert f"its output has {len(below)} row(s) with ids outside 50..99: {sample}" in res.text
    assert done(tmp_path / "run", "continuation") == {"0-49"}


@pytest.mark.usefixtures("ray_session")
def test_one_per_id_rejects_an_output_of_only_mismatches(cli, tmp_path: Path) -> None:
    data, mismatches = r2r_input(tmp_path, ids=100)
    one = "+pipeline.stages.continuation.outputs=one_per_id"
    res = cli(*r2r_args(tmp_path, data, "pipeline.stages.continuation.num_shards=1", one))
    assert res.code == 1
    assert f"its output has {len(mismatches)} row(s); its input range has {100 * TOKENS}" in (
        res.text
    )


def test_the_merge_reports_an_id_two_shards_wrote_not_one_a_shard_repeats(
    tmp_path: Path,
) -> None:
    shards = []
    for n, ids in enumerate(([0, 0, 1, 2, 2, 2], [2, 3, 3])):  # id 2: in both shards
        output, manifest = tmp_path / f"shard-{n}.csv", tmp_path / f"shard-{n}.manifest.json"
        pd.DataFrame({"data_id": ids, "token": range(len(ids))}).to_csv(output, index=False)
        manifest.write_text(json.dumps({"fingerprint": f"f{n}", "input_ids": 2}))
        shards.append(Committed(f"shard {n}", f"f{n}", output, manifest))
    report = merge(shards, "data_id", ["data_id"], tmp_path / "merged.csv")
    assert report["duplicate_ids"] == 1 and report["duplicate_id_sample"] == [2]
    merged = pd.read_csv(tmp_path / "merged.csv")
    assert list(zip(merged["data_id"], merged["token"], strict=True)) == [
        (0, 0), (0, 1), (1, 2), (2, 3), (2, 4), (2, 5), (2, 0), (3, 1), (3, 2)
    ]  # fmt: skip


def test_high_past_non_integer_ids_is_a_plan_error_pointing_at_last(cli, tmp_path: Path) -> None:
    data = tmp_path / "names.csv"
    pd.DataFrame({"data_id": ["a", "b", "c", "d"], "prediction": 1, "label": 2}).to_csv(
        data, index=False
    )
    res = cli(
        "pipeline=shard_r2r",
        f"run.dir={tmp_path / 'run'}",
        f"pipeline.stages.continuation.input={data}",
        "mode=plan",
    )
    assert res.code == 2
    assert (
        "pipeline.stages.continuation.command: {high} is the first id after a shard's range "
        "([{low}, {high}), half-open), but the ids in 'data_id' are not integers, so the last "
        "shard ('d'..'d') has none: use {last}, the last id of the range (included)"
    ) in res.err
    assert "Traceback" not in res.err
