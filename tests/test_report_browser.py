"""The HTML report, opened in a real headless browser: self-contained, drawn, proportional, readable.

Uses the system's Chromium (Debian's `chromium`; `.ci/run` installs it) through Playwright, which
downloads no browser of its own. Without Chromium the test is skipped on a workstation, never in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import runner
from runner.observe.report import load_report
from runner.observe.report_html import html_page
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows

MakeJob = Callable[..., JobFiles]

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


def write_page(spec: Path, html: Path) -> Path:
    """What `glm-batch report JOB --html FILE` writes: the page of the job's output, read with its spec."""
    job = runner.load_job(str(spec))
    html.write_text(html_page(load_report(job.output_path, job=job)), encoding="utf-8")
    return html


def screenshot(page: Any, path: Path) -> None:
    """The whole page as a PNG, left for a human to look at (also in $REPORT_SCREENSHOTS when set)."""
    page.screenshot(path=str(path), full_page=True)
    if folder := os.environ.get("REPORT_SCREENSHOTS"):
        shutil.copy(path, Path(folder) / path.name)


def opened(page: Any, html: Path) -> list[str]:
    """Open the page; the problems the browser found, after checking that it fetched nothing but itself."""
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(html.as_uri())
    assert requested == [html.as_uri()]
    return problems


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


def test_the_html_report_opens_in_a_browser_and_draws_the_figures(
    make_job: MakeJob, sim: SimulatorThread, tmp_path: Path
) -> None:
    job = make_job(
        REVIEWS,
        output={"labels": ["positive", "negative"], "keep_columns": ["text"], "samples": 3},
        model={"temperature": 0.7},
        eval={"gold_column": "gold"},
    )
    assert cli("run", str(job.spec)).exit_code == 0
    summary = json.loads(job.summary.read_text())
    metrics = summary["quality"]["metrics"]
    html = write_page(job.spec, tmp_path / "report.html")

    with headless_page() as page:
        assert opened(page, html) == []  # self-contained, and the browser found nothing wrong
        screenshot(page, tmp_path / "labeling-report.png")

        # The header names the model, the run, the tokens and the cost.
        header = page.locator("#header").inner_text()
        for part in ("glm-4.6", summary["run_id"], f"{summary['tokens']['input']:,} in", "CNY"):
            assert part in header
        assert "accuracy 0.8333 on 6 rows" in page.locator("#headline").inner_text()
        assert page.locator("#voting").inner_text().startswith("3 samples a row: mean agreement 1.0")
        assert "repaired: the first answer did not validate" in page.locator("#repaired").inner_text()

        # The confusion matrix is drawn as a 2 x 3 grid of visible cells (gold x predicted + invalid)...
        cells = page.locator("#confusion rect")
        boxes = [cells.nth(i).bounding_box() for i in range(cells.count())]
        assert len(boxes) == 6
        assert all(b is not None and b["width"] > 20 and b["height"] > 20 for b in boxes)
        assert len({b["x"] for b in boxes}) == 3 and len({b["y"] for b in boxes}) == 2
        # ...shaded by count: the fullest cell has the strongest fill, as the browser computed it...
        counts = [n for row in metrics["confusion"].values() for n in row.values()]
        opacity = [float(cells.nth(i).evaluate("el => getComputedStyle(el).fillOpacity")) for i in range(6)]
        assert opacity.index(max(opacity)) == counts.index(max(counts))
        # ...and its count is written in white on it, the empty cells' in black.
        numbers = page.locator("#confusion text[text-anchor=middle][fill]")
        ink = [numbers.nth(i).evaluate("el => getComputedStyle(el).fill") for i in range(numbers.count())]
        assert ink[counts.index(max(counts))] == "rgb(255, 255, 255)"
        assert ink[counts.index(0)] == "rgb(0, 0, 0)"

        # The bars are as long as their counts, relative to the longest: predicted labels, and how many
        # samples agreed with each row's vote (all 3 of 3 here: this simulator never wavers).
        for chart, counted in (
            ("#distribution", metrics["predicted_distribution"]),
            ("#agreement", {"3 of 3": 6, "2 of 3": 0, "1 of 3": 0, "no answer": 0}),
        ):
            bars = page.locator(f"{chart} rect")
            widths = [bars.nth(i).bounding_box()["width"] for i in range(bars.count())]
            assert len(widths) == len(counted)
            for width, count in zip(widths, counted.values(), strict=True):
                assert width == pytest.approx(max(widths) * count / max(counted.values()), abs=1.0)
        assert page.locator("#agreement text").first.text_content() == "3 of 3"

        # The one wrong answer is listed with its text, the gold label beside the answer.
        wrong = page.locator("#wrong tr").nth(1).inner_text()
        assert "Not what I hoped for" in wrong and "negative" in wrong and "positive" in wrong


def test_a_free_text_job_gets_a_drawn_report_of_its_run(make_job: MakeJob, tmp_path: Path) -> None:
    job = make_job(sample_rows(40), run={"concurrency": 4})
    assert cli("run", str(job.spec)).exit_code == 0
    html = write_page(job.spec, tmp_path / "report.html")

    with headless_page() as page:
        assert opened(page, html) == []
        screenshot(page, tmp_path / "text-report.png")

        assert "40 ok" in page.locator("#header").inner_text()
        assert page.locator("#headline").count() == 0  # no quality section for a job without answers to score
        # Rows finished and requests in flight over time: 60 columns each, the tallest full height,
        # never more requests in flight than the job's concurrency.
        for chart in ("#throughput", "#concurrency"):
            columns = page.locator(f"{chart} div")
            heights = [columns.nth(i).bounding_box()["height"] for i in range(columns.count())]
            assert len(heights) == 60 and max(heights) == pytest.approx(120, abs=1.5)
        flight = [
            float(t)
            for t in page.locator("#concurrency div").evaluate_all("els => els.map(e => e.title.split(' ')[0])")
        ]
        assert 0 < max(flight) <= 4  # exact: a call's span is read inside its slot (runner.send.online)
        latency = page.locator("#latency div")
        assert sum(1 for i in range(latency.count()) if latency.nth(i).bounding_box()["height"] > 0) >= 1
        assert "p50" in page.locator("#latency-percentiles").inner_text()
        assert page.locator("#tiers tr").count() == 2  # the header and the one tier these requests fell in
