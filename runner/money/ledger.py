"""The usage ledger: one row per (job, model, day) for every run, so spend can be followed over time.

    append(rows)          # at the end of each run (and pilot)
    usage()               # every row, for `glm-batch usage` and for calibration

Small Parquet files in $GLM_BATCH_LEDGER (simulated runs in `simulated/`); a ledger that cannot be
written warns and keeps its rows pending (docs/decisions.md, "State failures and the ledger").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import polars as pl

from runner.errors import GlmBatchError, first_line
from runner.files import write_atomic
from runner.money.tokens import Calibration

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


# What a failed ledger write raises: the OS's error, our writer's (a full disk), or polars' wrapping of it.
WRITE_FAILURES: tuple[type[Exception], ...] = (OSError, GlmBatchError, pl.exceptions.PolarsError)
PENDING = "ledger-pending"  # in a job's state folder: ledger rows a run could not append, booked by the next


def folder(*, simulated: bool = False) -> Path:
    """The ledger folder a run books into: the real one, or its simulated part."""
    return ledger_dir() / "simulated" if simulated else ledger_dir()


def problem(*, simulated: bool = False) -> str | None:
    """Why the ledger cannot be written (one line naming it), or None when it can. Creates the folder."""
    where = folder(simulated=simulated)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        return f"the usage ledger {where} cannot be written ({exc.strerror or exc}); set GLM_BATCH_LEDGER to a folder"
    return None


def keep_pending(rows: pl.DataFrame, run_id: str, state_dir: Path, *, simulated: bool) -> Path:
    """Keep rows the ledger did not take in the job's state folder, for the next run to book."""
    pending = state_dir / PENDING
    pending.mkdir(parents=True, exist_ok=True)
    path = pending / f"{run_id}{'.simulated' if simulated else ''}.parquet"
    write_atomic(rows.select(list(LEDGER_SCHEMA)).cast(pl.Schema(LEDGER_SCHEMA)), path)
    return path


def book_pending(state_dir: Path) -> int:
    """Append the rows earlier runs of this job left pending; how many runs' rows were booked. A file
    the ledger still does not take stays for the next run; one that does not read is dropped."""
    booked = 0
    for path in sorted((state_dir / PENDING).glob("*.parquet")):
        run_id, _, kind = path.name.removesuffix(".parquet").partition(".")
        try:
            rows = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError):
            continue
        try:
            append(rows, run_id, simulated=kind == "simulated")
        except WRITE_FAILURES:  # it waits for the next run, as before
            continue
        with contextlib.suppress(OSError):
            path.unlink()
        booked += 1
    return booked


def append(rows: pl.DataFrame, run_id: str, *, simulated: bool = False) -> None:
    """Add one run's rows (in LEDGER_SCHEMA) to the ledger (its simulated part for simulator runs)."""
    if rows.height == 0:
        return
    where = folder(simulated=simulated)
    where.mkdir(parents=True, exist_ok=True)
    write_atomic(rows.select(list(LEDGER_SCHEMA)).cast(pl.Schema(LEDGER_SCHEMA)), where / f"{run_id}.parquet")


def usage(*, simulated: bool = False, skipped: list[tuple[Path, str]] | None = None) -> pl.DataFrame:
    """Every ledger row ever written (empty frame if none): real spend, or with `simulated` the
    simulator's make-believe spend. A file that does not read (torn) is left out, and added to
    `skipped` with the reason."""
    try:
        files = sorted(folder(simulated=simulated).glob("*.parquet"))
    except OSError:
        files = []
    if not files:
        return pl.DataFrame(schema=LEDGER_SCHEMA)
    try:
        return pl.scan_parquet(files, schema=LEDGER_SCHEMA).collect()
    except (pl.exceptions.PolarsError, OSError):
        pass
    frames = []
    for path in files:
        try:
            frames.append(pl.read_parquet(path).select(list(LEDGER_SCHEMA)).cast(pl.Schema(LEDGER_SCHEMA)))
        except (pl.exceptions.PolarsError, OSError) as exc:
            if skipped is not None:
                skipped.append((path, first_line(exc)))
    return pl.concat(frames) if frames else pl.DataFrame(schema=LEDGER_SCHEMA)


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
