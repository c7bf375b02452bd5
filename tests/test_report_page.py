"""What a run's pictures show of a pool: a lane per worker, each item when it really ran on it
(items of a batch end to end), in trace.json, timeline.png and report.html, the page checked
in a real headless browser (Chromium, driven by Playwright)."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import timeline
from tests.conftest import TEST_SPECS, summary

ITEMS = 600
# how Chromium is started: headless, and never reaching out (the network is closed here)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def pool_run(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-worker pool whose 600 items travel in batches of 30."""
    from runner.cli import main

    run_dir = tmp_path_factory.mktemp("pool")
    code = main(
        [
            "--config-dir",
            str(TEST_SPECS),
            "run.progress=off",
            "pipeline=misbehave",
            f"run.dir={run_dir}",
            "pipeline.stages.work.worker._target_=tests.workers.Sleepy",
            "+pipeline.stages.work.worker.seconds=0.002",
            f"pipeline.stages.work.items.range={ITEMS}",
            "+pipeline.stages.work.batch_size=30",
        ]
    )
    assert code == 0
    return run_dir


def test_a_two_worker_pool_is_two_lanes_and_its_items_never_overlap(pool_run: Path) -> None:
    events = json.loads((pool_run / "trace.json").read_text())
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    assert len(threads) == 2
    lanes: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            lanes[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    assert sum(map(len, lanes.values())) == ITEMS and len(lanes) == 2
    for spans in lanes.values():
        spans.sort()
        # one item after another on its worker (1 µs: the trace's rounding)
        assert all(end <= start + 1 for (_, end), (start, _) in itertools.pairwise(spans))
    assert summary(pool_run)["stages"]["work"]["done"] == ITEMS


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium of the machine's (Debian's package; `.ci/run` installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_report_page_renders_with_its_picture_and_a_lane_per_worker(
    pool_run: Path, browser: Any
) -> None:
    page = browser.new_page()
    page.goto((pool_run / "report.html").as_uri())
    assert page.title() == f"misbehave {pool_run}"
    picture = page.locator('img[alt="timeline"]')
    assert picture.is_visible()
    size = picture.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
    # decoded by the browser; as tall as a picture of 2 rows, one per worker
    width, height = timeline.WIDTH * timeline.DPI, timeline.height_of(2) * timeline.DPI
    assert size == [True, round(width), round(height)]
    assert page.locator("#lanes").inner_text().startswith("2 lanes")
    cells = page.locator("table").first.locator("tbody tr").first.locator("td").all_inner_texts()
    header = page.locator("table").first.locator("th").all_inner_texts()
    stage = dict(zip(header, cells, strict=True))
    assert (stage["stage"], stage["lanes"], stage["units by state"]) == ("work", "2", "done: 600")
    headings = page.locator("h2").all_inner_texts()
    assert headings[:3] == ["Stages", "Timeline", "Attempts"]
    page.screenshot(path=str(pool_run / "report.png"), full_page=True)
