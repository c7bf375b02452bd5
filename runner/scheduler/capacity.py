"""Free capacity per node, indexed so that placing a request does not look at every node.

The scheduler places a request on the node with the most free CPUs that holds it (it spreads
load). A scan of every node per decision makes a 1,000-node cluster cost nodes × units; here
the nodes are kept in buckets by their free GPUs, each bucket a list sorted by free CPUs, so a
request looks only at the buckets with GPUs enough, and in each one stops at the first node
that holds it: usually the first it looks at.

Every admission and every release changes one node, so the amounts are plain floats in lists
(one per resource) changed in place by `take` and `give`, not a `Resources` object built per
change; a `Resources` is built only when a caller off that path asks for a node's whole free
bundle (`index[node]`). Custom resources (rare) go through `Resources` arithmetic. An admission
finds, takes and files again its node in one call (`place`); a release marks its node to be
filed again at the next look.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from runner.resources import Resources

_EPS = 1e-9

_ROUNDED: dict[float, float] = {}


def _bucket(gpus: float) -> float:
    """GPU amounts are sums of fractions (0.5 + 0.25): rounded so equal amounts share a bucket
    (remembered: a cluster has few distinct amounts, and rounding is the slow part)."""
    key = _ROUNDED.get(gpus)
    if key is None:
        if len(_ROUNDED) > 65536:
            _ROUNDED.clear()
        key = _ROUNDED[gpus] = round(gpus, 6)
    return key


class FreeIndex:
    """Each node's free resources (by node index), and the roomiest node for a shape."""

    def __init__(self, free: list[Resources]) -> None:
        self._cpus: list[float] = []
        self._gpus: list[float] = []
        self._mem: list[float] = []
        # each node's custom resources, as `Resources.custom` holds them (mostly empty)
        self._custom: list[tuple[tuple[str, float], ...]] = []
        # bucket key -> [(-free CPUs, node)] ascending: the roomiest node first
        self._buckets: dict[float, list[tuple[float, int]]] = {}
        # the buckets' keys, ascending, and the buckets in that order (plain lists: they
        # change rarely, and are walked on every placement)
        self._keys: list[float] = []
        self._ordered: list[list[tuple[float, int]]] = []
        # where each node is filed now: its entry (None while it is not) and bucket key
        self._filed: list[tuple[float, int] | None] = []
        self._filed_key: list[float] = []
        self._total_cpus = self._total_gpus = self._total_mem = 0.0
        # nodes whose free resources name custom ones (summed only when there are any)
        self._with_custom = 0
        # nodes changed since the owner last cleared this (it keeps views of its own)
        self.dirty: set[int] = set()
        # nodes changed since they were filed: filed again at the next look, once however
        # often they changed (a wave of releases touches a node many times)
        self._stale: set[int] = set()
        for r in free:
            self.append(r)

    def __len__(self) -> int:
        return len(self._cpus)

    def __getitem__(self, node: int) -> Resources:
        return Resources(self._cpus[node], self._gpus[node], self._mem[node], self._custom[node])

    def __setitem__(self, node: int, value: Resources) -> None:
        self._changed(node)
        self._total_cpus += value.cpus - self._cpus[node]
        self._total_gpus += value.gpus - self._gpus[node]
        self._total_mem += value.memory - self._mem[node]
        self._with_custom += bool(value.custom) - bool(self._custom[node])
        self._cpus[node], self._gpus[node], self._mem[node] = value.cpus, value.gpus, value.memory
        self._custom[node] = value.custom

    def append(self, value: Resources) -> None:
        node = len(self._cpus)
        self._cpus.append(0.0)
        self._gpus.append(0.0)
        self._mem.append(0.0)
        self._custom.append(())
        self._filed.append(None)
        self._filed_key.append(0.0)
        self[node] = value

    def take(self, node: int, r: Resources) -> None:
        """`r` is granted on `node` (or held there)."""
        if r.custom:
            self[node] = self[node] - r
            return
        self.dirty.add(node)  # `_changed`, without the call (once per admission and release)
        self._stale.add(node)
        self._cpus[node] -= r.cpus
        self._gpus[node] -= r.gpus
        self._mem[node] -= r.memory
        self._total_cpus -= r.cpus
        self._total_gpus -= r.gpus
        self._total_mem -= r.memory

    def give(self, node: int, r: Resources) -> None:
        """`r` is free on `node` again."""
        if r.custom:
            self[node] = self[node] + r
            return
        self.dirty.add(node)  # `_changed`, without the call (once per admission and release)
        self._stale.add(node)
        self._cpus[node] += r.cpus
        self._gpus[node] += r.gpus
        self._mem[node] += r.memory
        self._total_cpus += r.cpus
        self._total_gpus += r.gpus
        self._total_mem += r.memory

    def cpus(self, node: int) -> float:
        return self._cpus[node]

    def holds(self, node: int, need: Resources) -> bool:
        """Whether `node` has `need` free (`need.fits_in(index[node])`, without building the
        node's bundle)."""
        if (
            need.cpus > self._cpus[node] + _EPS
            or need.gpus > self._gpus[node] + _EPS
            or need.memory > self._mem[node] + _EPS
        ):
            return False
        return not need.custom or need.fits_in(self[node])

    def total(self) -> Resources:
        """The sum over nodes (custom resources summed on demand: they are rare)."""
        custom: dict[str, float] = {}
        for each in self._custom if self._with_custom else ():
            for k, v in each:
                custom[k] = custom.get(k, 0.0) + v
        return Resources(
            self._total_cpus, self._total_gpus, self._total_mem, tuple(sorted(custom.items()))
        )

    def roomiest(self, need: Resources, exclude: int | None = None) -> int | None:
        """The node with the most free CPUs that holds `need` (the lowest index among equals),
        never `exclude`; None when none does."""
        if self._stale:
            self._refile()
        found = self._search(need, exclude)
        return None if found is None else found[0][1]

    def _search(
        self, need: Resources, exclude: int | None
    ) -> tuple[tuple[float, int], list[tuple[float, int]]] | None:
        """`roomiest`'s node as its filed entry, with the bucket it is filed in."""
        cpus, gpus, memory = need.cpus, need.gpus, need.memory
        free_gpus, free_mem = self._gpus, self._mem
        key = _ROUNDED.get(gpus)  # `_bucket`, without the call when remembered
        if key is None:
            key = _bucket(gpus)
        best: tuple[float, int] | None = None
        found: list[tuple[float, int]] | None = None
        for bucket in self._ordered[bisect_left(self._keys, key - 1e-6) :]:
            for entry in bucket:
                # `holds`, inline: this loop runs on every placement; a bucket's nodes are in
                # order of free CPUs, so the first without CPUs enough ends it
                if cpus > -entry[0] + _EPS or (best is not None and entry >= best):
                    break
                node = entry[1]
                if (
                    node != exclude
                    and gpus <= free_gpus[node] + _EPS
                    and memory <= free_mem[node] + _EPS
                    and (not need.custom or need.fits_in(self[node]))
                ):
                    best, found = entry, bucket
                    break
        return None if best is None or found is None else (best, found)

    def place(self, need: Resources, exclude: int | None = None) -> int | None:
        """`roomiest` and `take` in one: the node chosen for `need` (None when none holds it),
        with `need` taken there and the node filed again at once, where it was found. This is
        the admission path (one call per decision instead of three); releases still file their
        nodes lazily (`give`), since a wave of them touches a node many times."""
        if need.custom:
            node = self.roomiest(need, exclude)
            if node is not None:
                self.take(node, need)
            return node
        if self._stale:
            self._refile()
        searched = self._search(need, exclude)
        if searched is None:
            return None
        best, found = searched
        cpus, gpus, memory = need.cpus, need.gpus, need.memory
        free_gpus, free_mem = self._gpus, self._mem
        node = best[1]
        # `take`, inline
        self.dirty.add(node)
        left_cpus = self._cpus[node] = self._cpus[node] - cpus
        left_gpus = free_gpus[node] = free_gpus[node] - gpus
        free_mem[node] -= memory
        self._total_cpus -= cpus
        self._total_gpus -= gpus
        self._total_mem -= memory
        # filed again: out of the bucket it was found in, into the one of what it has left
        del found[bisect_left(found, best)]
        old_key = self._filed_key[node]
        new_key = _ROUNDED.get(left_gpus)
        if new_key is None:
            new_key = _bucket(left_gpus)
        entry = (-left_cpus, node)
        if not found:
            del self._buckets[old_key]
            at = bisect_left(self._keys, old_key)
            del self._keys[at], self._ordered[at]
        target = self._buckets.get(new_key)
        if target is None:
            target = self._buckets[new_key] = []
            at = bisect_left(self._keys, new_key)
            self._keys.insert(at, new_key)
            self._ordered.insert(at, target)
        insort(target, entry)
        self._filed[node], self._filed_key[node] = entry, new_key
        return node

    def _changed(self, node: int) -> None:
        self.dirty.add(node)
        self._stale.add(node)

    def _refile(self) -> None:
        """File the nodes changed since the last look under their free resources now."""
        buckets, keys, filed, filed_key = self._buckets, self._keys, self._filed, self._filed_key
        for node in self._stale:
            entry = (-self._cpus[node], node)
            gpus = self._gpus[node]
            key = _ROUNDED.get(gpus)  # `_bucket`, without the call when remembered
            if key is None:
                key = _bucket(gpus)
            old = filed[node]
            if old is not None:
                if old == entry and filed_key[node] == key:
                    continue
                was = buckets[filed_key[node]]
                del was[bisect_left(was, old)]
                if not was:
                    del buckets[filed_key[node]]
                    at = keys.index(filed_key[node])
                    del keys[at], self._ordered[at]
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = []
                at = bisect_left(keys, key)
                keys.insert(at, key)
                self._ordered.insert(at, bucket)
            insort(bucket, entry)
            filed[node], filed_key[node] = entry, key
        self._stale.clear()
