"""The free-capacity index answers as a scan of every node would.

`FreeIndex` keeps plain floats changed in place and files nodes in buckets lazily; a random
mix of grants, releases, capacity changes and joining nodes (fractional GPUs, memory, custom
resources) must leave it agreeing with `Resources` arithmetic and a plain scan for the
roomiest node, whether grants go through `roomiest` and `take` or through `place`.
"""

from __future__ import annotations

import random

import pytest

from runner.resources import Resources
from runner.scheduler.capacity import FreeIndex

GIB = float(1 << 30)
NEEDS = [
    Resources(1.0),
    Resources(4.0, memory=8 * GIB),
    Resources(8.0, 1.0),
    Resources(2.0, 0.5),
    Resources(1.0, 0.25),
    Resources(16.0, 4.0, 64 * GIB),
    Resources(1.0, custom=(("slot", 1.0),)),
    Resources(0.0, 1.0),
]


def _node(rng: random.Random) -> Resources:
    custom = (("slot", float(rng.randint(1, 2))),) if rng.random() < 0.3 else ()
    return Resources(
        float(rng.choice([8, 32, 96])), float(rng.choice([0, 4, 8])), 256 * GIB, custom
    )


def _scan(free: list[Resources], need: Resources, exclude: int | None) -> int | None:
    """The roomiest node by a plain scan: most free CPUs, then the lowest index."""
    fits = [n for n, r in enumerate(free) if n != exclude and need.fits_in(r)]
    return min(fits, key=lambda n: (-free[n].cpus, n), default=None)


@pytest.mark.parametrize("seed", range(5))
def test_free_index_agrees_with_a_scan(seed: int) -> None:
    rng = random.Random(seed)
    free = [_node(rng) for _ in range(12)]
    index = FreeIndex(free)
    held: list[tuple[int, Resources]] = []
    for step in range(3000):
        need = rng.choice(NEEDS)
        exclude = rng.choice([None, None, rng.randrange(len(free))])
        node = index.roomiest(need, exclude)
        assert node == _scan(free, need, exclude), step
        roll = rng.random()
        if node is not None and roll < 0.55:
            if step % 2:  # the admission path: the same node, taken and filed again at once
                assert index.place(need, exclude) == node
            else:
                index.take(node, need)
            free[node] = free[node] - need
            held.append((node, need))
        elif held and roll < 0.95:
            node, r = held.pop(rng.randrange(len(held)))
            index.give(node, r)
            free[node] = free[node] + r
        elif roll < 0.98:
            node = rng.randrange(len(free))
            free[node] = free[node] + Resources(2.0, 1.0)
            index[node] = free[node]
        else:
            free.append(_node(rng))
            index.append(free[-1])
        assert index[step % len(free)] == free[step % len(free)]
    total = sum(free, Resources())
    assert index.total().cpus == pytest.approx(total.cpus)
    assert index.total().gpus == pytest.approx(total.gpus)
    assert dict(index.total().custom) == pytest.approx(dict(total.custom))
