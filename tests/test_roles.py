"""The roles stage on a real Ray (2 CPUs): priorities, preemption, restore, cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from runner import procs, spans
from runner.stages.roles import checks as roles_checks
from runner.store import read_ledger
from tests.conftest import (
    RLHF_ROLLOUT_STEPS,
    RLHF_UNHURRIED,
    cpus_free_again,
    embedded_runner,
    run_runner,
    runner_process,
    summary,
    wait_until,
)
from tests.test_metrics import free_port, scrape


def events(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    lines = (run_dir / stage / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def first(evs: list[dict[str, Any]], unit: str, what: str) -> dict[str, Any]:
    return next(e for e in evs if e["unit"] == unit and e["event"] == what)


def ledger(run_dir: Path, stage: str) -> dict[str, tuple[str, Any]]:
    db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT unit, state, result FROM units WHERE stage=?", (stage,)).fetchall()
    db.close()
    return {u: (s, json.loads(r) if r else None) for u, s, r in rows}


def groups_left() -> list[str]:
    """Placement groups of the session's Ray that are not removed."""
    import ray

    table = ray.util.placement_group_table()
    return [pg for pg, info in table.items() if info["state"] != "REMOVED"]


def no_groups_left() -> bool:
    return not groups_left()


def test_the_rlhf_example_preempts_by_the_rules_and_every_victim_finishes(
    ray_session: str, cli, tmp_path: Path
) -> None:
    res = cli("pipeline=rlhf", f"run.dir={tmp_path}", *RLHF_UNHURRIED)
    assert res.code == 0, res.text
    assert "autoscale_to_cluster: resources scaled by 0.25" in res.err
    assert "rlhf: preemptions: label 1, same_pool 1, cross_pool 0; requeues 2;" in res.out
    assert "mean wait by priority 10: " in res.out

    stage = summary(tmp_path)["stages"]["rlhf"]
    assert stage["done"] == 5
    assert stage["preemptions"] == {"label": 1, "same_pool": 1, "cross_pool": 0}
    assert stage["requeues"] == 2
    assert set(stage["waiting_s_by_priority"]) == {"1", "4", "5", "10"}

    evs = events(tmp_path, "rlhf")
    train_running = first(evs, "train/0", "running")["t"]
    rollouts_done = [e["t"] for e in evs if e["role"] == "rollout" and e["event"] == "done"]
    assert train_running < min(rollouts_done)  # train never waited for rollouts to finish
    reasons = {e["unit"]: e["reason"] for e in evs if e["event"] == "preempt requested"}
    assert sorted(reasons.values()) == ["label", "same_pool"]
    for unit in reasons:
        stopped = first(evs, unit, "stopped")
        assert stopped["saved"] is True
        back = [e for e in evs if e["unit"] == unit and e["event"] == "running"]
        assert [e["restored"] for e in back] == [False, True]
        assert stopped["t"] <= back[1]["t"]

    rows = ledger(tmp_path, "rlhf")
    assert {s for s, _ in rows.values()} == {"done"}
    for unit in reasons:
        result = rows[unit][1]
        assert result["steps"] == RLHF_ROLLOUT_STEPS  # finished every step after its restore
        assert result["preemptions"] == 1
        assert (
            len(result["restored_from"]) == 1
            and 0 < result["restored_from"][0] < RLHF_ROLLOUT_STEPS
        )

    # what the timeline, the trace and the report draw: each preempted attempt and its mark
    drawn = read_ledger(tmp_path)
    assert drawn is not None
    view = spans.read(drawn)
    preempted = {s.unit for s in view.slices if s.state == "preempted"}
    assert preempted <= set(reasons)
    assert sorted(m.unit for m in view.moments if m.kind == "preempted") == sorted(reasons)
    assert (tmp_path / "timeline.png").exists()
    # a replica is one lane on its node, its preempted attempt on it too (not a second node
    # named after the host, with a second lane of the same name)
    trace = json.loads((tmp_path / "trace.json").read_text())
    lanes = [e["args"]["name"] for e in trace if e["name"] == "thread_name"]
    assert sorted(lanes) == sorted(f"rlhf/{unit}" for unit in rows)
    nodes = [e["args"]["name"] for e in trace if e["name"] == "process_name"]
    assert len([n for n in nodes if n.startswith("Node ")]) == 1, nodes

    wait_until(no_groups_left, what="every placement group to be removed")
    wait_until(cpus_free_again, what="every role actor to be gone")
    again = cli("pipeline=rlhf", f"run.dir={tmp_path}", *RLHF_UNHURRIED, "mode=plan")
    assert "skip      5  done" in again.out


