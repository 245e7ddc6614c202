"""How a run ends, the same on both engines (runner.engine and runner.distributed.engine): the spend into
the ledger, the output when every row is answered, the summary beside it and in the manifest.

    return finish(job, store, ending, options, reporter, complete=True, sending=summary.sending(job, gauges))
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from runner.control import Control
from runner.errors import STATE_FAILURES
from runner.job.resolve import Job
from runner.money.accounting import Accountant, Tally
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.runs import RunOptions, RunReport
from runner.state.store import Store


@dataclass(frozen=True)
class Ending:
    """What a run has to show when it ends: its counts, how it stopped, its prices, when it began."""

    tally: Tally
    control: Control
    accountant: Accountant
    started_at: dt.datetime


def record(job: Job, store: Store, ending: Ending, exit_code: int, finalized: bool) -> dict[str, Any]:
    """The run's summary (without how it sent, which each engine adds)."""
    return summary.summary(
        job,
        store.run_id,
        store.read_estimate(),
        ending.tally,
        ending.control,
        ending.started_at,
        exit_code,
        finalized,
        ending.accountant,
    )


def finish(
    job: Job,
    store: Store,
    ending: Ending,
    options: RunOptions,
    reporter: Reporter,
    *,
    complete: bool,
    sending: dict[str, Any],
) -> RunReport:
    """Book the spend; write the output if the run is `complete` and was not stopped; write the summary
    (with `sending`: how this engine sent) and tell the reporter. A full disk stops nothing here: the
    answers are in the store, and the next run writes what could not be written now."""
    control = ending.control
    booked = summary.book_spend(job, ending.tally, store.run_id, reporter)
    failed_rows: int | None = None  # None: not finalized, the output is not complete yet
    skipped_rows = 0  # rows input.nulls: skip kept from being sent: a decision, not a failure
    if control.reason is None and complete:
        reporter.phase("writing output")
        # Imported here, after sending: the output writer is not on the way to the first request.
        from runner.output.assemble import OutputShape, finalize
        from runner.output.sinks import ParquetSink

        shape = OutputShape(
            job.spec.input.id_column or "id", job.shape.fields if job.shape else {}, job.spec.output.samples
        )
        from runner.state.rescue import state_guard

        try:
            with state_guard(job.state_dir, refusals=False):  # the output's own errors are not the state's
                counts = finalize(store, ParquetSink(job.output_path, job.state_dir), shape)
            failed_rows = sum(n for status, n in counts.items() if status not in ("ok", "skipped"))
            skipped_rows = counts.get("skipped", 0)
        except STATE_FAILURES as exc:
            control.fail(exc)
    exit_code, message = summary.outcome(job, control, failed_rows, options.resume_command, skipped_rows)
    if options.fresh and failed_rows is None and options.pilot_rows is None:
        # Decided (docs/decisions.md): a stopped --fresh run leaves old and new answers side by side; the
        # resume command above keeps the old ones for the rows it did not reach, and says so.
        message += (
            "; this was a --fresh run: resuming without --fresh keeps the earlier answers of the rows it "
            "did not reach (add --fresh to send every row again, those re-sent already included)"
        )
    report = record(job, store, ending, exit_code, failed_rows is not None) | sending | {"ledger": booked}
    if failed_rows is not None and job.shape is not None:
        reporter.phase("scoring against gold labels")
        from runner.observe import quality

        report["quality"] = quality.summarise(job, job.shape)
    summary.write(job, store, report)
    reporter.finish(report, message)
    return RunReport(exit_code, message, report)
