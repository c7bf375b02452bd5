"""The unit loop (`runner.executor`) on the virtual backend, with no Ray: retries, a node that
leaves, preemption and cancel, each in virtual seconds, driving the tests'
`sleep` kind (tests/kinds/sleep) through the very loop a real run uses."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from runner.backends.virtual import VirtualBackend
from runner.cluster import ClusterInfo, RayNode
from runner.executor import START_TRIES, Executor
from runner.kind import RunContext, StageKind, StageOutcome, StageRun, Verdicts
from runner.lease import Lease, Work
from runner.lifecycle import UnitState
from runner.plan import StagePlan, make_plan
from runner.progress import Progress
from runner.resources import Resources
from runner.scheduler.core import Scheduler
from runner.scheduler.metrics import Metrics
from runner.spec import Pipeline
from runner.store import RunStore
from runner.verdicts import Done
from tests.kinds.sleep.kind import KIND as SLEEP
from tests.kinds.sleep.kind import SleepRun
from tests.kinds.sleep.schema import SleepStage


class Cluster(VirtualBackend):
    """Virtual time on named nodes, where a node may leave (as Ray's membership says)."""

    def __init__(self, nodes: list[RayNode], latency: Callable[[Lease], float]) -> None:
        super().__init__(latency)
        self.members = list(nodes)
        self.changed = False

    def leave(self, node_id: str) -> None:
        self.members = [n for n in self.members if n.node_id != node_id]
        self.changed = True

    def nodes(self, force: bool = False) -> list[RayNode] | None:
        if not self.changed:
            return None
        self.changed = False
        return list(self.members)


# something done to the running loop at a virtual time: (seconds, action)
During = tuple[float, Callable[[Executor, Cluster], None]]


@dataclass
class Ran:
    """What a user sees of a run: each stage's outcome and units."""

    outcomes: dict[str, StageOutcome]
    units: dict[str, dict[str, Work]]
    now: float


def run_loop(
    tmp_path: Path,
    stages: Mapping[str, SleepStage],
    cpus: list[float],
    during: list[During] = [],  # noqa: B006 (read only)
    latency: Callable[[Lease], float] = lambda lease: 0.0,
    open_run: Callable[[StagePlan, RunContext], StageRun] = SLEEP.open,
) -> Ran:
    """Plan `stages` (sleep stages) for nodes of `cpus` and run them to the end in virtual time
    (each stage's run made by `open_run`)."""
    runs: dict[str, StageRun] = {}

    def opened(stage: StagePlan, ctx: RunContext) -> StageRun:
        runs[stage.name] = run = open_run(stage, ctx)
        return run

    kinds: dict[str, StageKind] = {"sleep": dataclasses.replace(SLEEP, open=opened)}
    raw = {name: dataclasses.asdict(spec) for name, spec in stages.items()}
    pipeline = Pipeline("loop", dict(stages), raw)
    ids = tuple(f"node{i}" for i in range(len(cpus)))
    ips = tuple(f"10.0.0.{i + 1}" for i in range(len(cpus)))
    nodes = tuple(Resources(cpus=c) for c in cpus)
    cluster = ClusterInfo(nodes, "test nodes", node_ids=ids, node_ips=ips)
    plan = make_plan(pipeline, {k: v.plan for k, v in kinds.items()}, cluster, None, True)
    backend = Cluster(
        [RayNode(i, ip, n) for i, ip, n in zip(ids, ips, nodes, strict=True)], latency
    )
    scheduler = Scheduler(list(nodes), clock=backend.clock, metrics=Metrics(False))
    store = RunStore(tmp_path)
    ctx = RunContext(
        store,
        store.open(),
        cluster,
        threading.Event(),
        Progress("off"),
        backend.clock,
        backend.wall,
        fresh=True,
        virtual=True,
    )
    executor = Executor(plan, pipeline, kinds, ctx, scheduler, backend)
    for when, action in during:
        backend.events.add(when, partial(action, executor, backend))
    try:
        outcomes = executor.run()
    finally:
        store.close()
    units = {name: {w.id: w for w in run.works} for name, run in runs.items()}
    return Ran(outcomes, units, backend.now)


def sleep(**keys: object) -> SleepStage:
    return SleepStage(kind="sleep", **keys)  # type: ignore[arg-type]


class Finished(Done):
    """A kind's own verdict: a subclass of `Done`."""


class SaysFinished(SleepRun):
    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        for verdict in super().on_reply(lease, tag, value):
            yield Finished(verdict.work, verdict.result) if isinstance(verdict, Done) else verdict


class SaysNonsense(SleepRun):
    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        yield from super().on_reply(lease, tag, value)
        yield "done, I think"  # type: ignore[misc]


def test_a_kinds_own_subclass_of_a_verdict_is_carried_out_as_the_verdict(tmp_path: Path) -> None:
    ran = run_loop(tmp_path, {"work": sleep(units=2, seconds=1)}, [2], open_run=SaysFinished)
    assert {u: w.state for u, w in ran.units["work"].items()} == dict.fromkeys("01", UnitState.done)
    assert ran.outcomes["work"].ok


def test_a_kind_that_hands_the_loop_a_non_verdict_is_told_what_it_handed(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="a kind handed the loop str, which is not a verdict"):
        run_loop(tmp_path, {"work": sleep(units=1, seconds=1)}, [1], open_run=SaysNonsense)


def test_a_unit_that_fails_once_runs_again_and_the_stage_succeeds(tmp_path: Path) -> None:
    ran = run_loop(tmp_path, {"work": sleep(units=3, seconds=2, retries=1, fail={"1": 1})}, [3])
    work, outcome = ran.units["work"], ran.outcomes["work"]
    assert {u: w.state for u, w in work.items()} == dict.fromkeys("012", UnitState.done)
    assert {u: w.attempts for u, w in work.items()} == {"0": 1, "1": 2, "2": 1}
    assert work["1"].started == 2.0 and work["1"].ended == 4.0  # its second attempt
    assert outcome.ok and outcome.done == 3 and outcome.failed == 0


def test_a_unit_that_fails_past_its_retries_ends_failed_and_fails_the_stage(
    tmp_path: Path,
) -> None:
    ran = run_loop(tmp_path, {"work": sleep(units=3, seconds=2, retries=1, fail={"1": 2})}, [3])
    work, outcome = ran.units["work"], ran.outcomes["work"]
    assert work["1"].state is UnitState.failed and work["1"].attempts == 2
    assert work["1"].error == "told to fail this attempt"
    assert {work["0"].state, work["2"].state} == {UnitState.done}
    assert not outcome.ok and (outcome.done, outcome.failed) == (2, 1)
    assert outcome.message == "1 unit(s) did not complete: 1 (told to fail this attempt)"


def test_units_of_a_node_that_leaves_run_again_elsewhere_without_spending_a_retry(
    tmp_path: Path,
) -> None:
    """Two one-CPU nodes, a unit on each; node1 leaves at 3s: its unit waits for node0 and
    runs there after the other, its attempt not counted (retries 0, yet it is done)."""
    ran = run_loop(
        tmp_path,
        {"work": sleep(units=2, seconds=10, cpus=1)},
        [1, 1],
        during=[(3.0, lambda executor, cluster: cluster.leave("node1"))],
    )
    work, outcome = ran.units["work"], ran.outcomes["work"]
    assert {w.state for w in work.values()} == {UnitState.done}
    assert {w.attempts for w in work.values()} == {1}
    assert {w.node_id for w in work.values()} == {"node0"}
    assert sorted((w.started, w.ended) for w in work.values()) == [(0.0, 10.0), (10.0, 20.0)]
    assert outcome.ok and outcome.done == 2


def test_a_unit_that_no_node_left_can_hold_fails_naming_why(tmp_path: Path) -> None:
    """Nodes of 1 and 2 CPUs; the 2-CPU unit runs on node1, which leaves at 3s: node0 can
    never hold it, so it fails with the reason (and the stage with it), the 1-CPU unit done."""
    ran = run_loop(
        tmp_path,
        {"big": sleep(seconds=10, cpus=2), "small": sleep(seconds=5, cpus=1)},
        [1, 2],
        during=[(3.0, lambda executor, cluster: cluster.leave("node1"))],
    )
    big, outcome = ran.units["big"]["0"], ran.outcomes["big"]
    assert big.state is UnitState.failed
    assert big.error == (
        "cannot be admitted: big/0 needs 2 CPU, which nothing running will free (no node holds it)"
    )
    assert not outcome.ok and outcome.failed == 1
    assert ran.units["small"]["0"].state is UnitState.done and ran.outcomes["small"].ok


def test_a_higher_priority_unit_preempts_a_preemptible_one_which_comes_back(
    tmp_path: Path,
) -> None:
    """Three CPUs: `low` (2 CPUs, preemptible) and `gate` (1 CPU, 1s) start at once; `high`
    (2 CPUs, priority 5) follows gate at 1s, takes low's CPUs, and low runs again after it."""
    stages = {
        "low": sleep(seconds=10, cpus=2, preemptible=True),
        "gate": sleep(seconds=1, cpus=1),
        "high": sleep(seconds=2, cpus=2, priority=5.0, needs=["gate"]),
    }
    ran = run_loop(tmp_path, stages, [3])
    low, high = ran.units["low"]["0"], ran.units["high"]["0"]
    assert (high.started, high.ended) == (1.0, 3.0)
    assert low.state is UnitState.done and (low.started, low.ended) == (3.0, 13.0)
    assert ran.outcomes["low"].preempted == {"same_pool": 1}
    assert ran.outcomes["low"].requeues == 1
    assert all(o.ok for o in ran.outcomes.values())


def test_a_cancelled_unit_ends_cancelled_and_the_others_complete(tmp_path: Path) -> None:
    """`mode=cancel` of unit 0 at 3s, as the loop answers a cancel request."""

    def cancel(executor: Executor, cluster: Cluster) -> None:
        executor.cancel(next(w for w in executor.live["work"].run.works if w.id == "0"))

    ran = run_loop(
        tmp_path, {"work": sleep(units=2, seconds=10, cpus=1)}, [2], during=[(3.0, cancel)]
    )
    work, outcome = ran.units["work"], ran.outcomes["work"]
    assert work["0"].state is UnitState.cancelled and work["0"].error == "cancelled"
    assert work["0"].ended == 3.0
    assert work["1"].state is UnitState.done and work["1"].ended == 10.0
    assert (outcome.done, outcome.cancelled, outcome.failed) == (1, 1, 0)


def test_a_unit_past_its_timeout_ends_timeout_after_its_retries(tmp_path: Path) -> None:
    """A 10s unit with a 4s timeout and one retry: timed out at 4s, run again, timed out at
    8s, and it ends TIMEOUT; a unit within its timeout is done."""
    stages = {
        "slow": sleep(seconds=10, timeout=4, retries=1),
        "quick": sleep(seconds=3, timeout=4),
    }
    ran = run_loop(tmp_path, stages, [2])
    slow, quick = ran.units["slow"]["0"], ran.units["quick"]["0"]
    assert slow.state is UnitState.timeout and slow.attempts == 2
    assert (slow.started, slow.ended) == (4.0, 8.0)
    assert slow.error == "timeout: 4s exceeded"
    assert quick.state is UnitState.done and quick.ended == 3.0
    assert (ran.outcomes["slow"].timeout, ran.outcomes["slow"].ok) == (1, False)
    assert ran.outcomes["quick"].ok


def test_a_lease_started_late_goes_back_to_the_queue_without_spending_a_retry(
    tmp_path: Path,
) -> None:
    """The cluster takes 61s to start the first lease (its bound is 60s, `START_BOUND`): the
    grant goes back at 60s and the unit, granted again, starts at once; retries 0, yet done."""
    launches: list[float] = []

    def latency(lease: Lease) -> float:
        launches.append(1.0)
        return 61.0 if len(launches) == 1 else 0.0

    ran = run_loop(tmp_path, {"work": sleep(seconds=5)}, [1], latency=latency)
    work = ran.units["work"]["0"]
    assert work.state is UnitState.done and work.attempts == 1
    assert (work.started, work.ended) == (60.0, 65.0)
    assert ran.outcomes["work"].ok and ran.now == 65.0


def test_a_lease_that_never_starts_within_its_bound_fails_after_a_few_tries(
    tmp_path: Path,
) -> None:
    """Every start takes 61s against the 60s bound: the unit is granted again `START_TRIES`
    times, then fails naming why, instead of going back to the queue for ever."""
    ran = run_loop(tmp_path, {"work": sleep(seconds=5)}, [1], latency=lambda lease: 61.0)
    work, outcome = ran.units["work"]["0"], ran.outcomes["work"]
    assert work.state is UnitState.failed and work.attempts == 0
    assert work.error == f"not started on 10.0.0.1 within 60s, {START_TRIES} times"
    assert ran.now == 60.0 * START_TRIES
    assert not outcome.ok and outcome.failed == 1


def test_two_preemptors_on_one_node_evict_only_what_each_needs(tmp_path: Path) -> None:
    """Seven CPUs: six one-CPU preemptible `low` units and a one-CPU `gate`; when gate ends,
    two `high` units of 2 CPUs arrive together, with 1 CPU free: the first evicts one victim,
    the second two, three in all. (The first's hold was counted as its whole 2 CPUs taken
    while its victim still held one, so the second evicted three.)"""
    stages = {
        "low": sleep(units=6, seconds=10, cpus=1, preemptible=True),
        "gate": sleep(seconds=1, cpus=1),
        "high": sleep(units=2, seconds=2, cpus=2, priority=5.0, needs=["gate"]),
    }
    ran = run_loop(tmp_path, stages, [7])
    assert ran.outcomes["low"].preempted == {"same_pool": 3}
    assert ran.outcomes["low"].requeues == 3
    assert {(w.started, w.ended) for w in ran.units["high"].values()} == {(1.0, 3.0)}
    assert {w.state for w in ran.units["low"].values()} == {UnitState.done}
    assert all(o.ok for o in ran.outcomes.values())


def test_every_verdict_has_its_line_in_the_loops_table() -> None:
    """A verdict added to `verdicts.Verdict` and forgotten in `Executor._verdicts` would be
    refused as "not a verdict" the first time a kind hands it over: caught here instead."""
    import typing

    from runner.verdicts import Verdict

    def members(alias: object) -> set[type]:
        args = typing.get_args(alias)
        return set().union(*map(members, args)) if args else {typing.cast(type, alias)}

    table = Executor._verdicts(Executor.__new__(Executor))
    assert set(table) == members(Verdict)
