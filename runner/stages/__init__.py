"""Stage kinds, one module each; `KINDS` is the registry the rest of runner reads."""

from __future__ import annotations

from runner.kind import StageKind
from runner.stages import jobs, pool, roles, shard

KINDS: dict[str, StageKind] = {
    "pool": pool.KIND,
    "roles": roles.KIND,
    "shard": shard.KIND,
    "jobs": jobs.KIND,
}
