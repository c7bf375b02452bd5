"""What every stage kind must do, as a class a kind's tests subclass (as Hydra's
`LauncherTestSuite` is subclassed for each launcher): the executor gives every kind the same
lifecycle, so the same observable contract holds for each, and a new kind is tested by one
subclass that fills in the hooks below.

Hooks (class attributes; the spec names are files under tests/specs/pipeline/, each with one
stage named `work`):
- `kind`: the kind's name; `units`: how many units `conform_<kind>` runs;
- `spec`, `order_spec`, `cancel_spec`: the pipelines of each test (`conform_`, `order_`,
  `cancel_<kind>` by default);
- `failing`: a pipeline with failing units and what a user then sees (None: the kind has none);
- `entry`: for a kind kept outside `runner/`, its `RUNNER_KINDS` entry
  (`NAME=module:ATTRIBUTE`): registered in this process and in every runner it starts;
- `one_to_cancel(rows)`: a unit that runs, to cancel (by default the first RUNNING one).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from runner import procs
from runner.lifecycle import UnitState
from runner.stages import registry
from runner.store import UnitRow, read_ledger
from tests.conftest import (
    Result,
    embedded_runner,
    run_runner,
    runner_process,
    wait_until,
)

Cli = Callable[..., Result]


def ledger_rows(run_dir: Path) -> list[UnitRow]:
    if not (run_dir / "ledger.sqlite").exists():
        return []
    ledger = read_ledger(run_dir)
    assert ledger is not None
    try:
        return list(ledger.rows("work"))
    except sqlite3.OperationalError:  # the runner is still creating it
        return []
    finally:
        ledger.close()


def states(run_dir: Path) -> list[UnitState]:
    return [r.state for r in ledger_rows(run_dir)]


def _descendants(pid: int) -> list[tuple[int, float | None]]:
    return [(p, procs.start_time(p)) for p in procs.descendants(pid)]


@dataclass(frozen=True)
class Failing:
    """A pipeline whose units fail, and what a user sees of it: the units that end FAILED,
    how many attempts each made, and the stage's message."""

    spec: str
    failed: frozenset[str]
    attempts: int
    message: str


