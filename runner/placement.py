"""A grant made real: the node (or placement-group bundle) Ray must use, and proof of where a
unit started.

The scheduler decides where every unit runs; Ray has to hear about it, or the runner's
per-node accounting is fiction on more than one node. Ray's own `ray.air.execution` managers
do the request/acquire half of this (`ResourceRequest` → `acquire_resources` →
`annotate_remote_entities`) but never choose a node, so the placement is written into the
actor's or task's options here: `NodeAffinitySchedulingStrategy(node, soft=False)`, or a
placement group whose bundle is pinned to the node by Ray's `ray.io/node-id` label (Ray >= 2.49;
a `node:<ip>` resource would not tell apart nodes that share an IP).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.resources import Resources

# the label Ray gives every node: its id
NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class Placement:
    """Where one grant runs: Ray's node id and IP, what it holds, and (for roles) the group."""

    node_id: str
    node_ip: str
    resources: Resources
    # a placement group (and bundle index) that already holds the resources on that node
    group: Any = None
    bundle: int = 0

    def options(self, **extra: Any) -> dict[str, Any]:
        """`.options()` for the actor or task that runs on this placement."""
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        strategy: Any
        if self.group is not None:
            strategy = PlacementGroupSchedulingStrategy(self.group, self.bundle)
        else:
            strategy = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        return {**self.resources.ray_options(), "scheduling_strategy": strategy, **extra}

    def new_group(self) -> Any:
        """A new one-bundle placement group of these resources that only this node can hold."""
        from ray.util.placement_group import placement_group

        bundle = {
            "CPU": self.resources.cpus,
            "GPU": self.resources.gpus,
            "memory": float(int(self.resources.memory)),
            **dict(self.resources.custom),
        }
        return placement_group(
            [{k: v for k, v in bundle.items() if v > 0}],
            strategy="STRICT_PACK",
            bundle_label_selector=[{NODE_ID_LABEL: self.node_id}] if self.node_id else None,
        )


@dataclass(frozen=True)
class Started:
    """Sent by a unit's process as its first words: it really runs, here, since `time`."""

    node_id: str
    node_ip: str
    host: str
    pid: int
    time: float

    @property
    def worker(self) -> str:
        """The process, as the ledger names it: `host:pid`."""
        return f"{self.host}:{self.pid}"


def announce(path: str) -> Started:
    """Inside a task: say where it runs by writing `path` (atomically), and return that.

    A plain task answers only when it ends, and Ray's streaming tasks cannot be cancelled
    safely in Ray 2.60 (a polite cancel may abort the driver), so a task announces its start
    through the run directory; the executor reads it (`Executor.expect_start`)."""
    where = here()
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    text = json.dumps(dataclasses.asdict(where))
    try:
        tmp.write_text(text)
    except FileNotFoundError:  # the first task of the run to announce makes the directory
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
    os.replace(tmp, target)
    return where


def heard(path: Path) -> Started | None:
    """The start a task announced at `path`, once it has (the file is removed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    return Started(**data)


def here() -> Started:
    """Where the calling Ray worker runs (call it inside a task or an actor)."""
    import ray

    ctx = ray.get_runtime_context()
    ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    return Started(ctx.get_node_id(), ip, socket.gethostname(), os.getpid(), time.time())
