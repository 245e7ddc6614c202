"""The HTML quality report, opened in a real headless browser: self-contained, drawn, proportional.

Uses the system's Chromium (Debian's `chromium`; `.ci/run` installs it) through Playwright, which
downloads no browser of its own. Without Chromium the test is skipped on a workstation, never in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from runner.testing.simulator import SimulatorThread
from tests.conftest import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags that keep Chromium off the network and quiet on a machine with no outside access.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs Chromium: apt-get install chromium"
)

REVIEWS = [
    {"id": "1", "text": "Great phone, I love it", "gold": "positive"},
    {"id": "2", "text": "Terrible battery, broke in a week", "gold": "negative"},
    {"id": "3", "text": "The best purchase this year", "gold": "positive"},
    {"id": "4", "text": "Awful support and a bad screen", "gold": "negative"},
    {"id": "5", "text": "Not what I hoped for", "gold": "positive"},  # the simulator's lexicon says negative
    {"id": "6", "text": "Nice and cheap", "gold": "positive"},
]


@contextlib.contextmanager
def headless_page() -> Iterator[Any]:
    """A page in a headless Chromium. Opened only after the run: Playwright's sync API keeps an event
    loop on this thread while it is open, and a run starts its own."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        pytest.fail("CI must have Chromium (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 900})
        finally:
            browser.close()


def test_the_html_report_opens_in_a_browser_and_draws_the_figures(make_job, sim: SimulatorThread, tmp_path) -> None:
    job = make_job(
        REVIEWS,
        output={"labels": ["positive", "negative"], "keep_columns": [], "samples": 3},
        model={"temperature": 0.7},
        eval={"gold_column": "gold"},
    )
    assert cli("run", str(job.spec)).exit_code == 0
    metrics = json.loads(job.summary.read_text())["quality"]["metrics"]
    html = tmp_path / "report.html"
    assert cli("report", str(job.spec), "--html", str(html)).exit_code == 0

    with headless_page() as page:
        requested: list[str] = []
        problems: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(html.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)  # left for a human to look at

        # Self-contained: the page fetched nothing but itself, and the browser found nothing wrong.
        assert requested == [html.as_uri()]
        assert problems == []
        assert "accuracy 0.8333 on 6 rows" in page.locator("#headline").inner_text()
        assert page.locator("#voting").inner_text().startswith("3 samples a row: mean agreement 1.0")

        # The confusion matrix is drawn as a 2 x 3 grid of visible cells (gold x predicted + invalid)...
        cells = page.locator("#confusion rect")
        boxes = [cells.nth(i).bounding_box() for i in range(cells.count())]
        assert len(boxes) == 6
        assert all(b is not None and b["width"] > 20 and b["height"] > 20 for b in boxes)
        assert len({b["x"] for b in boxes}) == 3 and len({b["y"] for b in boxes}) == 2
        # ...shaded by count: the fullest cell has the strongest fill, as the browser computed it.
        counts = [n for row in metrics["confusion"].values() for n in row.values()]
        opacity = [float(cells.nth(i).evaluate("el => getComputedStyle(el).fillOpacity")) for i in range(6)]
        assert opacity.index(max(opacity)) == counts.index(max(counts))

        # The bars are as long as their counts, relative to the longest: predicted labels, and how many
        # samples agreed with each row's vote (all 3 of 3 here: this simulator never wavers).
        for chart, counts in (
            ("#distribution", metrics["predicted_distribution"]),
            ("#agreement", {"3 of 3": 6, "2 of 3": 0, "1 of 3": 0, "no answer": 0}),
        ):
            bars = page.locator(f"{chart} rect")
            widths = [bars.nth(i).bounding_box()["width"] for i in range(bars.count())]
            assert len(widths) == len(counts)
            for width, count in zip(widths, counts.values(), strict=True):
                assert width == pytest.approx(max(widths) * count / max(counts.values()), abs=1.0)
        assert page.locator("#agreement text").first.text_content() == "3 of 3"
