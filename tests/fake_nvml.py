"""A table-driven stand-in for the `pynvml` module: the one boundary the tests fake.

`install(monkeypatch, devices, topology)` puts it in `sys.modules["pynvml"]`, so the runner's
lazy `import pynvml` finds it. A device is a dict: uuid, name, total_gb, free_gb and optionally
bus (PCI bus id). `topology` maps a pair of indices to an NVML topology level (10 = same board,
20 = one PCIe switch, 30 = several switches, 40 = host bridge, 50 = NUMA node, 60 = system).

`python -m tests.fake_nvml TABLE.json ARGS...` runs `runner ARGS` with the fake installed, so a
test can watch a user's view of a GPU machine (plan mode needs no Ray).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GB = 1 << 30


class NVMLError(Exception):
    """What pynvml raises."""


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Pci:
    # pynvml's field name
    busId: str


def module(
    devices: Sequence[Mapping[str, Any]],
    topology: Mapping[tuple[int, int], int] | None = None,
    driver: bool = True,
) -> types.ModuleType:
    """A `pynvml` module over a table of devices (`driver=False`: nvmlInit fails)."""
    fake = types.ModuleType("pynvml")
    levels = {**(topology or {}), **{(b, a): v for (a, b), v in (topology or {}).items()}}

    def init() -> None:
        if not driver:
            raise NVMLError("NVML Shared Library Not Found")

    def memory(index: int) -> _Memory:
        d = devices[index]
        total, free = int(d["total_gb"] * GB), int(d["free_gb"] * GB)
        return _Memory(total, free, total - free)

    def common_ancestor(a: int, b: int) -> int:
        return levels.get((a, b), 60)

    fake.NVMLError = NVMLError  # type: ignore[attr-defined]
    fake.nvmlInit = init  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUUID = lambda i: devices[i]["uuid"]  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda i: devices[i].get("name", "Fake GPU").encode()  # type: ignore[attr-defined]
    fake.nvmlDeviceGetPciInfo = lambda i: _Pci(  # type: ignore[attr-defined]
        devices[i].get("bus", f"00000000:{i:02X}:00.0")
    )
    fake.nvmlDeviceGetTopologyCommonAncestor = common_ancestor  # type: ignore[attr-defined]
    return fake


def install(
    monkeypatch: pytest.MonkeyPatch,
    devices: Sequence[Mapping[str, Any]],
    topology: Mapping[tuple[int, int], int] | None = None,
    driver: bool = True,
) -> None:
    """Make `import pynvml` find the fake for the length of one test."""
    monkeypatch.setitem(sys.modules, "pynvml", module(devices, topology, driver))


def h100s(*free_gb: float) -> list[dict[str, Any]]:
    """A table of 80 GB GPUs with the given free memory each."""
    return [
        {"uuid": f"GPU-{n:08x}-0000", "name": "NVIDIA H100 80GB HBM3", "total_gb": 80, "free_gb": f}
        for n, f in enumerate(free_gb)
    ]


def _main(argv: list[str]) -> int:
    table = json.loads(Path(argv[0]).read_text())
    topology = {tuple(map(int, k.split(","))): v for k, v in table.get("topology", {}).items()}
    sys.modules["pynvml"] = module(table["devices"], topology, table.get("driver", True))
    from runner.cli import main
    from runner.cluster import end_process

    return end_process(main(argv[1:]))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