class KindConformance:
    """The conformance suite; subclass it once per kind (`class TestMine(KindConformance)`)."""

    kind: ClassVar[str]
    units: ClassVar[int]
    failing: ClassVar[Failing | None] = None
    entry: ClassVar[str] = ""

    @property
    def spec(self) -> str:
        return f"conform_{self.kind}"

    @property
    def order_spec(self) -> str:
        return f"order_{self.kind}"

    @property
    def cancel_spec(self) -> str:
        return f"cancel_{self.kind}"

    def one_to_cancel(self, rows: list[UnitRow]) -> str | None:
        """A unit that runs now, to cancel (None: none yet)."""
        return next((r.unit for r in rows if r.state is UnitState.running), None)

    @pytest.fixture(autouse=True)
    def _registered(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """A kind from outside `runner/`: registered here and for the runners started."""
        if not self.entry:
            yield
            return
        kinds = dict(registry.KINDS)
        registry.register_entries(self.entry)
        monkeypatch.setenv(registry.ENV, self.entry)
        try:
            yield
        finally:
            registry.KINDS.clear()
            registry.KINDS.update(kinds)

    # --- the suite -----------------------------------------------------------------------

    def test_plan_run_then_a_rerun_skips_every_unit(
        self, ray_session: str, cli: Cli, tmp_path: Path
    ) -> None:
        import ray

        spec = (f"pipeline={self.spec}", f"run.dir={tmp_path}")
        plan = cli(*spec, "mode=plan")
        assert plan.code == 0, plan.text
        assert re.search(rf"run\s+{self.units}\s+new", plan.out), plan.out
        first = cli(*spec)
        assert first.code == 0, first.text
        rows = ledger_rows(tmp_path)
        assert len(rows) == self.units
        here = ray.get_runtime_context().get_node_id()
        for row in rows:
            assert row.state is UnitState.done
            assert row.node_id == here and row.node_ip  # the node it ran on, as Ray names it
            assert row.started is not None and row.ended is not None and row.started <= row.ended
        again = cli(*spec, "mode=plan")
        assert re.search(rf"skip\s+{self.units}\s+done", again.out), again.out
        rerun = cli(*spec)
        assert rerun.code == 0
        assert [r.ended for r in ledger_rows(tmp_path)] == [r.ended for r in rows]  # not redone

    def test_sigkill_mid_stage_then_resume_loses_and_duplicates_nothing(
        self, ray_session: str, tmp_path: Path
    ) -> None:
        args = (f"pipeline={self.spec}", f"run.dir={tmp_path}", "cluster=ray")
        env = {"RAY_ADDRESS": ray_session}
        proc = runner_process(*args, env=env)
        wait_until(
            lambda: UnitState.running in states(tmp_path) or UnitState.done in states(tmp_path),
            timeout=90,
            what="a unit running",
        )
        proc.kill()
        proc.communicate()
        before = {r.unit: r for r in ledger_rows(tmp_path) if r.state is UnitState.done}
        again = run_runner(*args, env=env)
        assert again.code == 0, again.text
        after = ledger_rows(tmp_path)
        assert sorted(r.unit for r in after) == sorted({r.unit for r in after})  # no duplicate
        assert len(after) == self.units and {r.state for r in after} == {UnitState.done}
        for row in after:  # what was done before the kill was not run again
            if row.unit in before:
                assert row.ended == before[row.unit].ended

    @pytest.mark.parametrize(
        ("sig", "code"),
        [pytest.param(signal.SIGTERM, 143, id="term"), pytest.param(signal.SIGINT, 130, id="int")],
    )
    def test_a_signal_to_the_whole_process_group_with_its_embedded_ray_ends_the_run_cleanly(
        self, tmp_path: Path, sig: int, code: int
    ) -> None:
        """What `timeout`, Slurm, systemd and Kubernetes do: signal the runner's whole group,
        the embedded Ray's processes included."""
        args = (f"pipeline={self.spec}", f"run.dir={tmp_path}", "cluster=local")
        with embedded_runner(*args, "cluster.num_cpus=2", "cluster.num_gpus=0") as proc:
            wait_until(
                lambda: UnitState.running in states(tmp_path) or UnitState.done in states(tmp_path),
                timeout=90,
                what="a unit running",
            )
            family = _descendants(proc.pid)
            os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=60)  # a bound against hangs, not a timing claim
        assert proc.returncode == code, out + err
        assert UnitState.running not in states(tmp_path)  # the ledger is true
        wait_until(
            lambda: not any(procs.running(p, t) for p, t in family),
            timeout=20,
            what="every process of the run to be gone",
        )

    def test_a_failing_unit_is_retried_then_counted_against_the_stage(
        self, ray_session: str, cli: Cli, tmp_path: Path
    ) -> None:
        if self.failing is None:
            pytest.skip(f"the {self.kind} kind has no failing pipeline")
        failing = self.failing
        res = cli(f"pipeline={failing.spec}", f"run.dir={tmp_path}")
        assert res.code == 1, res.text
        assert failing.message in res.text
        ledger = read_ledger(tmp_path)
        assert ledger is not None
        try:
            rows = {r.unit: r for r in ledger.rows(ledger.stages()[0]["stage"])}
        finally:
            ledger.close()
        assert {u for u, r in rows.items() if r.state is UnitState.failed} == failing.failed
        assert {rows[u].attempts for u in failing.failed} == {failing.attempts}
        assert all(r.state is UnitState.done for u, r in rows.items() if u not in failing.failed)

    def test_the_simulated_run_admits_units_in_the_order_of_the_real_one(
        self, ray_session: str, cli: Cli, tmp_path: Path
    ) -> None:
        """One slot (every unit takes both CPUs), units of distinct priorities where the kind
        has them: the order is the scheduler's, and `cluster=sim` drives the same scheduler
        with the kind's own asks."""
        real = cli(f"pipeline={self.order_spec}", f"run.dir={tmp_path}")
        assert real.code == 0, real.text
        ledger = read_ledger(tmp_path)
        assert ledger is not None
        rows = list(ledger.rows("work"))
        ledger.close()
        by_start = sorted(enumerate(rows), key=lambda ir: (ir[1].started or 0.0, ir[0]))
        real_order = [f"work/{r.unit}" for _, r in by_start]
        sim = cli(f"pipeline={self.order_spec}", "cluster=sim", "cluster.nodes=[{cpus: 2}]")
        assert sim.code == 0, sim.text
        line = next(ln for ln in sim.out.splitlines() if ln.startswith("units in the order"))
        assert line.split(": ", 1)[1].split(", ") == real_order

    def test_cancel_with_grace_ends_one_running_unit_cancelled_and_the_rest_completes(
        self, ray_session: str, tmp_path: Path
    ) -> None:
        """`mode=cancel`: the unit is asked to stop, given its stage's grace, then killed;
        it ends CANCELLED, nothing of it left, the others done."""
        args = (f"pipeline={self.cancel_spec}", f"run.dir={tmp_path}", "cluster=ray")
        env = {"RAY_ADDRESS": ray_session}
        proc = runner_process(*args, env=env)
        try:
            found: list[str] = []

            def chosen() -> bool:
                unit = self.one_to_cancel(ledger_rows(tmp_path))
                found.extend([unit] if unit else [])
                return unit is not None

            wait_until(chosen, timeout=90, what="a unit to cancel")
            victim = found[0]
            res = run_runner(*args, "mode=cancel", f"units=[{victim}]", env=env)
            assert res.code == 0, res.text
            assert f"work/{victim}: CANCELLED" in res.out, res.text
            out, err = proc.communicate(timeout=120)  # a bound against hangs, not a timing claim
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        rows = {r.unit: r.state for r in ledger_rows(tmp_path)}
        assert rows.pop(victim) is UnitState.cancelled
        assert rows and set(rows.values()) == {UnitState.done}, out + err
