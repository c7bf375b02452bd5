"""The keys of a `pool` stage (see `runner.schema` for the field marks: `resource`, `policy`,
limits).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from runner.schema import StageSpec, policy, resource


@dataclass
class PoolStage(StageSpec):
    """N long-lived Ray actors that each call a worker object on a stream of items."""

    # how many worker actors to start
    num_workers: int = resource(2, ge=1)
    # CPUs per worker actor: `auto` = clamp(0.9 x total cluster CPUs / num_workers, 0.1, 2.0)
    cpus_per_worker: str | float = resource("auto", choices=["auto"], ge=0.01, le=1024)
    # items one worker runs at the same time (threads in the actor)
    max_concurrency: int = resource(1, ge=1, le=1024)
    # copy workers' print/logging (always in <run.dir>/<stage>/logs/worker-N.log) to their
    # own streams, which Ray forwards to this terminal with cluster.log_to_driver=true
    show_output: bool = resource(False)
    # seconds an item may run before it is cancelled, recorded as timeout, and its worker freed
    step_timeout: float | None = policy(None, gt=0)
    # times an item is tried again after an error or a worker crash (not after a timeout)
    retries: int = policy(0, ge=0)
    # item failures (errors + timeouts) the stage tolerates: a count, or a fraction below 1
    max_failures: float = policy(0, ge=0)
    # items per actor call: `auto` sizes batches from measured item time
    batch_size: str | int = resource("auto", choices=["auto"], ge=1)
    # the worker: {_target_: pkg.mod.Class, **kwargs}, built once per actor, called per item
    worker: dict[str, object] = MISSING
    # one of {range: N | [start, stop]}, {list: [...]}, {glob: PATTERN}, {file: PATH}, {from: STAGE}
    items: dict[str, object] = MISSING
