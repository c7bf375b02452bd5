"""Run/skip decisions of a resumed stage: the finished-stage digest skips reading the ledger's
units only when every unit is the one that finished, and never hides a changed one."""

from __future__ import annotations

from runner.plan import Decider, units_digest
from runner.store import Prior

IDS = [str(i) for i in range(5)]
FPS = [f"fp{i}" for i in range(5)]


def finished_decider(reads: list[str]) -> Decider:
    """A decider for a stage the ledger recorded as finished with IDS and FPS."""

    def load() -> Prior:
        reads.append("units")
        return Prior(dict(zip(IDS, FPS, strict=True)), {})

    return Decider(None, False, "input changed", load=load, finished=units_digest(IDS, FPS))


def test_an_unchanged_finished_stage_skips_every_unit_without_reading_them() -> None:
    reads: list[str] = []
    units = finished_decider(reads).units(IDS, FPS, list(range(5)))
    assert [(u.id, u.run, u.reason, u.payload) for u in units] == [
        (str(i), False, "done", i) for i in range(5)
    ]
    assert reads == []


def test_one_changed_unit_of_a_finished_stage_runs_alone() -> None:
    reads: list[str] = []
    changed = [*FPS[:2], "other", *FPS[3:]]
    units = finished_decider(reads).units(IDS, changed, list(range(5)))
    assert [(u.id, u.reason) for u in units if u.run] == [("2", "input changed")]
    assert reads == ["units"]


def test_an_added_unit_runs_as_new_and_the_rest_are_kept() -> None:
    reads: list[str] = []
    units = finished_decider(reads).units([*IDS, "5"], [*FPS, "fp5"], list(range(6)))
    assert [(u.id, u.reason) for u in units if u.run] == [("5", "new")]
    assert sum(not u.run for u in units) == 5


def test_the_digest_tells_ids_from_fingerprints() -> None:
    # the same strings split differently between ids and fingerprints are another stage
    assert units_digest(["a", "b"], ["c", "d"]) != units_digest(["a"], ["b", "c", "d"])
