"""The Ray boundary: an actor is killed only once Ray has made it (`ActorKills`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.remote import ActorKills, remote
from tests.conftest import cpus_free_again, wait_until
from tests.workers import Made

pytestmark = pytest.mark.usefixtures("ray_session")


def test_an_actor_killed_as_it_is_asked_for_is_made_first_and_its_cpu_comes_back(
    tmp_path: Path,
) -> None:
    """Ray 2.60 may keep the CPUs of an actor killed while it is being made (the kill reaches
    its leased worker first and is ignored) until the driver's job ends: for the session's Ray,
    every later test. So the kill waits until Ray has made the actor."""
    kills = ActorKills()
    made = tmp_path / "made"
    actor = remote(Made).options(num_cpus=1, max_restarts=0).remote(str(made))
    kills.kill(actor, now=False)
    del actor

    def reaped() -> bool:
        kills.reap()
        return not kills.pending

    wait_until(reaped, what="the actor to be made, then killed")
    assert made.read_text().isdigit()  # made before it was killed
    wait_until(cpus_free_again, what="the killed actor's CPU to be free")


def test_actors_still_coming_up_at_the_end_are_killed_once_up(tmp_path: Path) -> None:
    kills = ActorKills()
    paths = [tmp_path / f"made{i}" for i in range(2)]
    for path in paths:
        kills.kill(remote(Made).options(num_cpus=1, max_restarts=0).remote(str(path)), now=False)
    kills.close(30.0)
    assert not kills.pending
    assert all(p.read_text().isdigit() for p in paths)
    wait_until(cpus_free_again, what="the killed actors' CPUs to be free")
