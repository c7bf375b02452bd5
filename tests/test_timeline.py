"""Every run draws its timeline picture; mode=report redraws the last run's."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from runner.timeline import OUTCOME


def png_pixels(path: Path) -> tuple[int, int, set[tuple[int, int, int]]]:
    """(width, height, the set of colours) of an 8-bit RGB PNG written without filters."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    colours = {
        tuple(raw[y * stride + 1 + x * 3 : y * stride + 4 + x * 3])
        for y in range(height)
        for x in range(0, width, 2)
    }
    return width, height, colours  # type: ignore[return-value]


@pytest.mark.usefixtures("ray_session")
def test_a_run_draws_its_lanes_and_outcomes_and_report_redraws_it(cli, tmp_path: Path) -> None:
    res = cli(
        "pipeline=misbehave",
        f"run.dir={tmp_path}",
        "pipeline.stages.work.max_failures=2",
        "pipeline.stages.work.worker._target_=tests.workers.Faulty",
        "+pipeline.stages.work.worker.fail=[1]",
    )
    assert res.code == 0, res.text
    picture = tmp_path / "timeline.png"
    assert f"timeline: {picture}" in res.text
    width, height, colours = png_pixels(picture)
    assert width == 1200 and height > 100
    assert OUTCOME["done"] in colours and OUTCOME["failed"] in colours

    picture.unlink()
    again = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=report")
    assert again.code == 0
    assert f"wrote {picture}" in again.out
    assert picture.exists()


def test_report_before_any_run_says_so(cli, tmp_path: Path) -> None:
    res = cli("pipeline=misbehave", f"run.dir={tmp_path}", "mode=report")
    assert res.code == 0
    assert "no run to draw yet" in res.out
