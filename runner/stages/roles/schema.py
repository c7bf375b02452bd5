"""The keys of a `roles` stage (see `runner.schema` for the field marks: `resource`, `policy`,
limits); the nested sections are typed in `settings.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from runner.schema import StageSpec, resource


@dataclass
class RolesStage(StageSpec):
    """Long-running role replicas with priorities, placement-group pools and preemption."""

    # the quota these roles share: {name, resources: {cpus, gpus, memory (8G; MB) | memory_gb}}
    pool: dict[str, object] = field(default_factory=dict, metadata={"resource": True})
    # {reserved: [{role: NAME, count} | {resources: {...}, count, min_priority}],
    # max_dynamic_pgs, reuse, enable, enable_dynamic_pgs, pg_creation_timeout}; ScheduleMesh's
    # `pg_pool_config` (with `high_priority_pg_specs`, `enable_pg_reuse`) is read as it
    pg_pool: dict[str, object] = field(
        default_factory=dict, metadata={"resource": True, "aliases": ("pg_pool_config",)}
    )
    # {label_rules, enable_label_preemption, aggressiveness: low|medium|high (or ScheduleMesh's
    # aliases), cancel_timeout, cross_pool, protected_pools}
    preemption: dict[str, object] = field(default_factory=dict, metadata={"resource": True})
    # scale every role's resources down in proportion when the cluster is smaller than the spec
    autoscale_to_cluster: bool = resource(False)
    # NAME: {priority, replicas: N | {min, max}, resources, labels, pg, start_after, actor, steps}
    roles: dict[str, object] = field(default=MISSING, metadata={"resource": True})
