"""Starts announced through the run directory (`cluster.shared_fs: true`): a file per task,
written in one go with no rename, and read by the runner once a turn."""

from __future__ import annotations

import json
from pathlib import Path

from runner.placement import Starts

WHERE = {"node_id": "n1", "node_ip": "10.0.0.1", "host": "h", "pid": 42, "time": 1.5}


def test_a_half_written_start_is_read_again_the_next_turn_then_removed(tmp_path: Path) -> None:
    starts = Starts(tmp_path, shared_fs=True)
    to = starts.address()
    assert to.path is not None
    text = json.dumps(WHERE)
    Path(to.path).parent.mkdir()
    Path(to.path).write_text(text[: len(text) // 2])  # the task is still writing it
    starts.turn()
    assert starts.heard(to) is None
    Path(to.path).write_text(text)
    starts.turn()
    found = starts.heard(to)
    assert found is not None and (found.worker, found.time) == ("h:42", 1.5)
    assert not Path(to.path).exists()
