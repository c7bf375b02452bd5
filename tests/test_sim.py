"""The simulated cluster: the real scheduler core in virtual time, no Ray started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner.lifecycle import UnitState
from runner.measured import measure
from runner.store import LEDGER, Event, Ledger, UnitRow
from tests.conftest import RLHF_UNHURRIED

SIM_200_CPUS = ("cluster=sim", "cluster.nodes=[{cpus: 200}]")


@pytest.mark.parametrize(
    ("cpus_per_worker", "at_once"),
    [
        pytest.param("0.4", "500 ran at once (0.4 CPU each)", id="fixed_0.4_cpu"),
        pytest.param("auto", "1800 ran at once (0.1 CPU each)", id="auto"),
    ],
)
def test_the_pychecker_sizing_table_on_200_cpus(cli, cpus_per_worker: str, at_once: str) -> None:
    res = cli(
        "pipeline=roles_sizing",
        *SIM_200_CPUS,
        f"pipeline.stages.check.cpus_per_worker={cpus_per_worker}",
    )
    assert res.code == 0, res.text
    assert "simulated cluster: 1 node(s), 200 CPU" in res.out
    assert "stage check (pool): 1800 worker(s)" in res.out
    assert at_once in res.out


def test_the_plan_says_the_same_as_the_simulation(cli) -> None:
    res = cli(
        "pipeline=roles_sizing",
        *SIM_200_CPUS,
        "pipeline.stages.check.cpus_per_worker=0.4",
        "mode=plan",
    )
    assert res.code == 0, res.text
    assert "only 500 of 1800 workers fit at once" in res.out


def test_the_rlhf_demo_simulated_on_two_cpus_preempts_as_the_real_run_does(cli) -> None:
    res = cli("pipeline=rlhf", "cluster=sim", "cluster.nodes=[{cpus: 2}]")
    assert res.code == 0, res.text
    line = next(ln for ln in res.out.splitlines() if ln.startswith("stage rlhf"))
    assert "5 replica(s)" in line
    assert "preemptions: label 1, same_pool 1, cross_pool 0; requeues 2" in line


@pytest.mark.parametrize(
    ("actor", "waited", "makespan"),
    [
        # the example's Rollout drops the step it is in when stopped (`drops_step = True`)
        pytest.param("Rollout", "0s", "81.5", id="drops_its_step"),
        # Reward's class finishes its step first: its preemptor waits for the step's end
        pytest.param("Reward", "0.5s", "80.5", id="finishes_its_step"),
    ],
)
def test_a_simulated_victim_that_drops_its_step_leaves_at_once(
    cli,  # type: ignore[no-untyped-def]
    actor: str,
    waited: str,
    makespan: str,
) -> None:
    """The rlhf example on `cluster=sim` with 2 s rollout steps: train arrives mid-step and
    preempts a rollout. A rollout actor that says `drops_step` is out at once, as on Ray (its
    `ctx.wait` cut short), so train waits for nothing, and the dropped part of its step is done
    again after it is restored (the run ends a second later); one that finishes its step keeps
    train waiting until the step ends."""
    res = cli(
        "pipeline=rlhf",
        "cluster=sim",
        "cluster.nodes=[{cpus: 2}]",
        "pipeline.stages.rlhf.roles.rollout.step_time=2",
        f"pipeline.stages.rlhf.roles.rollout.actor._target_=runner.examples.rlhf.{actor}",
    )
    assert res.code == 0, res.text
    assert "preemptions: label 1, same_pool 1, cross_pool 0" in res.out
    assert f"priority 10: 2 admitted, mean wait {waited}" in res.out, res.out
    assert f"makespan from the first unit's start: {makespan} virtual seconds" in res.out


def test_64_nodes_of_8_gpus_with_thousands_of_replicas(cli) -> None:
    res = cli("pipeline=rlhf_large", "cluster=sim")
    assert res.code == 0, res.text
    assert "64 node(s), 6144 CPU, 512 GPU" in res.out
    line = next(ln for ln in res.out.splitlines() if ln.startswith("stage rlhf"))
    replicas, admitted = map(int, re.findall(r"(\d+) (?:replica\(s\)|admitted)", line))
    assert replicas > 3000
    assert admitted > replicas  # preempted replicas were admitted again
    label = int(re.search(r"label (\d+)", line).group(1))  # type: ignore[union-attr]
    assert label > 0
    assert "cross_pool 0" in line
    # the GPUs stay busy (a preemptor holds what its victims free while they stop: a little idle)
    gpu = int(re.search(r"GPU (\d+)%", res.out).group(1))  # type: ignore[union-attr]
    assert gpu >= 85, res.out
    again = cli("pipeline=rlhf_large", "cluster=sim")
    assert again.out.split("simulated in")[0] == res.out.split("simulated in")[0]  # deterministic


def test_a_pool_fed_from_another_stage_is_simulated_too(cli) -> None:
    """`numbers`: 50 items on 2 workers (25 s at a second each), then `describe`, fed `from:`
    them, 50 items on 1 worker (50 s). Its items are known only once `scale` has run; the
    simulation gives it one per upstream unit, as a real run does, instead of none."""
    res = cli("pipeline=numbers", "cluster=sim")
    assert res.code == 0, res.text
    assert stage_line(res.out, "describe").startswith(
        "stage describe (pool): 1 worker(s), 1 admitted, 1 ran at once (0.5 CPU each)"
    )
    assert "makespan from the first unit's start: 75 virtual seconds" in res.out


def test_a_group_that_can_never_fit_is_a_plan_error(cli) -> None:
    res = cli(
        "pipeline=rlhf_large", "cluster=sim", "pipeline.stages.rlhf.roles.train.resources.gpus=16"
    )
    assert res.code == 2
    assert "plan cannot run on this cluster" in res.err
    assert "one train replica needs 32 CPU, 16 GPU" in res.err


GPU_NODES_24GB = "{count: 2, cpus: 16, gpus: 8, gpu_memory_gb: 24}"


def test_shards_wanting_more_gpu_memory_than_any_simulated_node_has_cannot_run(cli) -> None:
    res = cli(
        "pipeline=continuation_gpu",
        "cluster=sim",
        f"cluster.nodes=[{GPU_NODES_24GB}]",
        "pipeline.stages.generate.min_gpu_memory_gb=80",
    )
    assert res.code == 2, res.text
    assert (
        "pipeline.stages.generate.gpus_per_shard: each shard needs 1 GPU(s) with at least 80 GB "
        "(min_gpu_memory_gb); the simulated nodes' GPUs have at most 24 GB "
        "(cluster.nodes: gpu_memory_gb)"
    ) in res.err


def test_shards_run_only_on_simulated_nodes_with_their_gpu_memory(cli) -> None:
    """8 shards of a GPU each with 40 GB: only the node of 2 80-GB GPUs takes them, 2 at a
    time (4 turns of a second), not the 8 GPUs of 24 GB beside it."""
    res = cli(
        "pipeline=continuation_gpu",
        "cluster=sim",
        "cluster.nodes=[{cpus: 16, gpus: 8, gpu_memory_gb: 24}, "
        "{cpus: 16, gpus: 2, gpu_memory_gb: 80}]",
        "pipeline.stages.generate.min_gpu_memory_gb=40",
    )
    assert res.code == 0, res.text
    assert stage_line(res.out, "generate").startswith(
        "stage generate (shard): 8 shard(s), 8 admitted, 2 ran at once"
    )
    assert "makespan from the first unit's start: 4 virtual seconds" in res.out


def test_bad_simulated_nodes_name_the_key(cli) -> None:
    res = cli("pipeline=rlhf", "cluster=sim", "cluster.nodes=[{cpu: 2}]")
    assert res.code == 2
    assert (
        "cluster.nodes[0].cpu: unknown key (allowed: count, cpus, gpus, gpu_memory_gb, memory)"
        in res.err
    )


def test_simulated_items_longer_than_step_timeout_time_out(cli) -> None:
    """pychecker's step_timeout is 3 s: items declared to take 5 s time out, as on Ray, and
    the stage fails past its max_failures (10%); at 2 s each they run."""
    slow = cli("pipeline=pychecker", "cluster=sim", "cluster.sim_unit_seconds=5")
    assert slow.code == 1, slow.text
    assert (
        "problem: check: 60 item(s) failed or timed out; max_failures allows 6; "
        "the first: p001-correct: step_timeout 3s exceeded"  # as a worker on Ray says it
    ) in slow.out
    quick = cli("pipeline=pychecker", "cluster=sim", "cluster.sim_unit_seconds=2")
    assert quick.code == 0, quick.text
    assert "makespan from the first unit's start: 30 virtual seconds" in quick.out


def test_a_fraction_of_a_simulated_node_is_refused(cli) -> None:
    res = cli("pipeline=rlhf", "cluster=sim", "cluster.nodes=[{count: 2.5, cpus: 2}]")
    assert res.code == 2
    assert "cluster.nodes[0].count: = 2.5: expected a whole number of nodes" in res.err


def test_more_simulated_nodes_than_the_simulator_takes_is_refused_at_once(cli) -> None:
    """A typo's 10^8 nodes: one message, before a list of them is made."""
    nodes = "cluster.nodes=[{count: 60000, cpus: 8}, {count: 100000000, cpus: 8}]"
    res = cli("pipeline=rlhf", "cluster=sim", nodes)
    assert res.code == 2
    expected = "cluster.nodes[1].count: = 100000000: the simulator takes at most 100,000 nodes"
    assert expected in res.err


