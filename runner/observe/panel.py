"""The live progress panel on a terminal: a title line, a bar, then the items (most important first)
flowed into as many lines as the width needs; an item wider than the terminal is folded, never cut."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported where the panel is drawn: a run logging JSON lines never loads it
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.text import Text

    from runner.control import Control
    from runner.money.accounting import Tally
    from runner.send.base import Gauges

WIDE = 120  # from this many columns on, the panel adds the items only wide terminals have room for
SEPARATOR = " · "


@dataclass(frozen=True)
class PanelState:
    """One moment of a run, as the panel shows it (plain values: the panel renders from another thread)."""

    phase: str  # what the run is doing: "reading input", "rendering and sending", "writing output", ...
    started: float  # time.monotonic() when the panel first showed
    job: str = ""
    model: str = ""
    currency: str = ""
    rows_total: int | None = None  # None until the input was counted
    rows_done: int = 0  # rows with an answer: settled before, answered now, or sharing a queued prompt
    rows_shared: int = 0  # rows answered by another row's identical request
    rows_before: int = 0  # rows answered by an earlier run
    rows_rendered: int = 0
    rendering: bool = False  # rows are still being rendered into requests
    requests_per_s: float | None = None  # recent rate of results
    eta_s: float | None = None
    in_flight: int | None = None
    limit: int | None = None
    adaptive: bool = False
    refused_share: float | None = None  # share of requests refused with 429 (concurrency, overload)
    failed: int = 0
    skipped: int = 0  # input.nulls: skip: not sent by decision
    retries: dict[str, int] = field(default_factory=dict)
    maybe_billed_twice: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    cached_tokens: int = 0
    spent: float | None = None  # None: no prices for this model
    projected: float | None = None
    max_cost: float | None = None
    batches: dict[str, int] = field(default_factory=dict)  # batch status -> batches in it (batch mode)
    # Lines in open batches and how many the Batch API counts completed / failed (request_counts).
    batch_lines: dict[str, int] = field(default_factory=dict)
    queue_refused: int = 0  # creates the model's full batch queue refused
    queue_waited_s: float = 0.0  # how long chunks waited for room in it
    stopping: str | None = None  # why dispatch stopped early (SIGINT, budget, aborted), if it did

    def counted(
        self, *, phase: str, tally: Tally, gauges: Gauges, control: Control, requests_per_s: float | None, priced: bool
    ) -> PanelState:
        """This run's state now, from the engine's counters: the Tally, the executor's gauges and the Control."""
        samples = max(1, tally.samples)
        total = tally.rows_total * samples
        done_requests = min(
            total, (tally.rows_settled + tally.rows_left_out) * samples + tally.answered + tally.requests_shared
        )
        remaining = total - done_requests
        eta = remaining / requests_per_s if requests_per_s else None
        return replace(
            self,
            phase=phase,
            rows_total=tally.rows_total,
            rows_done=done_requests // samples,
            rows_shared=tally.requests_shared // samples,
            rows_before=tally.rows_settled,
            rows_rendered=tally.rows_seen,
            rendering=not tally.all_rows_rendered and tally.rows_seen < tally.rows_total,
            requests_per_s=requests_per_s,
            eta_s=eta if remaining else 0.0,
            in_flight=gauges.in_flight,
            limit=gauges.limit,
            adaptive=bool(gauges.adaptive),
            refused_share=gauges.overload_429_rate,
            failed=tally.failed,
            skipped=tally.skipped,
            retries=dict(control.retries),
            maybe_billed_twice=len(control.maybe_billed),
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            thinking_tokens=tally.thinking_tokens,
            cached_tokens=tally.cache_read_input_tokens,
            spent=tally.cost if priced else None,
            projected=tally.projected_cost() if priced else None,
            batches=dict(gauges.batches or {}),
            batch_lines=dict(gauges.batch_lines or {}),
            queue_refused=(gauges.batch_queue or {}).get("refused", 0),
            queue_waited_s=(gauges.batch_queue or {}).get("waited_s", 0.0),
            stopping=control.reason,
        )


