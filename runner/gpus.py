"""GPU inventory through NVML (pynvml), imported lazily; no NVML means no GPUs, not a crash."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    """One visible GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


def inventory() -> list[Gpu]:
    """The GPUs this process may use (honouring CUDA_VISIBLE_DEVICES), in PCI bus order."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and OSError when the library is absent
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        found = [_read(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()
    return _visible(found, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _read(nvml: object, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
    uuid = nvml.nvmlDeviceGetUUID(handle)  # type: ignore[attr-defined]
    name = nvml.nvmlDeviceGetName(handle)  # type: ignore[attr-defined]
    return Gpu(
        index=index,
        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        name=name.decode() if isinstance(name, bytes) else str(name),
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        used_bytes=int(mem.used),
    )


def _visible(found: list[Gpu], cuda_visible: str | None) -> list[Gpu]:
    if cuda_visible is None:
        return found
    wanted = [w.strip() for w in cuda_visible.split(",") if w.strip()]
    by_index = {str(g.index): g for g in found}
    by_uuid = {g.uuid: g for g in found}
    return [g for w in wanted if (g := by_index.get(w) or by_uuid.get(w)) is not None]