def stage_line(out: str, stage: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(f"stage {stage} "))


@pytest.mark.parametrize(
    ("overrides", "counts"),
    [
        pytest.param(
            (), "label 1, same_pool 0, cross_pool 1", id="label_rule_across_pools_counts_as_label"
        ),
        pytest.param(
            ("pipeline.stages.serve.preemption.cross_pool=false",),
            "label 0, same_pool 0, cross_pool 0",
            id="no_cross_pool_preemption_unless_allowed",
        ),
        pytest.param(
            ("+pipeline.stages.serve.preemption.protected_pools=[batch]",),
            "label 0, same_pool 0, cross_pool 0",
            id="a_protected_pool_is_never_preempted",
        ),
    ],
)
def test_preemptions_across_pools_are_counted_by_reason(cli, overrides, counts) -> None:  # type: ignore[no-untyped-def]
    res = cli("pipeline=roles_two_pools", "cluster=sim", "cluster.nodes=[{cpus: 2}]", *overrides)
    assert res.code == 0, res.text
    assert f"preemptions: {counts}" in stage_line(res.out, "batch")
    assert "preemptions: label 0, same_pool 0, cross_pool 0" in stage_line(res.out, "serve")


def test_a_simulation_of_a_measured_run_preempts_alike_and_takes_about_as_long(
    ray_session: str,
    cli,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """`cluster.sim_durations_from` replays a real run's unit times and start-up latencies:
    the same preemptions by reason (they follow from arrival order), and a makespan near the
    real one (the band is wide here: the 15% check is a benchmark, on a quiet machine). The
    simulation, given the run's own directory, writes nothing there: `mode=status` still
    names the real attempt's config."""
    real = cli("pipeline=rlhf", f"run.dir={tmp_path}", *RLHF_UNHURRIED)
    assert real.code == 0, real.text
    (attempted,) = (tmp_path / ".hydra").glob("*/config.yaml")
    sim = cli(
        "pipeline=rlhf",
        f"run.dir={tmp_path}",
        *RLHF_UNHURRIED,
        "cluster=sim",
        "cluster.nodes=[{cpus: 2}]",
        f"cluster.sim_durations_from={tmp_path}",
    )
    assert sim.code == 0, sim.text
    assert list((tmp_path / ".hydra").glob("*/config.yaml")) == [attempted]
    status = cli(f"run.dir={tmp_path}", "mode=status")
    assert f"the last attempt's config: {attempted}" in status.out, status.text
    counts = re.search(
        r"preemptions: (label \d+, same_pool \d+, cross_pool \d+); requeues \d+", real.out
    )
    assert counts is not None, real.out
    assert f"preemptions: {counts.group(1)}" in sim.out
    span = re.search(
        r"makespan .*: ([\d.]+) virtual seconds \(the measured run: ([\d.]+)s\)", sim.out
    )
    assert span is not None, sim.out
    simulated, measured = float(span.group(1)), float(span.group(2))
    assert 0.5 * measured <= simulated <= 2 * measured


def test_a_run_directory_without_a_ledger_is_named(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = cli("pipeline=jobs", "cluster=sim", f"cluster.sim_durations_from={tmp_path}")
    assert res.code == 2
    assert f"cluster.sim_durations_from: = '{tmp_path}': no ledger there" in res.text


def test_events_run_by_time_then_in_the_order_added() -> None:
    """Many events share a time (units that start together end together): they run in the
    order they were added, after every earlier time, with those added for the time being run
    after the ones already there."""
    from runner.backends.virtual import Events

    events, ran = Events(), []

    def note(name: str, then: tuple[float, str] | None = None) -> None:
        ran.append(name)
        if then is not None:
            events.add(then[0], lambda: note(then[1]))

    events.add(2.0, lambda: note("b1", (2.0, "b3")))
    events.add(1.0, lambda: note("a1"))
    events.add(2.0, lambda: note("b2", (3.0, "c1")))
    events.add(1.0, lambda: note("a2"))
    assert events.next_time() == 1.0
    events.run_until(1.0)
    assert ran == ["a1", "a2"] and events.next_time() == 2.0
    events.run_until(2.0)
    assert ran == ["a1", "a2", "b1", "b2", "b3"] and events.next_time() == 3.0
    events.run_until(3.0)
    assert ran[-1] == "c1" and not events


def test_the_measured_makespan_starts_at_the_first_attempt_even_one_preempted(
    tmp_path: Path,
) -> None:
    """A preempted unit's row holds its last attempt; its first one (an event) began the run,
    so the makespan the simulator is judged against counts from there."""
    ledger = Ledger(tmp_path / LEDGER)
    try:
        begun = ledger.start_run()
        ledger.save_stage("s", "roles", "fp", {}, "done", begun, begun + 10, {}, None)
        rows = [
            UnitRow("s", u, "fp", UnitState.done, 2, begun + a, begun + b)
            for u, a, b in [("rollout", 3.0, 9.0), ("train", 1.0, 3.0)]
        ]
        ledger.write(rows)
        ledger.add_events(
            [Event("s", "rollout", "attempt", begun + 1.0, None, "preempted", begun + 0.5)]
        )
    finally:
        ledger.close()
    assert measure(tmp_path).makespan == pytest.approx(8.5)