def test_a_stopped_rollout_drops_its_step_at_once_and_train_finishes_its_own() -> None:
    """What a victim's host answers when asked to stop mid-step (no Ray: the host is what runs
    in the replica's actor): a rollout cuts its step short (`ctx.wait`) and keeps the steps it
    finished; train finishes the step it is in (its 3 s step is long enough for the stop to
    come within it, a rollout's minute-long one shows it was cut short)."""
    from runner.stages.roles.host import RoleContext, RoleHost

    class Watched(RoleContext):
        looked = threading.Event()  # the run looked at `cancelled`: its first step is next

        @property
        def cancelled(self) -> bool:
            cancelled = super().cancelled
            self.looked.set()
            return cancelled

    def stopped_in_first_step(target: str, step_seconds: float) -> dict[str, Any]:
        actor = {"_target_": f"runner.examples.rlhf.{target}", "step_seconds": step_seconds}
        host = RoleHost(actor, target.lower(), 0, steps=3)
        host.ctx = ctx = Watched(target.lower(), 0, 3, host._flag)
        ctx.looked = threading.Event()
        replies: list[dict[str, Any]] = []
        worker = threading.Thread(target=lambda: replies.append(dict(host.run(None))))
        worker.start()
        assert ctx.looked.wait(timeout=30)
        host.cancel()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"{target} did not stop"
        return replies[0]

    rollout = stopped_in_first_step("Rollout", 60)
    assert rollout["cancelled"] is True
    assert rollout["state"] == {"step": 0, "restored_from": []}  # the dropped step is not kept
    train = stopped_in_first_step("Train", 3)
    assert train["cancelled"] is True and train["state"]["step"] == 1  # its step finished


