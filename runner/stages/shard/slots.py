"""Which GPUs a shard asks Ray for by name, where the cluster names its GPUs.

A node that declares one custom resource per GPU (`runner_gpu_<i>: 1`, see `gpus.resource`;
the embedded cluster does for every GPU NVML lists) lets a shard ask for exactly the GPUs of one
group: the scheduler grants only on a node where those resources are free, Ray places the task
there, and the task sets CUDA_VISIBLE_DEVICES to the group over Ray's own pick. So a GPU the
plan excluded (too little free memory) is never used and a topology pair stays together.

The groups are the plan's (NVML's eligible GPUs grouped by topology, on the embedded cluster),
else runs of each node's declared indices. A group is asked for at most once per node that
declares it, so a queued shard asks only when some group is free somewhere, and takes the one
free on most nodes: the choice is made when a lease can start, not fixed per shard in advance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from runner import gpus
from runner.resources import Resources

Group = tuple[int, ...]


@dataclass
class GpuSlots:
    """The GPU groups a shard stage may ask for, and how many copies of each are in use."""

    # in order of preference (the plan's order: nearest in topology first)
    groups: list[Group]
    # how many nodes declare every GPU of a group
    nodes: dict[Group, int]
    used: Counter[Group] = field(default_factory=Counter)
    # copies taken out of use because their GPUs turned out short of free memory
    retired: Counter[Group] = field(default_factory=Counter)

    @classmethod
    def of(
        cls, planned: Sequence[Sequence[int]] | None, per_shard: float, nodes: Sequence[Resources]
    ) -> GpuSlots | None:
        """The slots for shards of `per_shard` GPUs on `nodes`; None when the cluster does not
        name its GPUs (or shards take a fraction of one): Ray then picks the GPUs."""
        size = int(per_shard)
        if size < 1 or size != per_shard:
            return None
        declared = [set(gpus.declared(n.custom)) for n in nodes]
        if planned:
            groups = [tuple(g) for g in planned]
        else:  # no inventory here: each node's named GPUs in runs of `size`
            groups = []
            for have in declared:
                ordered = sorted(have)
                for i in range(0, len(ordered) - size + 1, size):
                    run = tuple(ordered[i : i + size])
                    if run not in groups:
                        groups.append(run)
        count = {g: sum(set(g) <= have for have in declared) for g in groups}
        kept = [g for g in groups if count[g]]
        return cls(kept, {g: count[g] for g in kept}) if kept else None

    def _room(self, group: Group) -> int:
        return self.nodes[group] - self.retired[group] - self.used[group]

    def spare(self) -> int:
        """How many more shards may ask now."""
        return sum(max(0, self._room(g)) for g in self.groups)

    def take(self) -> Group:
        """The group free on most nodes (the plan's order breaks ties); call only with spare."""
        group = max(self.groups, key=lambda g: (self._room(g), -self.groups.index(g)))
        self.used[group] += 1
        return group

    def give(self, group: Group) -> None:
        """A lease on `group` ended."""
        self.used[group] -= 1

    def retire(self, group: Group) -> bool:
        """One copy of `group` is short of free memory: ask for it no more. When every copy of
        every group is retired, all come back (memory may have been freed since); True then."""
        self.retired[group] += 1
        if any(self.nodes[g] > self.retired[g] for g in self.groups):
            return False
        self.retired.clear()
        return True

    def resources(self, group: Group, cpus: float) -> Resources:
        """What a shard on `group` asks the scheduler (and Ray) for."""
        named = tuple(sorted((gpus.resource(i), 1.0) for i in group))
        return Resources(cpus=cpus, gpus=float(len(group)), custom=named)
