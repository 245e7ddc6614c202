"""The usage ledger: one row per (job, model, day) of every run, as small Parquet files in
$GLM_BATCH_LEDGER (simulated runs in `simulated/`); one that cannot be written keeps its rows pending."""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import polars as pl

from runner.errors import GlmBatchError, first_line
from runner.files import LEDGER, user_data, write_atomic
from runner.job.resolve import Job
from runner.money.booked import Booked
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


def ledger_dir(*, simulated: bool = False) -> Path:
    """Where the ledger lives; with `simulated`, its part for the simulator's runs."""
    where = user_data(*LEDGER)
    return where / "simulated" if simulated else where


# What a failed ledger write raises: the OS's error, our writer's (a full disk), or polars' wrapping of it.
WRITE_FAILURES: tuple[type[Exception], ...] = (OSError, GlmBatchError, pl.exceptions.PolarsError)
PENDING = "ledger-pending"  # in a job's state folder: ledger rows a run could not append, booked by the next


def keep_pending(rows: pl.DataFrame, run_id: str, state_dir: Path, *, simulated: bool) -> Path:
    """Keep rows the ledger did not take in the job's state folder, for the next run to book."""
    return _write(rows, state_dir / PENDING / f"{run_id}{'.simulated' if simulated else ''}.parquet")


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
    _write(rows, ledger_dir(simulated=simulated) / f"{run_id}.parquet")


def _write(rows: pl.DataFrame, path: Path) -> Path:
    """Write ledger rows to `path` in LEDGER_SCHEMA, its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(rows.select(list(LEDGER_SCHEMA)).cast(pl.Schema(LEDGER_SCHEMA)), path)
    return path


def usage(*, simulated: bool = False, skipped: list[tuple[Path, str]] | None = None) -> pl.DataFrame:
    """Every ledger row ever written, real or (`simulated`) the simulator's; a file that does not read
    is left out and added to `skipped` with the reason."""
    try:
        files = sorted(ledger_dir(simulated=simulated).glob("*.parquet"))
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
            answered = int(subset.get_column("requests_ok").sum())
            return Calibration.measured(subset, answered, "this job" if scope == "job" else model)
    return Calibration()


ByDay = dict[tuple[dt.date, str], dict[str, float]]  # a run's counters per (day, model): Tally.by_day


def ledger_rows(job: Job, by_day: ByDay, run_id: str) -> pl.DataFrame:
    """This run's ledger rows: one per (day, model) it got answers on."""
    rows = [
        {
            "day": day,
            "job": job.name,
            "model": model or job.spec.model.name,
            "endpoint": job.endpoint_name,
            "currency": job.currency,
            "run_id": run_id,
            **{k: v if k == "cost" else int(v) for k, v in counts.items()},
        }
        for (day, model), counts in sorted(by_day.items())
    ]
    return pl.DataFrame(rows, schema=LEDGER_SCHEMA) if rows else pl.DataFrame(schema=LEDGER_SCHEMA)


def check_ledger(job: Job, notify: Callable[..., None]) -> None:
    """Before the first request: can the ledger be written (its folder made)? If not, a warning, and the
    run goes on (a cron job must still run; its spend waits in the state folder)."""
    where = ledger_dir(simulated=job.base_url is None)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        reason = f"the usage ledger {where} cannot be written ({exc.strerror or exc}); set GLM_BATCH_LEDGER to a folder"
        then = "the run goes on; its spend is kept in the job's state folder and the next run books it"
        notify("ledger_unwritable", reason=reason, then=then)


def book_spend(job: Job, by_day: ByDay, run_id: str, notify: Callable[..., None]) -> Booked:
    """Add the run's spend, and what earlier runs left pending, to the ledger. Never fails a paid run:
    rows it does not take wait in the state folder (keep_pending), said on stderr and in the summary."""
    simulated = job.base_url is None
    try:
        booked = book_pending(job.state_dir)
    except WRITE_FAILURES:  # the state folder itself does not read: nothing to book from it
        booked = 0
    status = Booked(str(ledger_dir(simulated=simulated)), pending_booked=booked or None)
    rows = ledger_rows(job, by_day, run_id)
    try:
        append(rows, run_id, simulated=simulated)
    except WRITE_FAILURES as exc:
        reason = _one_line(exc)
        try:
            pending: str | None = str(keep_pending(rows, run_id, job.state_dir, simulated=simulated))
        except WRITE_FAILURES:
            pending = None
        warning = f"the usage ledger {status.path} was not written: {reason}"
        status = replace(status, written=False, warning=warning, pending=pending)
        notify("ledger_not_written", reason=reason, pending=pending or "nowhere: see cost in the summary")
    return status


def _one_line(exc: Exception) -> str:
    """An error as one line, naming the file for an OSError."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return first_line(exc)
