"""The live progress panel: every figure a person watching a run needs, in 80 columns and in 200.

The panel is rendered on a captured rich Console (record=True) at a fixed width, as a terminal of that
width would show it; nothing may pass the width or be cut short with an ellipsis.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from rich.text import Text

from runner.control import Control
from runner.jsonrecord import from_json
from runner.money.accounting import Tally
from runner.observe.panel import PanelState, ProgressPanel
from runner.observe.progress import LineReporter, RichReporter
from runner.observe.summary import Summary
from runner.send.base import Gauges

STARTED = 1000.0


@pytest.fixture
def busy_run() -> PanelState:
    """A big run half way: resumed, sharing prompts, retrying, spending, with batches in three states."""
    tally = Tally(
        rows_total=1_000_000,
        rows_seen=600_000,
        rows_settled=12_345,
        requests_queued=500_000,
        requests_shared=14,
        ok=456_789,
        failed=12,
        input_tokens=123_456_789,
        output_tokens=98_765_432,
        thinking_tokens=5_000_000,
        cache_read_input_tokens=1_234_567,
        cost=1234.567891,
    )
    control = Control()
    control.retries.update({"429/1302": 1234, "connection": 56, "timeout": 7})
    control.maybe_billed.extend([100, 200])
    gauges = Gauges(
        in_flight=16,
        limit=16,
        adaptive=True,
        overload_429_rate=0.018,
        batches={"in_progress": 2, "completed": 1, "validating": 1},
        batch_lines={"open": 3000, "completed": 1234, "failed": 5},  # request_counts at the last looks
        batch_queue={"refused": 3, "waited_s": 72.4},
    )
    started = PanelState(
        "", STARTED, job="nightly-product-reviews", model="glm-4.5-air", currency="CNY", max_cost=5000.0
    )
    return started.counted(
        phase="rendering and sending", tally=tally, gauges=gauges, control=control, requests_per_s=47.8, priced=True
    )


def small_run(tally: Tally, *, requests_per_s: float | None, priced: bool) -> PanelState:
    """A small job "j" on model "m", sending, with no gauges and no retries: all there is to see is `tally`."""
    return PanelState("", STARTED, job="j", model="m", currency="CNY").counted(
        phase="sending", tally=tally, gauges=Gauges(), control=Control(), requests_per_s=requests_per_s, priced=priced
    )


def shown(state: PanelState, width: int) -> str:
    """The panel as a terminal `width` columns wide shows it, 75 seconds into the run."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(ProgressPanel(lambda: state, clock=lambda: STARTED + 75))
    return console.export_text()


REQUIRED = [
    "nightly-product-reviews",
    "glm-4.5-air",
    "rendering and sending",
    "1:15",  # elapsed
    "469,160/1,000,000 rows  47%",  # rows settled before + answered + sharing a prompt
    "47.8 req/s now",
    "ETA 3:05:05",
    "in flight 16/16 auto",
    "429 refused 1.8%",
    "tokens 123,456,789 in / 98,765,432 out",
    "spent 1234.5679 of ~2669.2743 CNY projected",
    "14 rows share a prompt",
    "12,345 answered before",
    "failed 12",
    "retries 1,297",
    "may be billed twice 2",
    "batches 1 completed, 2 in_progress, 1 validating",
    "at Zhipu 1,234/3,000 lines done, 5 failed",
    "queue full: waited 1:12 (3 refused)",
    "rendered 600,000/1,000,000",
]


@pytest.mark.parametrize("width", [80, 200])
def test_the_panel_shows_every_figure_within_the_width_and_cuts_nothing(busy_run: PanelState, width: int) -> None:
    text = shown(busy_run, width)
    print(text)

    for element in REQUIRED:
        assert element in text, element
    lines = text.rstrip("\n").split("\n")
    assert all(len(line) <= width for line in lines)
    assert "…" not in text and "..." not in text
    assert "━" * 30 in lines[1]  # the bar has a line of its own, under the title


def test_a_wide_terminal_gets_a_longer_bar_fewer_lines_and_more_detail(busy_run: PanelState) -> None:
    narrow, wide = shown(busy_run, 80), shown(busy_run, 200)

    assert len(wide.splitlines()) < len(narrow.splitlines()) <= 8  # every item there is, batch ones too
    assert wide.splitlines()[1].count("━") > 150 > 70 > narrow.splitlines()[1].count("━")
    for extra in ("thinking 5,000,000", "cached 1,234,567", "cap 5000 CNY", "429/1302: 1,234"):
        assert extra in wide and extra not in narrow


def test_the_panel_says_what_the_run_does_before_there_is_anything_to_count() -> None:
    screen = io.StringIO()
    reporter = RichReporter(screen, console=Console(width=80, file=screen, force_terminal=True))

    reporter.phase("reading input")  # shown at once, as the engine's first call
    first = Text.from_ansi(screen.getvalue()).plain.strip()
    reporter.finish(FINISHED, "done")

    assert first.startswith("reading input") and first.endswith("0:00")
    assert "req/s" not in first  # nothing counted yet, so no figures that would all read zero


def test_rows_sharing_a_prompt_count_as_done() -> None:
    tally = Tally(rows_total=20, requests_queued=6, requests_shared=14, ok=6, all_rows_rendered=True, rows_seen=20)

    text = shown(small_run(tally, requests_per_s=3.0, priced=False), 80)

    assert "20/20 rows 100%" in text and "14 rows share a prompt" in text and "ETA 0:00" in text
    assert "spent no prices" in text


def test_samples_count_rows_not_requests() -> None:
    tally = Tally(rows_total=10, samples=3, requests_queued=15, ok=15, rows_seen=10, all_rows_rendered=True)

    assert "5/10 rows  50%" in shown(small_run(tally, requests_per_s=None, priced=True), 80)


def test_phases_print_no_json_line_so_machines_see_what_they_always_saw() -> None:
    out = io.StringIO()
    reporter = LineReporter(out, as_json=True, interval_s=10)

    reporter.phase("reading input")
    reporter.event("retrying", reason="429")

    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["retrying"]


FINISHED = from_json(
    Summary,
    {
        "job": "sentiment",
        "rows_total": 6,
        "rows_settled_before": 0,
        "answered_ok": 6,
        "answered_error": 0,
        "tokens": {"input": 600, "output": 60},
        "cost": {"currency": "CNY", "spent": 0.001},
        "elapsed_s": 1.0,
        "requests_per_s": 6.0,
        "latency_ms": {"p50": 10.0, "p99": 20.0},
        "retries": {},
        "exit_code": 0,
        "quality": {
            "metrics": {"accuracy": 0.8333, "rows_with_gold": 6},
            "field_exact_match": {"score": {"rows_with_gold": 6, "exact_match": 0.5}},
        },
    },
)


def test_the_final_table_shows_accuracy_when_gold_labels_are_set() -> None:
    console = Console(width=80, record=True, file=io.StringIO())

    RichReporter(io.StringIO(), console=console).finish(FINISHED, "done")

    text = console.export_text()
    assert "accuracy" in text and "0.8333 on 6 rows with a gold label" in text
    assert "score: exact match" in text and "0.5000 on 6 rows" in text
