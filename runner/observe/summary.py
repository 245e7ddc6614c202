"""What a run says when it ends: its exit code and message, its summary record, its ledger rows.

The summary is written beside the output (`<output>.summary.json`) and appended to the manifest; the
message ends with the exact command that resumes the same job (overrides and limits included).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from typing import Any

import polars as pl

from runner.control import Control
from runner.errors import STATE_FAILURES, BudgetExhausted, DiskFull, first_line
from runner.files import write_summary
from runner.job.resolve import Job
from runner.money import ledger
from runner.money.accounting import Accountant, Tally
from runner.observe.progress import Reporter
from runner.state.store import Store


def ledger_rows(job: Job, tally: Tally, run_id: str) -> pl.DataFrame:
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
        for (day, model), counts in sorted(tally.by_day.items())
    ]
    return pl.DataFrame(rows, schema=ledger.LEDGER_SCHEMA) if rows else pl.DataFrame(schema=ledger.LEDGER_SCHEMA)


def outcome(
    job: Job, control: Control, failed_rows: int | None, resume: str | None = None, skipped_rows: int = 0
) -> tuple[int, str]:
    """The exit code and message; for a finished run they describe the whole output, not just this run.
    Rows skipped by `input.nulls: skip` are said apart and never make a run fail."""
    resume = resume or f"glm-batch run {job.spec_path}"
    if control.reason == "budget":
        return BudgetExhausted.exit_code, (
            f"stopped before run.max_cost ({job.spec.run.max_cost} {job.currency}) could be exceeded; "
            f"answers so far are saved; continue later with: {resume}"
        )
    if control.failed is not None:
        return control.failed.exit_code, f"{control.failed}; answers so far are saved; resume with: {resume}"
    if control.aborted is not None:
        return control.aborted.exit_code, f"{control.aborted}; fix that, then resume with: {resume}"
    if control.reason in ("SIGINT", "SIGTERM"):
        code = 130 if control.reason == "SIGINT" else 143
        return (
            code,
            f"interrupted by {control.reason}; answers so far are saved;{_batches_running(job)} resume with: {resume}",
        )
    if failed_rows is None:
        return 1, f"some rows have no answer yet; resume with: {resume}"
    skipped = (
        f"; {skipped_rows} rows skipped for a null in a prompt column (input.nulls: skip; status skipped)"
        if skipped_rows
        else ""
    )
    if failed_rows:
        return 1, (
            f"finished; {failed_rows} rows failed (see error_type in {job.output_path}); "
            f"send them again with: {resume} --retry-failed{skipped}"
        )
    if job.full_output_path is not None:
        return 0, (
            f"all {job.spec.input.limit} rows of this limited run answered; results in {job.output_path} "
            f"(a limited run never writes the job's output {job.full_output_path}; run without --limit for that)"
            f"{skipped}"
        )
    if skipped_rows:
        return 0, f"all rows answered but the skipped ones; results in {job.output_path}{skipped}"
    return 0, f"all rows answered; results in {job.output_path}"


def _batches_running(job: Job) -> str:
    """For a stopped batch job: its batches that keep running (and billing) at Zhipu, and how to stop them."""
    if job.spec.run.mode == "online":
        return ""
    from runner.send.batch.admin import batch_rows

    running = [row for row in batch_rows(job) if row["step"] == "created"]
    if not running:
        return ""
    return (
        f" {len(running)} batches keep running (and billing) at Zhipu; stop them with: "
        f"glm-batch cancel {job.spec_path};"
    )


def summary(
    job: Job,
    run_id: str,
    estimate: dict[str, Any] | None,
    tally: Tally,
    control: Control,
    started_at: dt.datetime,
    exit_code: int,
    finalized: bool,
    accountant: Accountant,
) -> dict[str, Any]:
    """The run's record: written beside the output and appended to the manifest."""
    snap = tally.snapshot()
    table = accountant.table
    cost: dict[str, Any] = {
        "currency": job.currency,
        "spent": round(tally.cost, 6) if table is not None else None,
        "by_tier": {k: round(v, 6) for k, v in tally.cost_by_tier.items()},
        "prices_confirmed": table.confirmed if table is not None else None,
        "max_cost": job.spec.run.max_cost,
        # Attempts sent and then given up on (timeouts, stalls): the endpoint may have billed them too.
        "maybe_billed_twice": {
            "requests": len(control.maybe_billed),
            "worst_case": round(
                sum(
                    table.worst_case(input_tokens=t, max_tokens=job.spec.model.max_tokens) for t in control.maybe_billed
                ),
                6,
            )
            if table is not None
            else None,
        },
    }
    if estimate is not None and table is not None and tally.ok:
        # How good was `glm-batch estimate`? Compared only when it was made for this model and requests.
        from runner.money.kept_estimate import compare

        cost["estimate"] = compare(job, estimate, ok=tally.ok, spent=tally.cost)
    return {
        "job": job.name,
        "run_id": run_id,
        "spec": str(job.spec_path),
        "spec_hash": job.spec_hash,
        "model": job.spec.model.name,
        "endpoint": job.endpoint_name,
        "inputs": [{"path": str(p), "bytes": _size(p)} for p in job.input_paths],
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "exit_code": exit_code,
        "stopped": control.reason,
        "output": str(job.output_path) if finalized else None,
        "retries": dict(control.retries),
        "cost": cost,
        **snap,
    }


