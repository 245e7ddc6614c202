"""What a run did, read back from its output and the summary beside it (for `glm-batch report`). Reused
rows sent nothing and are left out of time and tokens; the timeline is the latest run's."""

from __future__ import annotations

import datetime as dt
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import polars as pl

from runner.columns import BILLED_COLUMNS
from runner.errors import UsageError
from runner.money.accounting import percentile
from runner.observe.summary import Summary

TIMELINE_BINS = 60
LATENCY_BINS = 24
_TIER = re.compile(r"^(?:in<(\d+))?,?(?:out<(\d+))?$")

_WANTED = (
    "status",
    "error_type",
    "finished_at",
    "latency_ms",
    "attempts",
    "repairs",
    *BILLED_COLUMNS,
    "reused_from",
    "run_id",
    "model",
)


@dataclass(frozen=True)
class OutputFile:
    """An output read back for a report: its columns and the summary beside it, each read once."""

    path: Path
    columns: list[str]
    summary: Summary  # every field at its default when there is none


def open_output(path: Path) -> OutputFile:
    """The output at `path`, refused in one line when it is missing or is not a glm-batch output."""
    if not path.exists():
        raise UsageError(f"{path}: no such output file")
    try:
        columns = list(pl.read_parquet_schema(path))
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise UsageError(f"{path}: cannot read it as Parquet ({exc}); give a glm-batch output or a job spec") from None
    if "status" not in columns:
        raise UsageError(f"{path}: not a glm-batch output (no status column); give its job spec instead")
    return OutputFile(path, columns, Summary.read(path))


def run_figures(output: OutputFile) -> dict[str, Any]:
    """The figures of the run behind an output file and the summary beside it."""
    summary = output.summary
    frame = pl.read_parquet(output.path, columns=[c for c in _WANTED if c in output.columns])
    for column in _WANTED:  # an older output may lack a column: treat it as empty
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None).alias(column))
    sent = frame.filter(pl.col("reused_from").is_null())
    runs = sent.filter(pl.col("run_id").is_not_null()).group_by("run_id").len().sort("run_id")
    latest = runs.get_column("run_id").to_list()[-1] if runs.height else None
    latest_rows = sent.filter(pl.col("run_id") == latest) if latest is not None else sent.clear()
    models = sent.get_column("model").drop_nulls().value_counts(sort=True)
    return {
        "rows": frame.height,
        "by_status": _counts(frame.get_column("status")),
        "rows_sent": sent.height,
        "rows_reused": frame.height - sent.height,
        "runs": dict(zip(runs.get_column("run_id").to_list(), runs.get_column("len").to_list(), strict=True)),
        "run_id": latest,
        "model": models.row(0)[0] if models.height else summary.model,
        "endpoint": summary.endpoint,
        "date": _when(latest_rows),
        "currency": summary.cost.currency,
        "tokens": {
            name: int(sent.get_column(column).fill_null(0).sum())
            for name, column in (
                ("input", "input_tokens"),
                ("output", "output_tokens"),
                ("thinking", "thinking_tokens"),
                ("cache_read", "cache_read_input_tokens"),
            )
        },
        "cost": float(frame.get_column("cost").fill_null(0).sum())
        if frame.get_column("cost").null_count() < frame.height
        else None,
        "timeline": timeline(latest_rows),
        "latency": latency(sent),
        "errors": _counts(
            frame.filter(~pl.col("status").is_in(["ok", "skipped"])).get_column("error_type").fill_null("unknown")
        ),  # skipped rows (input.nulls: skip) are a decision, not an error: by_status counts them
        "tiers": by_tier(sent, list(summary.cost.by_tier)),
        "attempts": {str(k): v for k, v in sorted(_counts(sent.get_column("attempts").fill_null(0)).items())},
        "repaired": int((frame.get_column("repairs").fill_null(0) > 0).sum()),
        "repaired_valid": int(
            ((frame.get_column("repairs").fill_null(0) > 0) & (frame.get_column("status") == "ok")).sum()
        ),
    }