def test_a_victim_that_ignores_cancel_is_killed_after_cancel_timeout_and_still_resumes(
    ray_session: str, cli, tmp_path: Path
) -> None:
    res = cli("pipeline=roles_stubborn", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    evs = events(tmp_path, "work")
    asked = first(evs, "rollout/0", "preempt requested")
    killed = first(evs, "rollout/0", "killed after cancel_timeout")
    assert asked["reason"] == "label"
    assert killed["t"] - asked["t"] >= 1.0  # cancel_timeout: 1, recorded, not timed here
    assert killed["saved"] is True  # state() was still asked for before the kill
    assert first(evs, "train/0", "running")["t"] > killed["t"]
    result = ledger(tmp_path, "work")["rollout/0"]
    assert result[0] == "done"
    # resumed from what state() said at the kill: some steps in, not from scratch and not done
    # (how many depends on the machine's speed, so no exact count)
    assert result[1]["steps"] == 25 and 0 < result[1]["restored_from"][0] < 25
    wait_until(no_groups_left, what="every placement group to be removed")


def test_a_role_whose_actor_cannot_be_built_fails_after_three_tries_naming_why(
    ray_session: str, cli, tmp_path: Path
) -> None:
    """Its constructor raises in every try, before the replica ever runs: such a try spends no
    retry, and once was tried for ever; the role that waits on it is named after the cause."""
    actor = "pipeline.stages.work.roles.rollout.actor"
    res = cli(
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        f"{actor}._target_=tests.workers.BrokenInit",
        f"~{actor}.step_seconds",
        f"~{actor}.ignore_cancel",
    )
    assert res.code == 1, res.text
    assert res.text.count("rollout/0 failed before it started") == 2
    assert ("work: 1 replica(s) did not complete: rollout/0 (its Ray worker died on ") in res.text
    assert (
        "FileNotFoundError: model.bin not found (before it started, 3 time(s))); "
        "1 replica(s) can never start: train/0"
    ) in res.text
    wait_until(no_groups_left, what="every placement group to be removed")


def saved_step(run_dir: Path, unit: str) -> int | None:
    """The step a preempted replica saved, as its ledger row keeps it (None: nothing yet)."""
    state, result = ledger_or_empty(run_dir).get(unit, ("", None))
    if state == "done" or not isinstance(result, dict) or "saved_state" not in result:
        return None
    return int(result["saved_state"]["step"])


def test_a_preempted_replicas_state_survives_a_sigkilled_runner(
    ray_session: str, tmp_path: Path
) -> None:
    args = (
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.roles.train.actor.step_seconds=1",  # the victim waits 5 s
        "cluster=ray",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(
        lambda: saved_step(tmp_path, "rollout/0") is not None,
        timeout=90,
        what="a preempted rollout with its state in the ledger",
    )
    proc.kill()
    proc.communicate()
    step = saved_step(tmp_path, "rollout/0")
    assert step is not None and step > 0
    wait_until(no_groups_left, what="the killed runner's placement groups to be removed")
    wait_until(cpus_free_again, what="the killed runner's actors to be gone")

    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    assert "work: rollout/0 resumes from the state it saved last time" in again.err
    state, result = ledger(tmp_path, "work")["rollout/0"]
    assert state == "done"
    assert result["steps"] == 25 and result["restored_from"][0] == step


def test_ctrl_c_leaves_no_actor_and_no_placement_group(ray_session: str, tmp_path: Path) -> None:
    args = (
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.roles.rollout.steps=100000",
        "cluster=ray",
    )
    proc = runner_process(*args, env={"RAY_ADDRESS": ray_session})
    wait_until(
        lambda: "running" in {s for s, _ in ledger_or_empty(tmp_path).values()},
        timeout=90,
        what="a running replica",
    )
    assert groups_left()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    wait_until(no_groups_left, what="every placement group to be removed")
    wait_until(cpus_free_again, what="every role actor to be gone")
    status = run_runner("pipeline=roles_stubborn", f"run.dir={tmp_path}", "mode=status")
    assert "cancelled" in status.out


@pytest.mark.parametrize("ignore_cancel", [False, True], ids=["stops", "stubborn"])
def test_ctrl_c_keeps_a_replicas_state_and_the_rerun_resumes_from_it(
    ray_session: str, tmp_path: Path, ignore_cancel: bool
) -> None:
    """What a replica's state() says when Ctrl-C stops it (in its stop reply, or asked once
    more before a stubborn one is killed after cancel_timeout) is kept, as a preempted one's."""
    args = (
        "pipeline=roles_stubborn",
        f"run.dir={tmp_path}",
        "~pipeline.stages.work.roles.train",
        "pipeline.stages.work.roles.rollout.steps=200",
        "pipeline.stages.work.roles.rollout.actor.step_seconds=0.05",
        f"pipeline.stages.work.roles.rollout.actor.ignore_cancel={ignore_cancel}",
        "cluster=ray",
    )
    env = {"RAY_ADDRESS": ray_session}
    proc = runner_process(*args, env=env)
    wait_until(
        lambda: ledger_or_empty(tmp_path).get("rollout/0", ("",))[0] == "running",
        timeout=90,
        what="the rollout running",
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    step = saved_step(tmp_path, "rollout/0")
    assert step is not None  # how far it got depends on the machine's speed
    wait_until(cpus_free_again, what="the rollout's actor to be gone")

    again = run_runner(*args, env=env)
    assert again.code == 0, again.text
    assert "work: rollout/0 resumes from the state it saved last time" in again.err
    state, result = ledger(tmp_path, "work")["rollout/0"]
    assert state == "done"
    assert result["steps"] == 200 and result["restored_from"] == [step]


def ledger_or_empty(run_dir: Path, stage: str = "work") -> dict[str, tuple[str, Any]]:
    try:
        return ledger(run_dir, stage)
    except sqlite3.Error:
        return {}


def test_a_group_larger_than_any_node_is_a_plan_error(ray_session: str, cli, tmp_path) -> None:
    res = cli(
        "pipeline=rlhf",
        f"run.dir={tmp_path}",
        "pipeline.stages.rlhf.autoscale_to_cluster=false",
        "mode=plan",
    )
    assert res.code == 2
    assert "plan cannot run on this cluster" in res.err
    assert "one train replica needs 4 CPU, more than any node has: 4 CPUs wanted, 2 available" in (
        res.err
    )


def test_every_mistake_in_a_roles_stage_is_reported_at_once(cli) -> None:
    res = cli("pipeline=roles_bad", "mode=plan")
    assert res.code == 2
    expected = [
        "pipeline.stages.rl.roles.train.priority: = 'high': expected a number",
        "pipeline.stages.rl.roles.train.replicas: = {'min': 3, 'max': 2}: min must not exceed max",
        "pipeline.stages.rl.roles.train.pg: = 'shared': not one of reserved, dynamic",
        "pipeline.stages.rl.roles.train.start_after: = 'critic': not another role",
        "pipeline.stages.rl.roles.rollout.step: unknown key; did you mean 'steps'?",
        "pipeline.stages.rl.roles.rollout.resources.tpus: unknown key",
        "pipeline.stages.rl.pg_pool.max_dynamic_pgs: = -1: expected an integer >= 0",
        "pipeline.stages.rl.pg_pool.reserved[0].role: = 'critic': no such role",
        "pipeline.stages.rl.preemption.aggressiveness: = 'extreme': not one of high, medium, low",
        "pipeline.stages.rl.preemption.label_rules: = {'role': 'train'}: expected",
        "module 'runner.examples.rlhf' has no attribute 'Trainer'; did you mean 'Train'?",
    ]
    for line in expected:
        assert line in res.err
    assert "invalid spec (11 problems)" in res.err
    assert "Traceback" not in res.err


@pytest.mark.parametrize("spec", ["rlhf", "rlhf_large"])
def test_the_shipped_role_specs_are_valid(cli, spec: str) -> None:
    res = cli(f"pipeline={spec}", "cluster=sim", "mode=plan")
    assert res.code == 0, res.text


def test_a_reserved_group_holding_what_the_role_it_waits_on_needs_is_a_plan_error(
    ray_session: str, cli
) -> None:
    result = cli("pipeline=roles_deadlock", "mode=plan")
    assert result.code == 2
    assert (
        "pipeline.stages.work.roles.train.start_after: train waits for rollout to run, but the "
        "reserved groups (for train) hold 2 CPU from the start and rollout needs 1 CPU: 1 CPUs "
        "wanted, 0 available; the stage could never finish "
        "(cycle: train → rollout → reserved groups → train)"
    ) in result.err


def test_no_dynamic_groups_for_a_role_no_reserved_group_serves_is_a_plan_error(cli) -> None:
    """`max_dynamic_pgs: 0` with groups on: a dynamic role's replicas would wait for a group
    for ever (the run hung at `1/5`); a role a reserved group serves runs in it."""
    res = cli("pipeline=rlhf", "cluster=sim", "pipeline.stages.rlhf.pg_pool.max_dynamic_pgs=0")
    assert res.code == 2, res.text
    assert (
        "pipeline.stages.rlhf.pg_pool.max_dynamic_pgs: = 0: no reserved group serves "
        "rollout, train, rollout_burst (pg: dynamic), whose replicas would wait for a placement "
        "group for ever; give max_dynamic_pgs >= 1, or enable_dynamic_pgs: false to run them "
        "without groups"
    ) in res.err
    alone = cli(
        "pipeline=rlhf",
        "cluster=sim",
        "pipeline.stages.rlhf.pg_pool.max_dynamic_pgs=0",
        "pipeline.stages.rlhf.pg_pool.enable_dynamic_pgs=false",
    )
    assert alone.code == 0, alone.text


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("pipeline.stages.rlhf.roles.train.estimated_duration=25", "run       5  new"),
        ("pipeline.stages.rlhf.roles.train.ray_options={name: trainer}", "run       5  new"),
        ("pipeline.stages.rlhf.pg_pool.enable_dynamic_pgs=false", "enable_dynamic_pgs is false"),
        ("pipeline.stages.rlhf.preemption.enable_label_preemption=false", "run       5  new"),
    ],
)
def test_a_roles_key_the_yaml_leaves_out_is_overridden_as_key_value(
    cli, override: str, said: str
) -> None:
    """A role's, the pool's, `pg_pool`'s and `preemption`'s keys are documented keys: set on
    the command line as any other key is (they were 'unknown key', with a list of 'allowed'
    keys that left them out)."""
    res = cli("pipeline=rlhf", "cluster=sim", "mode=plan", override)
    assert res.code == 0, res.text
    assert said in res.out


def test_a_misspelt_roles_key_names_the_keys_the_mapping_takes(cli) -> None:
    res = cli("pipeline=rlhf", "mode=plan", "pipeline.stages.rlhf.roles.train.estimated_duraton=2")
    assert res.code == 2, res.text
    allowed = ", ".join(roles_checks.ROLE_KEYS)
    key = "pipeline.stages.rlhf.roles.train.estimated_duraton"
    said = f"{key}: unknown key; did you mean 'estimated_duration'? (allowed: {allowed}) (RUNNER"
    assert said in res.err and "adds it" not in res.err


SIM_8_CPUS = ("pipeline=rlhf", "cluster=sim", "pipeline.stages.rlhf.autoscale_to_cluster=false")


@pytest.mark.parametrize(
    ("train_memory", "node_gb", "error"),
    [
        pytest.param("8G", 16, None, id="8G_fits"),
        pytest.param(
            "9G",
            16,
            "pipeline.stages.rlhf.roles.train: one replica needs 4 CPU, 9G mem, more than the "
            "pool quota: 9G memory wanted, 8G available",
            id="over_a_quota_of_8192_MB",
        ),
        pytest.param(
            "8192",
            4,
            "one train replica needs 4 CPU, 8G mem, more than any node has: "
            "8G memory wanted, 4G available on the largest node",
            id="a_plain_number_is_megabytes",
        ),
    ],
)
def test_memory_of_quotas_and_roles_reads_like_a_jobs(
    cli, train_memory: str, node_gb: int, error: str | None
) -> None:
    res = cli(
        *SIM_8_CPUS,
        f"cluster.nodes=[{{cpus: 8, memory: {node_gb}}}]",
        "+pipeline.stages.rlhf.pool.resources.memory=8192",  # ScheduleMesh's ensure_pool: MB
        f"+pipeline.stages.rlhf.roles.train.resources.memory={train_memory}",
        "mode=plan",
    )
    if error is None:
        assert res.code == 0, res.text
    else:
        assert res.code == 2
        assert error in res.err


def test_a_pool_quota_limits_only_what_it_names(cli) -> None:
    """The rlhf example's quota, `{cpus: 8}`, says nothing of memory or GPUs: a train that asks
    for them runs as it did without them (it was '0M available', '0 GPU' of the quota)."""
    res = cli(
        *SIM_8_CPUS,
        "cluster.nodes=[{cpus: 8, gpus: 1, memory: 16}]",
        "+pipeline.stages.rlhf.roles.train.resources.memory=4G",
        "+pipeline.stages.rlhf.roles.train.resources.gpus=1",
    )
    assert res.code == 0, res.text
    assert "preemptions: label 1, same_pool 1, cross_pool 0; requeues 2" in res.out


def test_bad_memory_and_aggressiveness_name_the_key_and_what_is_allowed(cli) -> None:
    res = cli(
        *SIM_8_CPUS,
        "+pipeline.stages.rlhf.roles.train.resources.memory=lots",
        "+pipeline.stages.rlhf.pool.resources.memory=3G",
        "+pipeline.stages.rlhf.pool.resources.memory_gb=3",
        "pipeline.stages.rlhf.preemption.aggressiveness=extreme",
        "+pipeline.stages.rlhf.preemption.enable_label_preemption=sometimes",
        "mode=plan",
    )
    assert res.code == 2
    for line in [
        "pipeline.stages.rlhf.roles.train.resources.memory: = 'lots': expected a size such as "
        "512M or 8G (K, M, G, T; a plain number is megabytes)",
        "pipeline.stages.rlhf.pool.resources.memory_gb: give memory (8G; a plain number is MB) "
        "or memory_gb",
        "pipeline.stages.rlhf.preemption.aggressiveness: = 'extreme': not one of high, medium, "
        "low (or ScheduleMesh's aliases: urgent, prod, critical,",
        "pipeline.stages.rlhf.preemption.enable_label_preemption: = 'sometimes': expected true "
        "or false",
    ]:
        assert line in res.err
    assert "Traceback" not in res.err


@pytest.mark.parametrize(
    ("override", "counts"),
    [
        pytest.param(
            "pipeline.stages.rlhf.preemption.aggressiveness=batch",
            "label 1, same_pool 1, cross_pool 0",
            id="schedulemesh_alias",
        ),
        pytest.param(
            "+pipeline.stages.rlhf.preemption.enable_label_preemption=false",
            "label 0, same_pool 2, cross_pool 0",
            id="label_rules_off_train_preempts_by_priority_gap",
        ),
    ],
)
def test_schedulemesh_switches_in_a_spec(cli, override: str, counts: str) -> None:
    res = cli("pipeline=rlhf", "cluster=sim", "cluster.nodes=[{cpus: 2}]", override)
    assert res.code == 0, res.text
    line = next(ln for ln in res.out.splitlines() if ln.startswith("stage rlhf"))
    assert f"preemptions: {counts}" in line


def test_what_a_victim_frees_goes_to_the_request_that_evicted_it(
    ray_session: str, cli, tmp_path: Path
) -> None:
    """Two stubborn rollouts fill the 2 CPUs; train (a label rule) evicts one, which is killed
    after its cancel_timeout; reward (priority 1.5, no rule, a gap below medium's 1.0) arrives
    while the victim is still stopping. The victim's group is parked for reuse as it is killed:
    it is train's, not reward's, so one eviction in all and train is admitted first."""
    res = cli("pipeline=roles_steal", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    assert "rl: preemptions: label 1, same_pool 0, cross_pool 0; requeues 1;" in res.out
    evs = events(tmp_path, "rl")
    assert len([e for e in evs if e["event"] == "preempt requested"]) == 1
    assert first(evs, "train/0", "admitted")["t"] < first(evs, "reward/0", "admitted")["t"]
    assert {s for s, _ in ledger(tmp_path, "rl").values()} == {"done"}


def test_sigterm_to_the_rlhf_examples_process_group_ends_it_cleanly(tmp_path: Path) -> None:
    """What `timeout -s TERM` and Slurm do to the shipped example, with its reserved group:
    exit 143 (not a minute's stall on a GCS that is gone), the ledger true, nothing left."""
    args = (
        "pipeline=rlhf",
        f"run.dir={tmp_path}",
        "cluster.num_cpus=2",
        "pipeline.stages.rlhf.roles.rollout.steps=600",
        "pipeline.stages.rlhf.roles.train.steps=300",
    )
    with embedded_runner(*args, config_dir=None) as proc:
        wait_until(
            lambda: "running" in {s for s, _ in ledger_or_empty(tmp_path, "rlhf").values()},
            timeout=90,
            what="a running replica",
        )
        family = [(p, procs.start_time(p)) for p in procs.descendants(proc.pid)]
        os.killpg(proc.pid, signal.SIGTERM)
        # a bound against the stall (Ray's 60 s reconnect), not a timing claim
        out, err = proc.communicate(timeout=40)
    assert proc.returncode == 143, out + err
    assert "Failed to connect to GCS" not in err
    assert "running" not in {s for s, _ in ledger(tmp_path, "rlhf").values()}
    wait_until(
        lambda: not any(procs.running(p, t) for p, t in family),
        timeout=20,
        what="every process of the run to be gone",
    )


@pytest.mark.parametrize(
    ("overrides", "preempted"),
    [
        pytest.param((), True, id="train_preempts_the_reserved_group_holder"),
        pytest.param(
            (
                "~pipeline.stages.rl.preemption.label_rules",
                "pipeline.stages.rl.roles.train.priority=5",
                "pipeline.stages.rl.roles.train.start_after=0",
                "pipeline.stages.rl.roles.reward.steps=5",
            ),
            False,
            id="no_rule_so_train_runs_once_reward_ended_and_its_group_went_back",
        ),
    ],
)
def test_a_reserved_group_never_keeps_a_later_role_waiting_for_ever(
    ray_session: str, cli, tmp_path: Path, overrides: tuple[str, ...], preempted: bool
) -> None:
    """ScheduleMesh's scenario 3 on 2 CPUs: reward runs in a reserved group of 1 CPU; train
    needs both CPUs. With its label rule train preempts reward (a reserved-group replica is a
    victim like any other) and reward comes back in a group reserved again; with no rule,
    train waits for reward to end, and its group goes back to the pool then."""
    res = cli("pipeline=roles_reserved_hold", f"run.dir={tmp_path}", *overrides)
    assert res.code == 0, res.text
    rows = ledger(tmp_path, "rl")
    assert {u: s for u, (s, _) in rows.items()} == {"reward/0": "done", "train/0": "done"}
    evs = events(tmp_path, "rl")
    if preempted:
        assert first(evs, "reward/0", "preempt requested")["reason"] == "label"
        assert first(evs, "train/0", "running")["t"] < first(evs, "reward/0", "done")["t"]
        restored = [
            e["restored"] for e in evs if e["unit"] == "reward/0" and e["event"] == "running"
        ]
        assert restored == [False, True]
        assert rows["reward/0"][1]["steps"] == 30
    else:
        assert "reserved group 1 CPU for reward released: no replica left to use it" in res.err
        assert not [e for e in evs if e["event"] == "preempt requested"]
        assert first(evs, "train/0", "running")["t"] > first(evs, "reward/0", "done")["t"]
    wait_until(no_groups_left, what="every placement group to be removed")


@pytest.mark.parametrize(
    ("overrides", "started", "preemptions"),
    [
        ((), "rl/reward/0, rl/train/0, rl/reward/0", "label 1"),
        (
            (
                "~pipeline.stages.rl.preemption.label_rules",
                "pipeline.stages.rl.roles.train.priority=5",
                "pipeline.stages.rl.roles.train.start_after=0",
                "pipeline.stages.rl.roles.reward.steps=5",
            ),
            "rl/reward/0, rl/train/0",
            "label 0",
        ),
    ],
    ids=["train_preempts_the_holder", "train_waits_for_the_group_to_go_back"],
)
def test_the_simulated_cluster_runs_the_reserved_group_scenario_as_ray_does(
    cli, overrides: tuple[str, ...], started: str, preemptions: str
) -> None:
    """`cluster=sim` is the same loop and the same roles code: both replicas run, in the real
    run's order, with its preemptions (it used to end with 1 of 2 replicas admitted)."""
    res = cli(
        "pipeline=roles_reserved_hold", "cluster=sim", "cluster.nodes=[{cpus: 2}]", *overrides
    )
    assert res.code == 0, res.text
    assert f"units in the order they started: {started}\n" in res.out
    assert "stage rl (roles): 2 replica(s)," in res.out
    assert f"preemptions: {preemptions}, same_pool 0, cross_pool 0" in res.out
    assert "reserved group 1 CPU for reward released: no replica left to use it" in res.err


def test_the_plan_says_what_holds_what_a_role_needs(cli) -> None:
    res = cli("pipeline=roles_reserved_hold", "mode=plan")
    assert res.code == 0, res.text
    assert (
        "rl: train (2 CPU) does not fit beside the reserved groups (1 CPU for reward): it runs "
        "once their roles have no replica left to run or sooner by preempting reward (label rule)"
    ) in res.out


def test_max_dynamic_pgs_holds_replicas_take_turns_in_the_groups_allowed(
    ray_session: str, cli, tmp_path: Path
) -> None:
    """Six replicas of dynamic roles, room for four at once, one dynamic group allowed: every
    admission runs in a placement group (none runs without one), and one group is ever made."""
    res = cli("pipeline=roles_pg_cap", f"run.dir={tmp_path}")
    assert res.code == 0, res.text
    assert (
        "rl: max_dynamic_pgs 1: at most 1 of the 6 replicas of dynamic roles hold a placement "
        "group at once; the others wait for one"
    ) in res.err
    evs = events(tmp_path, "rl")
    admitted = [e["unit"] for e in evs if e["event"] == "admitted"]
    in_group = [e["unit"] for e in evs if e["event"] == "placement group"]
    assert len(admitted) == 6 and sorted(in_group) == sorted(admitted)
    stats = summary(tmp_path)["stages"]["rl"]["pg_pool_stats"]["rl"]
    assert stats["created"] == 1 and stats["peak_dynamic_in_use"] == 1 and stats["reused"] == 5
    assert {s for s, _ in ledger(tmp_path, "rl").values()} == {"done"}


def test_schedulemeshs_guide_configuration_runs_as_written_with_its_metrics(
    ray_session: str, cli, tmp_path: Path
) -> None:
    """ScheduleMesh's RLHF guide, its `configure_preemption` and `ensure_pool` blocks pasted
    with their key names (`tests/specs/pipeline/schedulemesh_guide.yaml`): the plan says what
    each key became, the run preempts by the same rules, `pg_pool_stats()`'s counts are in
    summary.json, and its four metrics are served under its names."""
    plan = cli("pipeline=schedulemesh_guide", f"run.dir={tmp_path}", "mode=plan")
    assert plan.code == 0, plan.text
    for line in (
        "rlhf: ScheduleMesh's pg_pool.high_priority_pg_specs[0] → pg_pool.reserved: a group for "
        "any role of priority >= 8",
        "rlhf: ScheduleMesh's pg_pool.enable_pg_reuse → reuse",
        "rlhf: ScheduleMesh's pool.resources: {cpu, memory} → {cpus, memory}",
        "rlhf: ScheduleMesh's preemption.label_preemption_rules → label_rules",
        "rlhf: ScheduleMesh's preemption.preemption_aggressiveness → aggressiveness",
    ):
        assert line in plan.out
    port, scrapes, done = free_port(), [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                scrapes.append(scrape(port))
            done.wait(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        res = cli(
            "pipeline=schedulemesh_guide",
            f"run.dir={tmp_path}",
            f"cluster.metrics_port={port}",
            *RLHF_UNHURRIED,  # rollout/0 still runs once train does, under load too
        )
    finally:
        done.set()
        poller.join()
    assert res.code == 0, res.text
    stage = summary(tmp_path)["stages"]["rlhf"]
    assert stage["preemptions"] == {"label": 0, "same_pool": 1, "cross_pool": 0}
    stats = stage["pg_pool_stats"]["rlhf-pg-pool"]
    assert stats["high_priority"] == 2 and stats["in_use"] == 0
    assert stats["created"] >= 3 and stats["reused"] >= 1
    evs = events(tmp_path, "rlhf")
    assert first(evs, "rollout/0", "preempt requested")["reason"] == "same_pool"
    last = next(s for s in reversed(scrapes) if "schedulemesh_preemption_count{" in s)
    assert 'schedulemesh_preemption_count{pool="rlhf-pg-pool",reason="same_pool"} 1.0' in last
    assert 'schedulemesh_preemption_count_total{pool="rlhf-pg-pool",reason="same_pool"} 1.0' in last
    for name in (
        "schedulemesh_preemption_execution_latency_ms",
        "schedulemesh_task_schedule_latency_ms",
        "schedulemesh_preemption_evaluation_latency_ms",
    ):
        assert f"# TYPE {name} histogram" in last
    assert (
        'schedulemesh_preemption_execution_latency_ms_count{pool="rlhf-pg-pool",'
        'reason="same_pool"} 1.0'
    ) in last


def test_schedulemesh_spellings_that_cannot_be_read_name_the_key_and_the_fix(cli) -> None:
    res = cli(
        *SIM_8_CPUS,
        "pipeline.stages.rlhf.preemption.aggressiveness=env:RUNNER_TEST_UNSET_LEVEL",
        "+pipeline.stages.rlhf.roles.train.ray_options.num_cpus=2",
        "+pipeline.stages.rlhf.pg_pool_config.max_dynamic_pgs=2",
        "mode=plan",
    )
    assert res.code == 2
    for line in (
        "pipeline.stages.rlhf.preemption.aggressiveness: = 'env:RUNNER_TEST_UNSET_LEVEL': "
        "$RUNNER_TEST_UNSET_LEVEL is not set",
        "pipeline.stages.rlhf.roles.train.ray_options.num_cpus: set by the runner (the grant's "
        "resources and placement): give the role's resources instead",
        "pipeline.stages.rlhf.pg_pool_config: another spelling of pg_pool: give one of them",
    ):
        assert line in res.err
    assert "Traceback" not in res.err


def test_an_aggressiveness_read_from_the_environment_is_said_in_the_plan(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_TEST_LEVEL", "urgent")
    res = cli(
        *SIM_8_CPUS,
        "pipeline.stages.rlhf.preemption.aggressiveness=env:RUNNER_TEST_LEVEL",
        "mode=plan",
    )
    assert res.code == 0, res.text
    assert (
        "rlhf: ScheduleMesh's preemption.aggressiveness 'env:RUNNER_TEST_LEVEL' → 'urgent' "
        "(from $RUNNER_TEST_LEVEL)"
    ) in res.out


def test_high_priority_groups_beside_a_reserved_that_is_not_a_list_are_named(cli) -> None:
    """ScheduleMesh's `high_priority_pg_specs` join `reserved` only when that is a list;
    otherwise both keys are named, no traceback."""
    res = cli(
        *SIM_8_CPUS,
        "pipeline.stages.rlhf.pg_pool.reserved=5",
        "+pipeline.stages.rlhf.pg_pool.high_priority_pg_specs=[{cpu: 1}]",
        "mode=plan",
    )
    assert res.code == 2, res.text
    assert "pipeline.stages.rlhf.pg_pool.reserved: = 5: expected a list of" in res.err
    assert "pipeline.stages.rlhf.pg_pool.high_priority_pg_specs: unknown key" in res.err
    assert "Traceback" not in res.err