def _size(path: Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def check_ledger(job: Job, reporter: Reporter) -> str | None:
    """Before the first request: can the ledger be written? If not, a warning, and the run goes on (a
    cron job must still run; its spend waits in the state folder). The problem, or None."""
    problem = ledger.problem(simulated=job.base_url is None)
    if problem is not None:
        reporter.event("ledger_unwritable", reason=problem, then=PENDING_NOTE)
    return problem


PENDING_NOTE = "the run goes on; its spend is kept in the job's state folder and the next run books it"


def book_spend(job: Job, tally: Tally, run_id: str, reporter: Reporter) -> dict[str, Any]:
    """Add the run's spend to the ledger (the simulator's make-believe spend to its own part of it), and
    what earlier runs of the job left pending. Never fails a paid run: rows the ledger does not take
    wait in the state folder (ledger.keep_pending), said on stderr and in the summary's `ledger`."""
    simulated = job.base_url is None
    status: dict[str, Any] = {"path": str(ledger.folder(simulated=simulated)), "written": True}
    try:
        booked = ledger.book_pending(job.state_dir)
    except ledger.WRITE_FAILURES:  # the state folder itself does not read: nothing to book from it
        booked = 0
    if booked:
        status["pending_booked"] = booked
    rows = ledger_rows(job, tally, run_id)
    try:
        ledger.append(rows, run_id, simulated=simulated)
    except ledger.WRITE_FAILURES as exc:
        reason = _one_line(exc)
        try:
            pending: str | None = str(ledger.keep_pending(rows, run_id, job.state_dir, simulated=simulated))
        except ledger.WRITE_FAILURES:
            pending = None
        warning = f"the usage ledger {status['path']} was not written: {reason}"
        status |= {"written": False, "warning": warning, "pending": pending}
        reporter.event("ledger_not_written", reason=reason, pending=pending or "nowhere: see cost in the summary")
    return status


def _one_line(exc: Exception) -> str:
    """An error as one line, naming the file for an OSError."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return first_line(exc)


def sending(job: Job, gauges: dict[str, Any]) -> dict[str, Any]:
    """How the sending went, for the summary: the concurrency limit at the end, the refused share."""
    concurrency = {"adaptive": gauges.get("adaptive"), "final": gauges.get("limit")}
    concurrency["overload_429_rate"] = gauges.get("overload_429_rate")
    queue = {"batch_queue": gauges["batch_queue"]} if gauges.get("batch_queue") else {}
    return {"concurrency": concurrency, "simulated": job.base_url is None, **queue}


def write(job: Job, store: Store, report: dict[str, Any]) -> None:
    """Write the summary beside the output and the run into the manifest (a full disk was already said:
    the journal holds the answers)."""
    with contextlib.suppress(DiskFull):
        write_summary(job.output_path, report)
    with contextlib.suppress(*STATE_FAILURES):  # already said: the run stopped for it
        store.record_run(report)
