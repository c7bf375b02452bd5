"""GPU inventory through NVML (pynvml), imported lazily; no NVML means no GPUs, not a crash.

`inventory()` lists the GPUs this process may use (an inherited CUDA_VISIBLE_DEVICES, by index
or UUID, is honoured) in PCI bus order, which is the order CUDA uses when
CUDA_DEVICE_ORDER=PCI_BUS_ID and the order `nvidia-smi` shows. `eligible()` keeps those with
enough free memory; `groups()` cuts them into groups of a size, preferring GPUs that are close
in NVML's topology (same board or PCIe switch before the CPU's host bridge or another socket).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

GB = 1 << 30
# the custom Ray resource that names one GPU of a node by its NVML index: a node that declares
# `runner_gpu_<i>: 1` for each of its GPUs lets a shard ask for exactly the GPUs it was given
RESOURCE_PREFIX = "runner_gpu_"
# NVML topology levels, nearest first (nvmlGpuTopologyLevel_t): internal, single switch,
# multiple switches, host bridge, NUMA node, across sockets
TOPOLOGY_FAR = 60


@dataclass(frozen=True)
class Gpu:
    """One visible GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    # PCI bus id ("00000000:3B:00.0"), the order CUDA and nvidia-smi use
    pci_bus_id: str = ""

    def describe(self) -> str:
        return (
            f"GPU {self.index} ({self.free_bytes / GB:.1f} GB free of {self.total_bytes / GB:.1f})"
        )


class _Memory(Protocol):
    """`nvmlDeviceGetMemoryInfo`'s answer: bytes."""

    total: int
    free: int
    used: int


class _Pci(Protocol):
    """`nvmlDeviceGetPciInfo`'s answer, as far as it is read."""

    busId: bytes | str


class Nvml(Protocol):
    """The part of the pynvml module read here (names and handles as NVML's C API has them;
    strings are bytes in older pynvml versions)."""

    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> _Memory: ...
    def nvmlDeviceGetPciInfo(self, handle: object) -> _Pci: ...
    def nvmlDeviceGetUUID(self, handle: object) -> bytes | str: ...
    def nvmlDeviceGetName(self, handle: object) -> bytes | str: ...
    # absent on some platforms and fakes: looked for before it is called
    def nvmlDeviceGetTopologyCommonAncestor(self, a: object, b: object) -> int: ...


@contextmanager
def _nvml() -> Iterator[Nvml | None]:
    """The initialised pynvml module, or None when NVML (or a GPU driver) is absent."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and OSError when the library is absent
        log.debug("NVML unavailable: %s", exc)
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def inventory(cuda_visible: str | None = None) -> list[Gpu]:
    """The GPUs this process may use (honouring CUDA_VISIBLE_DEVICES), in PCI bus order."""
    with _nvml() as nvml:
        if nvml is None:
            return []
        found = [_read(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    found.sort(key=lambda g: (g.pci_bus_id, g.index))
    visible = cuda_visible if cuda_visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    return _visible(found, visible)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(nvml: Nvml, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        bus = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
    except Exception:  # very old drivers or partial fakes: fall back to NVML's index order
        bus = ""
    return Gpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        used_bytes=int(mem.used),
        pci_bus_id=bus,
    )


def _visible(found: list[Gpu], cuda_visible: str | None) -> list[Gpu]:
    """The GPUs CUDA_VISIBLE_DEVICES names, in its order; entries are indices or UUIDs
    (a UUID prefix as CUDA accepts, `GPU-` optional); an empty value hides every GPU."""
    if cuda_visible is None:
        return found
    chosen: list[Gpu] = []
    for want in (w.strip() for w in cuda_visible.split(",")):
        if not want:
            continue
        match = _match(found, want)
        if match is None:
            break  # CUDA stops at the first entry it cannot resolve
        if match not in chosen:
            chosen.append(match)
    return chosen


def _match(found: list[Gpu], want: str) -> Gpu | None:
    if want.lstrip("-").isdigit():
        return next((g for g in found if g.index == int(want)), None)
    prefix = want if want.startswith(("GPU-", "MIG-")) else f"GPU-{want}"
    hits = [g for g in found if g.uuid.startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


def eligible(gpus: Sequence[Gpu], min_free_gb: float) -> list[Gpu]:
    """The GPUs with at least `min_free_gb` GB of free memory."""
    return [g for g in gpus if g.free_bytes >= min_free_gb * GB]


def topology() -> dict[tuple[int, int], int]:
    """NVML's topology level between each pair of GPUs (by index); empty when unknown."""
    levels: dict[tuple[int, int], int] = {}
    with _nvml() as nvml:
        if nvml is None or not hasattr(nvml, "nvmlDeviceGetTopologyCommonAncestor"):
            return levels
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        for a in range(count):
            for b in range(a + 1, count):
                try:
                    level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]))
                except Exception:  # not supported on this platform (e.g. some VMs, WSL)
                    return {}
                levels[(a, b)] = levels[(b, a)] = level
    return levels


def groups(
    gpus: Sequence[Gpu], size: int, levels: dict[tuple[int, int], int] | None = None
) -> list[list[Gpu]]:
    """Disjoint groups of `size` GPUs, each as close as the topology allows.

    Greedy: seed each group with the first free GPU in bus order, then add the free GPU
    nearest to the group (ties by bus order). Without topology, groups are runs in bus order.
    """
    if size < 1:
        return []
    free = list(gpus)
    levels = levels or {}
    made: list[list[Gpu]] = []
    while len(free) >= size:
        group = [free.pop(0)]
        while len(group) < size:
            nearest = min(
                free,
                key=lambda g: max(levels.get((g.index, m.index), TOPOLOGY_FAR) for m in group),
            )
            free.remove(nearest)
            group.append(nearest)
        made.append(group)
    return made


def resource(index: int) -> str:
    """The custom Ray resource that stands for GPU `index` (NVML's index) of a node."""
    return f"{RESOURCE_PREFIX}{index}"


def declared(custom: Sequence[tuple[str, float]]) -> list[int]:
    """The GPU indices a node names with one custom resource each, in index order."""
    found = []
    for name, amount in custom:
        digits = name.removeprefix(RESOURCE_PREFIX)
        if name.startswith(RESOURCE_PREFIX) and digits.isdigit() and amount >= 1:
            found.append(int(digits))
    return sorted(found)


def short_of_memory(cuda_visible: str, min_free_gb: float) -> list[Gpu]:
    """Which of the GPUs in `cuda_visible` have less than `min_free_gb` free (none without NVML).

    Runs where the GPUs are: inside a shard's Ray task, on the node that owns them."""
    if min_free_gb <= 0:
        return []
    assigned = inventory(cuda_visible)
    return [g for g in assigned if g.free_bytes < min_free_gb * GB]
