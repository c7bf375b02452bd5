"""`pynvml` for a whole runner with its embedded Ray: the driver and the Ray workers.

Put this folder first on PYTHONPATH and name a table in RUNNER_TEST_NVML (the JSON that
`python -m tests.fake_nvml` reads): every process of the run, Ray's workers too, then imports
this fake. `workers` in the table, when present, is what NVML reports inside Ray's workers
(GPUs that filled up after the plan was made); `devices` is what the runner itself sees.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.fake_nvml import module

_table = json.loads(Path(os.environ["RUNNER_TEST_NVML"]).read_text())
_in_worker = "default_worker" in (sys.argv[0] if sys.argv else "")
_devices = _table.get("workers", _table["devices"]) if _in_worker else _table["devices"]
_topology = {tuple(map(int, k.split(","))): v for k, v in _table.get("topology", {}).items()}
globals().update(
    {k: v for k, v in vars(module(_devices, _topology)).items() if not k.startswith("__")}
)
