"""The usage ledger: one row per (job, model, day) for every run, so spend can be followed over time.

    append(rows)          # at the end of each run (and pilot)
    usage()               # every row, for `glm-batch usage` and for calibration

It is a folder of small Parquet files (one per run, written atomically) in $GLM_BATCH_LEDGER, by
default ~/.local/share/glm-batch/ledger, shared by every job on the machine. Runs on the built-in
simulator book their make-believe spend in a folder of its own (`simulated/` inside the ledger), so it
never mixes with real money nor calibrates real estimates.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from runner.money.tokens import Calibration
from runner.state.files import write_atomic

LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "job": pl.String(),
    "model": pl.String(),
    "endpoint": pl.String(),
    "currency": pl.String(),
    "run_id": pl.String(),
    "requests_ok": pl.Int64(),
    "requests_failed": pl.Int64(),
    "input_tokens": pl.Int64(),
    "cache_read_input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "est_input_tokens": pl.Int64(),
    "cost": pl.Float64(),
}


def ledger_dir() -> Path:
    """Where the ledger lives."""
    configured = os.environ.get("GLM_BATCH_LEDGER")
    if configured:
        return Path(configured)
    return Path.home() / ".local" / "share" / "glm-batch" / "ledger"


def append(rows: pl.DataFrame, run_id: str, *, simulated: bool = False) -> None:
    """Add one run's rows (in LEDGER_SCHEMA) to the ledger (its simulated part for simulator runs)."""
    if rows.height == 0:
        return
    folder = ledger_dir() / "simulated" if simulated else ledger_dir()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(rows.select(list(LEDGER_SCHEMA)).cast(pl.Schema(LEDGER_SCHEMA)), folder / f"{run_id}.parquet")


def usage(*, simulated: bool = False) -> pl.DataFrame:
    """Every ledger row ever written (empty frame if none): real spend, or with `simulated` the
    simulator's make-believe spend."""
    files = sorted((ledger_dir() / "simulated" if simulated else ledger_dir()).glob("*.parquet"))
    if not files:
        return pl.DataFrame(schema=LEDGER_SCHEMA)
    return pl.scan_parquet(files, schema=LEDGER_SCHEMA).collect()


def summarise(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Totals of the ledger grouped by `by` (any of job, model, day, endpoint, currency)."""
    return (
        frame.group_by([*by, "currency"])
        .agg(
            pl.col("run_id").n_unique().alias("runs"),
            pl.col("requests_ok").sum().alias("ok"),
            pl.col("requests_failed").sum().alias("failed"),
            pl.col("input_tokens").sum().alias("tokens_in"),
            pl.col("cache_read_input_tokens").sum().alias("cached_in"),
            pl.col("output_tokens").sum().alias("tokens_out"),
            pl.col("cost").sum().round(6),
        )
        .sort(by)
    )


def calibration(job: str, model: str, *, simulated: bool = False) -> Calibration:
    """The input-token ratio measured by earlier runs: of this job if it has any, else of this model;
    from the simulator's runs for a simulated job and only from real ones otherwise (never mixed)."""
    rows = usage(simulated=simulated).filter(pl.col("model") == model, pl.col("est_input_tokens") > 0)
    for scope, subset in (("job", rows.filter(pl.col("job") == job)), ("model", rows)):
        if subset.height:
            totals = subset.select(
                (pl.col("input_tokens").sum() + pl.col("cache_read_input_tokens").sum()).alias("actual"),
                pl.col("est_input_tokens").sum().alias("estimated"),
            )
            actual, estimated = int(totals.item(0, "actual")), int(totals.item(0, "estimated"))
            answered = int(subset.get_column("requests_ok").sum())
            source = f"{answered} answers of {'this job' if scope == 'job' else model}"
            return Calibration(actual / estimated, answered, f"measured on {source}")
    return Calibration()
