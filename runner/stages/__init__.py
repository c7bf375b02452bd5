"""Stage kinds, one module each; `KINDS` is the registry the rest of runner reads."""

from __future__ import annotations

from runner.stages import jobs, pool, roles, shard
from runner.stages.base import StageKind

KINDS: dict[str, StageKind] = {
    "pool": pool.KIND,
    "roles": roles.KIND,
    "shard": shard.KIND,
    "jobs": jobs.KIND,
}
