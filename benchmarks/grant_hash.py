"""Hash every grant the scheduler makes on the simulator's benchmark workloads, in order.

A change to the scheduler that means to keep its decisions (a refactor, a speed-up) must leave
these hashes as they were: run this before and after, and compare. The workloads are the
10k-unit plan of `test_sim_bench.py::test_scheduler_decisions_10k_units_64_nodes`, the
1,000-node, 100k-unit `bench_sim_scale` spec through the CLI (roles with reserved groups,
reuse and preemption, jobs with backfill), and the shipped examples on `cluster=sim`. A grant
is (owner, node, virtual time), in the order `Scheduler.admit` returned them.

    python -m benchmarks.grant_hash
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from io import StringIO

from runner.scheduler.core import Scheduler


@contextmanager
def hashing() -> Iterator[Callable[[], tuple[int, str]]]:
    """While inside, every admitted ticket's grant is hashed; yields (grants, hex digest)."""
    digest = hashlib.blake2b(digest_size=16)
    count = [0]
    admit = Scheduler.admit

    def counted(self: Scheduler, tenant: object = None) -> list[object]:
        granted = admit(self, tenant)
        for t in granted:
            g = t.grant  # type: ignore[attr-defined]
            digest.update(f"{g.owner}|{g.node}|{g.since!r}\n".encode())
        count[0] += len(granted)
        return granted  # type: ignore[return-value]

    Scheduler.admit = counted  # type: ignore[assignment,method-assign]
    try:
        yield lambda: (count[0], digest.hexdigest())
    finally:
        Scheduler.admit = admit  # type: ignore[method-assign]


def bench_10k() -> tuple[int, str]:
    from benchmarks.test_sim_bench import make_plan, simulate

    plan = make_plan()
    with hashing() as result:
        simulate(plan)
    return result()


def scale_100k() -> tuple[int, str]:
    from benchmarks.runs import SPECS
    from benchmarks.test_sim_bench import SCALE_NODES
    from runner.cli import main

    argv = ["--config-dir", str(SPECS), "pipeline=bench_sim_scale", "cluster=sim"]
    with hashing() as result, redirect_stdout(StringIO()):
        code = main([*argv, SCALE_NODES, "hydra/job_logging=disabled"])
    assert code == 0
    return result()


def examples() -> tuple[int, str]:
    """Every shipped example on `cluster=sim` (its default nodes), one after the other."""
    from runner.cli import main

    with hashing() as result, redirect_stdout(StringIO()):
        for example in EXAMPLES:
            code = main([f"pipeline={example}", "cluster=sim", "hydra/job_logging=disabled"])
            assert code == 0, example
    return result()


EXAMPLES = ["demo", "jobs", "rlhf", "rlhf_large", "pychecker", "continuation"]


if __name__ == "__main__":
    runs = (("10k bench plan", bench_10k), ("100k scale spec", scale_100k), ("examples", examples))
    for name, run in runs:
        grants, digest = run()
        print(f"{name}: {grants} grants, {digest}")
    sys.exit(0)
