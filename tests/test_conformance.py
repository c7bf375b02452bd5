"""The conformance suite (`tests/conformance.py`) run against each stage kind: the four shipped
ones and the tests' own `sleep` kind (tests/kinds/sleep), each one subclass."""

from __future__ import annotations

import math
from pathlib import Path

from runner.executor import FLUSH_SECONDS, WAIT_SECONDS
from runner.lifecycle import UnitState
from runner.store import UnitRow
from tests.conformance import Failing, KindConformance, ledger_rows
from tests.conftest import run_runner, runner_process, wait_until


def _tally(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class TestPool(KindConformance):
    kind, units = "pool", 30
    failing = Failing(
        "conform_fail_pool",
        frozenset({"3", "7"}),
        3,
        "2 item(s) failed or timed out; max_failures allows 1",
    )

    def one_to_cancel(self, rows: list[UnitRow]) -> str | None:
        """A pool's items are in the ledger only once they end: one still to end, once the
        first has."""
        done = {r.unit for r in rows if r.state is UnitState.done}
        return str(max(set(map(str, range(16))) - done, key=int)) if done else None

    def test_sigkill_mid_pool_then_resume_redoes_no_more_than_one_ledger_flush_holds(
        self, ray_session: str, tmp_path: Path
    ) -> None:
        """Pool items reach the ledger in batches at most FLUSH_SECONDS apart, so a SIGKILL
        loses (and the resume redoes) at most what the workers finish in one flush interval
        and the loop's turn: counted in items, not timed."""
        tally = tmp_path / "tally.txt"
        args = (
            "pipeline=redo_pool",
            f"run.dir={tmp_path / 'run'}",
            "cluster=ray",
            f"pipeline.stages.work.worker.path={tally}",
        )
        env = {"RAY_ADDRESS": ray_session}
        proc = runner_process(*args, env=env)
        wait_until(lambda: len(_tally(tally)) >= 60, timeout=90, what="60 items finished")
        proc.kill()
        finished = set(_tally(tally))  # read at once: what finished before the kill
        proc.communicate()
        recorded = {r.unit for r in ledger_rows(tmp_path / "run") if r.state is UnitState.done}
        assert recorded <= finished  # nothing recorded that did not happen
        workers, seconds = 2, 0.05
        bound = workers * (math.ceil((FLUSH_SECONDS + WAIT_SECONDS) / seconds) + 1)
        redone = finished - recorded
        assert len(redone) <= bound, f"{len(redone)} items finished but lost: {sorted(redone)}"
        again = run_runner(*args, env=env)
        assert again.code == 0, again.text
        after = ledger_rows(tmp_path / "run")
        assert len(after) == 400 and {r.state for r in after} == {UnitState.done}


class TestJobs(KindConformance):
    kind, units = "jobs", 4
    failing = Failing(
        "conform_fail_jobs", frozenset({"bad"}), 1, "1 job(s) did not complete: bad (exit code 3)"
    )

    def one_to_cancel(self, rows: list[UnitRow]) -> str | None:
        """The job that ignores SIGTERM (killed after its grace)."""
        running = {r.unit for r in rows if r.state is UnitState.running}
        return "stubborn" if "stubborn" in running else None


class TestShard(KindConformance):
    kind, units = "shard", 4
    failing = Failing("shard_fail", frozenset({"600-899"}), 2, "1 shard(s) failed")


class TestRoles(KindConformance):
    kind, units = "roles", 2


class TestSleep(KindConformance):
    """A kind written outside `runner/`: its package and the one entry that registers it."""

    kind, units = "sleep", 4
    entry = "sleep=tests.kinds.sleep.kind:KIND"
    failing = Failing(
        "conform_fail_sleep",
        frozenset({"2"}),
        2,
        "1 unit(s) did not complete: 2 (told to fail this attempt)",
    )
