"""Free capacity per node, indexed so that placing a request does not look at every node.

The scheduler places a request on the node with the most free CPUs that holds it (it spreads
load). A scan of every node per decision makes a 1,000-node cluster cost nodes × units; here
the nodes are kept in buckets by their free GPUs, each bucket sorted by free CPUs
(`sortedcontainers`), so a request looks only at the buckets with GPUs enough, and in each one
stops at the first node that holds it: usually the first it looks at.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from sortedcontainers import SortedList

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
    """Each node's free resources (a list, by node index), and the roomiest node for a shape."""

    def __init__(self, free: list[Resources]) -> None:
        self._free: list[Resources] = []
        self._buckets: dict[float, SortedList[tuple[float, int]]] = {}
        # the buckets' keys, ascending (a plain list: they change rarely, and are looked up
        # on every placement)
        self._keys: list[float] = []
        self._total_cpus = self._total_gpus = self._total_mem = 0.0
        # nodes whose free resources name custom ones (summed only when there are any)
        self._custom = 0
        # nodes changed since the owner last cleared this (it keeps views of its own)
        self.dirty: set[int] = set()
        # nodes out of their bucket since they changed: filed again at the next look, once
        # however often they changed (a wave of releases touches a node many times)
        self._stale: set[int] = set()
        for r in free:
            self.append(r)

    def __len__(self) -> int:
        return len(self._free)

    def __getitem__(self, node: int) -> Resources:
        return self._free[node]

    def __iter__(self) -> Iterator[Resources]:
        return iter(self._free)

    def __setitem__(self, node: int, value: Resources) -> None:
        self.dirty.add(node)
        old = self._free[node]
        if node not in self._stale:
            self._unfile(node, old)
            self._stale.add(node)
        self._free[node] = value
        self._total_cpus += value.cpus - old.cpus
        self._total_gpus += value.gpus - old.gpus
        self._total_mem += value.memory - old.memory
        if old.custom or value.custom:
            self._custom += bool(value.custom) - bool(old.custom)

    def append(self, value: Resources) -> None:
        node = len(self._free)
        self.dirty.add(node)
        self._stale.add(node)
        self._free.append(value)
        self._count(value, 1.0)

    def total(self) -> Resources:
        """The sum over nodes (custom resources summed on demand: they are rare)."""
        custom: dict[str, float] = {}
        for r in self._free if self._custom else ():
            for k, v in r.custom:
                custom[k] = custom.get(k, 0.0) + v
        return Resources(
            self._total_cpus, self._total_gpus, self._total_mem, tuple(sorted(custom.items()))
        )

    def roomiest(self, need: Resources, exclude: int | None = None) -> int | None:
        """The node with the most free CPUs that holds `need` (the lowest index among equals),
        never `exclude`; None when none does."""
        for node in self._stale:
            self._file(node, self._free[node])
        self._stale.clear()
        best: tuple[float, int] | None = None
        keys = self._keys
        start = bisect.bisect_left(keys, _bucket(need.gpus) - 1e-6)
        for i in range(start, len(keys)):
            for entry in self._buckets[keys[i]]:
                if -entry[0] < need.cpus - _EPS or (best is not None and entry >= best):
                    break
                node = entry[1]
                if node != exclude and need.fits_in(self._free[node]):
                    best = entry
                    break
        return None if best is None else best[1]

    def _file(self, node: int, r: Resources) -> None:
        key = _bucket(r.gpus)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = SortedList()
            bisect.insort(self._keys, key)
        bucket.add((-r.cpus, node))

    def _unfile(self, node: int, r: Resources) -> None:
        key = _bucket(r.gpus)
        bucket = self._buckets[key]
        bucket.remove((-r.cpus, node))
        if not bucket:
            del self._buckets[key]
            self._keys.remove(key)

    def _count(self, r: Resources, sign: float) -> None:
        """Keep the sums over nodes."""
        self._custom += int(sign) * bool(r.custom)
        self._total_cpus += sign * r.cpus
        self._total_gpus += sign * r.gpus
        self._total_mem += sign * r.memory
