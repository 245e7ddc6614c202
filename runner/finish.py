"""How a run ends, whichever sender sent it: the spend into the ledger, the output when every row is
answered, the summary beside it and in the manifest (a pilot's only in the manifest)."""

from __future__ import annotations

import contextlib
from typing import Any

from runner.errors import STATE_FAILURES
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.run import Run
from runner.runs import RunOptions, RunResult


def record(run: Run, exit_code: int, finalized: bool) -> dict[str, Any]:
    """The run's summary (without how it sent, which each sender adds)."""
    return summary.summary(
        run.job,
        run.store.run_id,
        run.store.read_estimate(),
        run.tally,
        run.control,
        run.started_at,
        exit_code,
        finalized,
        run.accountant,
    )


def finish(run: Run, options: RunOptions, reporter: Reporter, sending: dict[str, Any]) -> RunResult:
    """Book the spend; write the output if the run is complete and was not stopped; write the summary
    (with `sending`: how it was sent) and tell the reporter. A full disk stops nothing here: the answers
    are in the store, and the next run writes what could not be written now."""
    job, store, control = run.job, run.store, run.control
    if store.broken is not None:
        _rescue(run)
    sending = sending | run.cpu.summary(run.tally.answered)
    booked = summary.book_spend(job, run.tally, store.run_id, reporter)
    if run.pilot is not None:
        report = record(run, 0, False) | sending | {"ledger": booked}
        with contextlib.suppress(*STATE_FAILURES):
            store.record_run({**report, "pilot": True})
        if control.aborted is not None or control.failed is not None:  # the pilot could not run: say why
            return RunResult(*summary.outcome(job, control, None, options.resume_command), report)
        return RunResult(0, f"pilot: {run.tally.ok} rows answered", report)
    failed_rows: int | None = None  # None: not finalized, the output is not complete yet
    skipped_rows = 0  # rows input.nulls: skip kept from being sent: a decision, not a failure
    if control.reason is None and run.complete:
        reporter.phase("writing output")
        # Imported here, after sending: the output writer is not on the way to the first request.
        from runner.output.assemble import OutputShape, finalize
        from runner.output.sinks import ParquetSink
        from runner.state.rescue import state_guard

        shape = OutputShape(
            job.spec.input.id_column or "id", job.shape.fields if job.shape else {}, job.spec.output.samples
        )
        try:
            with state_guard(job.state_dir, refusals=False):  # the output's own errors are not the state's
                counts = finalize(store, ParquetSink(job.output_path, job.state_dir), shape)
            failed_rows = sum(n for status, n in counts.items() if status not in ("ok", "skipped"))
            skipped_rows = counts.get("skipped", 0)
        except STATE_FAILURES as exc:
            control.fail(exc)
    exit_code, message = summary.outcome(job, control, failed_rows, options.resume_command, skipped_rows)
    if options.fresh and failed_rows is None:
        # Decided (docs/decisions.md): a stopped --fresh run leaves old and new answers side by side; the
        # resume command above keeps the old ones for the rows it did not reach, and says so.
        message += (
            "; this was a --fresh run: resuming without --fresh keeps the earlier answers of the rows it "
            "did not reach (add --fresh to send every row again, those re-sent already included)"
        )
    report = record(run, exit_code, failed_rows is not None) | sending | {"ledger": booked}
    if failed_rows is not None and job.shape is not None:
        reporter.phase("scoring against gold labels")
        from runner.observe import quality

        report["quality"] = quality.summarise(job, job.shape)
    summary.write(job, store, report)
    reporter.finish(report, message)
    return RunResult(exit_code, message, report)


def _rescue(run: Run) -> None:
    """The state broke: write the answers held in memory to a rescue journal, and say where in the
    run's last line. If no place takes them they are lost (said too): the summary stops counting them."""
    held = run.store.held
    if not held:
        return
    where = run.store.rescue(run.job.output_path)
    failure = run.control.failed or run.store.broken
    assert failure is not None
    if where is not None:
        note = f"the {len(held)} answers it held are in {where}, which the next run reads first"
    else:
        for result in held:
            run.tally.not_kept(result)
        note = f"the {len(held)} answers it held could be written neither beside the output nor in the temp folder"
    run.control.failed = type(failure)(f"{failure}; {note}")