def timeline(rows: pl.DataFrame, bins: int = TIMELINE_BINS) -> dict[str, Any]:
    """Rows finished a second and mean requests in flight (exact, from `finished_at - latency_ms` to
    `finished_at`), in `bins` equal slices of the run's span."""
    timed = rows.filter(pl.col("finished_at").is_not_null() & pl.col("latency_ms").is_not_null())
    if timed.height == 0:
        return {"bin_s": None, "start": None, "throughput": [], "concurrency": []}
    # Seconds from the first answer, counted in whole microseconds first: epoch seconds as floats keep
    # only a quarter of a microsecond, enough to draw touching calls as overlapping.
    first = int(timed.get_column("finished_at").dt.epoch("us").min())  # type: ignore[arg-type]
    end = (pl.col("finished_at").dt.epoch("us") - first).cast(pl.Float64) / 1e6
    spans = timed.select(start=end - pl.col("latency_ms").cast(pl.Float64) / 1000, end=end)
    t0 = float(spans.get_column("start").min())  # type: ignore[arg-type]
    t1 = float(spans.get_column("end").max())  # type: ignore[arg-type]
    width = max((t1 - t0) / bins, 1e-3)
    edges = [t0 + i * width for i in range(bins + 1)]
    finished = spans.select(
        [
            pl.col("end")
            .is_between(edges[i], edges[i + 1], closed="left" if i < bins - 1 else "both")
            .sum()
            .alias(str(i))
            for i in range(bins)
        ]
    ).row(0)
    busy = spans.select(
        [
            (
                pl.min_horizontal(pl.col("end"), pl.lit(edges[i + 1]))
                - pl.max_horizontal(pl.col("start"), pl.lit(edges[i]))
            )
            .clip(lower_bound=0)
            .sum()
            .alias(str(i))
            for i in range(bins)
        ]
    ).row(0)
    return {
        "bin_s": width,
        "start": t0 + first / 1e6,
        "throughput": [round(n / width, 3) for n in finished],
        "concurrency": [round(b / width, 3) for b in busy],
    }


def latency(rows: pl.DataFrame, bins: int = LATENCY_BINS) -> dict[str, Any]:
    """The latency distribution of the requests answered ok: equal-width bins and p50/p90/p99."""
    values = rows.filter(pl.col("status") == "ok").get_column("latency_ms").drop_nulls().cast(pl.Float64)
    if values.len() == 0:
        return {"edges_ms": [], "counts": [], "p50": None, "p90": None, "p99": None}
    top = float(values.max())  # type: ignore[arg-type]
    width = max(top / bins, 1e-6)
    index = (values / width).floor().clip(0, bins - 1).cast(pl.Int64)
    counts = [0] * bins
    for i, n in zip(*index.value_counts().to_dict(as_series=False).values(), strict=True):
        counts[int(i)] = int(n)
    ordered = array("d", values.to_list())
    return {
        "edges_ms": [round(i * width, 1) for i in range(bins + 1)],
        "counts": counts,
        **{f"p{q}": percentile(ordered, q) for q in (50, 90, 99)},
    }


def by_tier(rows: pl.DataFrame, tiers: list[str]) -> dict[str, dict[str, float]]:
    """Requests, tokens and cost per price tier. The tiers are the summary's (`in<32000,out<200`, ...);
    a request falls in the first, narrowest first, whose bounds hold, as the price table decides."""
    bounds = sorted((_bounds(t), t) for t in tiers if _TIER.match(t) or t == "all")
    tier = pl.lit(bounds[-1][1] if bounds else "all")
    input_length = pl.col("input_tokens").fill_null(0) + pl.col("cache_read_input_tokens").fill_null(0)
    for (max_in, max_out), name in reversed(bounds):
        holds = pl.lit(True)
        if max_in != float("inf"):
            holds = holds & (input_length < max_in)
        if max_out != float("inf"):
            holds = holds & (pl.col("output_tokens").fill_null(0) < max_out)
        tier = pl.when(holds).then(pl.lit(name)).otherwise(tier)
    grouped = (
        rows.filter(pl.col("status") == "ok")
        .group_by(tier.alias("tier"))
        .agg(
            requests=pl.len(),
            input_tokens=pl.col("input_tokens").fill_null(0).sum(),
            output_tokens=pl.col("output_tokens").fill_null(0).sum(),
            cost=pl.col("cost").fill_null(0).sum(),
        )
        .sort("tier")
    )
    return {row.pop("tier"): row for row in grouped.iter_rows(named=True)}


def _bounds(tier: str) -> tuple[float, float]:
    """A tier label's bounds (input, output), unbounded as infinity, for ordering narrowest first."""
    match = _TIER.match(tier)
    if match is None or tier == "all":
        return (float("inf"), float("inf"))
    max_in, max_out = match.groups()
    return (float(max_in) if max_in else float("inf"), float(max_out) if max_out else float("inf"))


def _counts(series: pl.Series) -> dict[Any, int]:
    """Each value's count, most frequent first."""
    counted = series.value_counts(sort=True)
    return {row[0]: int(row[1]) for row in counted.iter_rows()}


def _when(rows: pl.DataFrame) -> str | None:
    """When a run's rows finished: `2025-01-02 03:04 UTC`, or a range of days."""
    finished = rows.get_column("finished_at").drop_nulls()
    if finished.len() == 0:
        return None
    first, last = (cast(dt.datetime, value) for value in (finished.min(), finished.max()))
    text = f"{first:%Y-%m-%d %H:%M}"
    return text + (f" - {last:%Y-%m-%d %H:%M} UTC" if f"{last:%Y-%m-%d}" != f"{first:%Y-%m-%d}" else " UTC")