class ProgressPanel:
    """A rich renderable drawing the latest PanelState at whatever width the console offers."""

    def __init__(self, state: Callable[[], PanelState], clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._clock = clock

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The panel's lines at `options.max_width` columns."""
        yield from panel_lines(self._state(), options.max_width, self._clock())


def panel_lines(state: PanelState, width: int, now: float) -> list[Text]:
    """The panel at `width` columns: title, bar, then the items flowed into lines no wider than `width`."""
    width = max(20, width)
    lines = [_title(state, width, now)]
    if state.rows_total is not None:  # once the run has counted its input
        lines.append(_bar(state, width))
        lines += _flow(list(_items(state, wide=width >= WIDE)), width)
    return lines


def _title(state: PanelState, width: int, now: float) -> Text:
    """`job · model · phase` on the left, the elapsed time on the right (folded if the name is long)."""
    from rich.text import Text

    phase = state.phase
    if state.stopping in ("SIGINT", "SIGTERM"):
        phase = f"interrupted ({state.stopping}): finishing the requests in flight"
    elif state.stopping == "budget":
        phase = "run.max_cost reached: finishing the requests in flight"
    elif state.stopping is not None:
        phase = f"stopping ({state.stopping})"
    head = Text()
    for part, style in ((state.job, "bold"), (state.model, "cyan")):
        if part:
            head.append(part, style=style).append(SEPARATOR, style="dim")
    head.append(phase, style="yellow")
    clock = _duration(now - state.started)
    gap = width - head.cell_len - len(clock)
    if gap >= 1:
        head.append(" " * gap).append(clock, style="dim")
    else:
        head.append(" " + clock, style="dim")
    head.overflow = "fold"
    return head


def _bar(state: PanelState, width: int) -> Text:
    """The bar and `done/total rows pct`; the bar takes what the counts leave of the width."""
    from rich.text import Text

    total = state.rows_total or 0
    share = state.rows_done / total if total else 1.0
    counts = f" {state.rows_done:,}/{total:,} rows {100 * share:3.0f}%"
    room = max(10, width - len(counts))
    filled = round(room * share)
    line = Text()
    line.append("━" * filled, style="green" if share >= 1 else "magenta")
    line.append("━" * (room - filled), style="grey23")
    line.append(counts, style="bold")
    line.overflow = "fold"
    return line


def _items(state: PanelState, *, wide: bool) -> Iterator[Text]:
    """The panel's items in order of importance; the wide-only ones when `wide`."""
    if state.rendering:
        yield _item("rendered ", f"{state.rows_rendered:,}/{state.rows_total or 0:,}")
    rate = "-" if state.requests_per_s is None else f"{state.requests_per_s:,.1f}"
    yield _item("", rate, " req/s now")
    yield _item("ETA ", "-" if state.eta_s is None else _duration(state.eta_s))
    limit = "-" if state.limit is None else f"{state.limit}"
    flight = "-" if state.in_flight is None else f"{state.in_flight}"
    yield _item("in flight ", f"{flight}/{limit}", " auto" if state.adaptive else "")
    yield _item("429 refused ", "-" if state.refused_share is None else f"{100 * state.refused_share:.1f}%")
    yield _item("tokens ", f"{state.input_tokens:,}", " in / ", f"{state.output_tokens:,}", " out")
    if state.spent is None:
        yield _item("spent ", "no prices")
    elif state.projected is None:
        yield _item("spent ", f"{state.spent:.4f}", f" {state.currency}")
    else:
        yield _item("spent ", f"{state.spent:.4f}", " of ~", f"{state.projected:.4f}", f" {state.currency} projected")
    if state.rows_shared:
        yield _item("", f"{state.rows_shared:,}", " rows share a prompt")
    if state.rows_before:
        yield _item("", f"{state.rows_before:,}", " answered before")
    if state.failed:
        yield _item("failed ", f"{state.failed:,}", style="red")
    if state.skipped:
        yield _item("skipped ", f"{state.skipped:,}", " (nulls)")
    retries = sum(state.retries.values())
    if retries:
        yield _item("retries ", f"{retries:,}")
    if state.maybe_billed_twice:
        yield _item("may be billed twice ", f"{state.maybe_billed_twice:,}", style="red")
    if state.batches:
        parts = ", ".join(f"{n} {status}" for status, n in sorted(state.batches.items()))
        yield _item("batches ", parts)
    if state.batch_lines.get("open"):
        lines = state.batch_lines
        failed = f", {lines.get('failed', 0):,} failed" if lines.get("failed") else ""
        yield _item("at Zhipu ", f"{lines.get('completed', 0):,}/{lines['open']:,}", f" lines done{failed}")
    if state.queue_refused:
        yield _item("queue full: waited ", _duration(state.queue_waited_s), f" ({state.queue_refused:,} refused)")
    if wide:
        if state.thinking_tokens:
            yield _item("thinking ", f"{state.thinking_tokens:,}")
        if state.cached_tokens:
            yield _item("cached ", f"{state.cached_tokens:,}")
        if state.max_cost is not None and state.spent is not None:
            yield _item("cap ", f"{state.max_cost:g}", f" {state.currency}")
        for reason, n in sorted(state.retries.items(), key=lambda kv: -kv[1])[:3]:
            yield _item(f"{reason}: ", f"{n:,}", style="dim")


def _item(label: str, value: str, *rest: str, style: str = "bold") -> Text:
    """`label value rest...`: the label dim, the value (and every other part after it) in `style`."""
    from rich.text import Text

    text = Text(label, style="dim")
    text.append(value, style=style)
    for i, part in enumerate(rest):
        text.append(part, style=style if i % 2 else "dim")
    return text


def _flow(items: list[Text], width: int) -> list[Text]:
    """Items joined by ` · ` into lines of at most `width` cells, breaking only between items; an item
    wider than a whole line gets a line of its own and folds."""
    from rich.text import Text

    lines: list[Text] = []
    line = Text()
    for item in items:
        if line.cell_len and line.cell_len + len(SEPARATOR) + item.cell_len > width:
            lines.append(line)
            line = Text()
        if line.cell_len:
            line.append(SEPARATOR, style="dim")
        line.append_text(item)
    if line.cell_len:
        lines.append(line)
    for text in lines:
        text.overflow = "fold"
    return lines


def _duration(seconds: float) -> str:
    """`0:07`, `12:34`, `1:02:03`: seconds as clock time."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
