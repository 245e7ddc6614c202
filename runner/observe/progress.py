"""Progress for people and for machines: a live bar on a terminal, JSON lines (`event`, `ts`) under cron.
Nothing here sees the API key."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TextIO

from runner.jsonrecord import as_json
from runner.observe.panel import PanelState, ProgressPanel

if TYPE_CHECKING:  # rich is imported by the one reporter that draws with it
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from runner.control import Control
    from runner.job.resolve import Job
    from runner.money.accounting import Tally
    from runner.observe.summary import Cost, Quality, Summary
    from runner.send.base import Gauges

LogFormat = Literal["auto", "rich", "json", "text"]


class Reporter(Protocol):
    """What the engine tells the outside world while it runs."""

    interval_s: float

    def phase(self, name: str) -> None: ...
    def start(self, job: Job, tally: Tally) -> None: ...
    def tick(self, tally: Tally, gauges: Gauges, control: Control) -> None: ...
    def event(self, name: str, **fields: Any) -> None: ...
    def finish(self, summary: Ending, message: str) -> None: ...


class Ending(Protocol):
    """What a run ends with, for the reporter: its record (a run's runner.observe.summary.Summary, a
    cascade's own), a dataclass written as JSON by runner.jsonrecord, with its exit code."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def exit_code(self) -> int | None: ...


def make_reporter(fmt: LogFormat = "auto", stream: TextIO | None = None, interval_s: float = 10.0) -> Reporter:
    """A rich display on a terminal, JSON lines elsewhere (or what `fmt` asks for)."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "rich" if out.isatty() else "json"
    if fmt == "rich":
        return RichReporter(out)
    return LineReporter(out, as_json=fmt == "json", interval_s=interval_s)


def _progress_fields(tally: Tally, gauges: Gauges, control: Control) -> dict[str, Any]:
    return {
        "rows_total": tally.rows_total,
        "rows_seen": tally.rows_seen,
        "settled_before": tally.rows_settled,
        "queued": tally.requests_queued,
        "ok": tally.ok,
        "failed": tally.failed,
        "skipped": tally.skipped,
        "in_flight": gauges.in_flight,
        "concurrency": gauges.limit,
        "overload_429_rate": gauges.overload_429_rate,
        "requests_per_s": round(tally.rate(), 2),
        "input_tokens": tally.input_tokens,
        "output_tokens": tally.output_tokens,
        "cost": round(tally.cost, 6),
        "projected_cost": None if (p := tally.projected_cost()) is None else round(p, 6),
        "retries": dict(control.retries),
        "maybe_billed_twice": len(control.maybe_billed),
        **({"batches": gauges.batches} if gauges.batches else {}),
        **({"batch_lines": gauges.batch_lines} if (gauges.batch_lines or {}).get("open") else {}),
        **({"batch_queue": gauges.batch_queue} if (gauges.batch_queue or {}).get("refused") else {}),
    }


class _Periodic:
    """What the line reporters share: a `progress` record at most every `interval_s`."""

    interval_s: float
    _last = 0.0  # when the last one was emitted (time.monotonic)

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def tick(self, tally: Tally, gauges: Gauges, control: Control) -> None:
        if time.monotonic() - self._last < self.interval_s:
            return
        self._last = time.monotonic()
        self._emit("progress", _progress_fields(tally, gauges, control))


class LineReporter(_Periodic):
    """Periodic log lines: JSON objects, or `key=value` text."""

    def __init__(self, out: TextIO, *, as_json: bool, interval_s: float) -> None:
        self._out = out
        self._json = as_json
        self.interval_s = interval_s

    def phase(self, name: str) -> None:
        """Nothing: machines get `start`, `progress` and `end`, exactly as before phases existed."""

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        record = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "event": event, **fields}
        line = json.dumps(record, default=str, ensure_ascii=False) if self._json else text_line(record)
        print(line, file=self._out, flush=True)

    def start(self, job: Job, tally: Tally) -> None:
        self._emit(
            "start",
            {
                "job": job.name,
                "model": job.spec.model.name,
                "endpoint": job.endpoint_name,
                "rows_total": tally.rows_total,
                "concurrency": job.concurrency,
            },
        )
        self._last = time.monotonic()

    def event(self, name: str, **fields: Any) -> None:
        self._emit(name, fields)

    def finish(self, summary: Ending, message: str) -> None:
        self._emit("end", {"message": message, **as_json(summary)})


class LogReporter(_Periodic):
    """Progress as records of the `glm_batch` logger (the Python API's default): INFO for progress,
    WARNING for what went wrong; quiet (warnings aside) until the host configures logging."""

    def __init__(self, logger: logging.Logger | None = None, interval_s: float = 10.0) -> None:
        self._log = logger or logging.getLogger("glm_batch")
        self.interval_s = interval_s

    def _emit(self, event: str, fields: dict[str, Any], level: int = logging.INFO) -> None:
        if self._log.isEnabledFor(level):
            record = {"event": event, **fields}
            self._log.log(level, "%s", text_line(record), extra={"glm_batch": record})

    def phase(self, name: str) -> None:
        self._emit("phase", {"phase": name}, logging.DEBUG)

    def start(self, job: Job, tally: Tally) -> None:
        self._emit("start", {"job": job.name, "model": job.spec.model.name, "rows_total": tally.rows_total})
        self._last = time.monotonic()

    def event(self, name: str, **fields: Any) -> None:
        level = logging.WARNING if name.endswith(("_not_written", "_failed", "_lost")) else logging.INFO
        self._emit(name, fields, level)

    def finish(self, summary: Ending, message: str) -> None:
        self._emit("end", {"message": message, "exit_code": summary.exit_code})


def _wall_time(summary: Summary) -> str:
    """The run's wall time and its two rates: over the whole run (start-up, planning and writing the
    output included) and while answers came (what the live panel showed)."""
    line = f"{summary.elapsed_s or 0.0:.1f} s ({summary.requests_per_s} req/s over the whole run"
    answering = summary.requests_per_s_answering
    return line + (f", {answering} while answers came)" if answering is not None else ")")


def text_value(value: Any) -> str:
    """One field's value in a text log line: numbers and booleans bare (`true`), strings bare unless they
    hold spaces, quotes, `=` or nothing (then JSON-quoted), lists and mappings as compact JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def text_line(record: dict[str, Any]) -> str:
    """A log record as `event key=value key=value`: the event first, then every field but the ones that
    are None, each value as `text_value` writes it."""
    fields = " ".join(f"{k}={text_value(v)}" for k, v in record.items() if k != "event" and v is not None)
    return f"{record.get('event', 'log')} {fields}".rstrip()


class RichReporter:
    """A live panel (runner.observe.panel) from the first phase to the end; then a table of the run."""

    interval_s = 0.5
    RATE_WINDOW_S = 30.0  # the rate and the ETA follow the last this many seconds

    def __init__(self, out: TextIO, console: Console | None = None) -> None:
        from rich.console import Console

        self._console = console or Console(file=out)
        self._state = PanelState(phase="starting", started=time.monotonic())
        self._live: Live | None = None
        self._phase: str | None = "starting"  # None: derive it from the counts (rendering, sending)
        self._priced = False
        self._recent: deque[tuple[float, int]] = deque()

    def phase(self, name: str) -> None:
        """Say what the run is doing now ("reading input", "resuming", "writing output"); shown at once."""
        self._phase = name
        self._state = replace(self._state, phase=name)
        self._show()

    def _show(self) -> None:
        from rich.live import Live

        if self._live is None:
            self._live = Live(
                ProgressPanel(lambda: self._state), console=self._console, refresh_per_second=4, transient=False
            )
            self._live.start(refresh=True)  # on screen now, not at the first auto-refresh
        else:
            self._live.refresh()

    def start(self, job: Job, tally: Tally) -> None:
        from runner.control import Control
        from runner.money.pricing import price_table  # the reporter is built before any job is read
        from runner.send.base import Gauges

        self._state = replace(
            self._state, job=job.name, model=job.spec.model.name, currency=job.currency, max_cost=job.spec.run.max_cost
        )
        self._priced = price_table(job) is not None
        self._phase = None  # from now on the counts say whether it renders or sends, until told otherwise
        self.tick(tally, Gauges(), Control())

    def tick(self, tally: Tally, gauges: Gauges, control: Control) -> None:
        now = time.monotonic()
        self._recent.append((now, tally.answered))
        while len(self._recent) > 2 and now - self._recent[1][0] >= self.RATE_WINDOW_S:
            self._recent.popleft()
        (t0, n0) = self._recent[0]
        rate = (tally.answered - n0) / (now - t0) if now - t0 >= 1.0 else None
        if rate is None and tally.answered:
            rate = tally.rate()
        rendering = not tally.all_rows_rendered and tally.rows_seen < tally.rows_total
        phase = self._phase or ("waiting for batches" if gauges.batches else "sending")
        if self._phase is None and rendering:
            phase = "rendering and sending"
        self._state = self._state.counted(
            phase=phase, tally=tally, gauges=gauges, control=control, requests_per_s=rate, priced=self._priced
        )
        self._show()

    def event(self, name: str, **fields: Any) -> None:
        from rich.text import Text

        line = text_line({"event": name, **fields}).removeprefix(name).strip()
        self._console.print(Text.assemble((name, "yellow"), ": ", line), highlight=False)

    def finish(self, summary: Ending, message: str) -> None:
        from runner.observe.summary import Summary

        if self._live is not None:
            self._state = replace(self._state, phase="done" if summary.exit_code == 0 else "ended")
            self._live.stop()  # the last frame stays on the screen, above the table
        if not isinstance(summary, Summary):  # a cascade's record: its stages' tables were shown
            return
        s = summary
        rows = [
            ("rows", str(s.rows_total)),
            *([("samples a row", str(s.samples_per_row))] if s.samples_per_row > 1 else []),
            ("rows reused from earlier runs", str(s.rows_settled_before)),
            ("requests answered ok / failed", f"{s.answered_ok} / {s.answered_error}"),
            *([("rows skipped (input.nulls: skip)", str(s.rows_skipped))] if s.rows_skipped else []),
            ("tokens in / out", f"{s.tokens.input} / {s.tokens.output}"),
            ("cost", _cost_line(s.cost)),
            ("wall time", _wall_time(s)),
            ("latency p50 / p99", f"{_ms(s.latency_ms.p50)} / {_ms(s.latency_ms.p99)}"),
            ("retries", ", ".join(f"{k}: {v}" for k, v in s.retries.items()) or "none"),
            *_quality_rows(s.quality),
            ("exit code", str(s.exit_code)),
        ]
        self._console.print(pairs_table(f"glm-batch: {s.job}", rows))  # the CLI prints `message` itself


def pairs_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column label / value table whose values wrap (never cut off) on a narrow terminal."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    return table


def _quality_rows(quality: Quality | None) -> list[tuple[str, str]]:
    """The final table's lines on quality, when the job has gold labels: accuracy, per-field rates."""
    if quality is None:
        return []
    rows = []
    metrics = quality.metrics
    if metrics and metrics.accuracy is not None:
        rows.append(("accuracy", f"{metrics.accuracy:.4f} on {metrics.rows_with_gold} rows with a gold label"))
    for name, rate in (quality.field_exact_match or {}).items():
        if rate.exact_match is not None:
            rows.append((f"{name}: exact match", f"{rate.exact_match:.4f} on {rate.rows_with_gold} rows"))
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _cost_line(cost: Cost) -> str:
    if cost.spent is None:
        return f"no {cost.currency} prices for this model"
    line = f"{cost.spent:.6f} {cost.currency}"
    check = cost.estimate
    if check is not None and check.error_pct is not None and check.estimated is not None:
        line += f" (estimated {check.estimated:.6f}, {check.error_pct:+.1f}%)"
    return line
