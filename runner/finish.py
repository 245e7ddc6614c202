"""How a run ends, whichever sender sent it: the spend into the ledger, the output when every row is
answered, its exit code and one line (`outcome`), the summary beside it and in the manifest (a pilot's
only in the manifest)."""

from __future__ import annotations

from dataclasses import replace

from runner.control import Control
from runner.errors import STATE_FAILURES, BudgetExhausted
from runner.job.resolve import Job
from runner.money.ledger import book_spend
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.observe.summary import Sending
from runner.run import Run
from runner.runs import RunOptions, RunResult


def finish(run: Run, options: RunOptions, reporter: Reporter, sending: Sending) -> RunResult:
    """Book the spend; write the output if the run is complete and was not stopped; write the summary and
    tell the reporter. A full disk stops nothing here: the next run writes what could not be written."""
    job, store, control = run.job, run.store, run.control
    if store.broken is not None:
        _rescue(run)
    cpu = run.cpu.summary(run.tally.answered)
    booked = book_spend(job, run.tally.by_day, store.run_id, reporter.event)
    if run.pilot is not None:
        report = summary.summary(run, 0, False, sending, cpu, booked)
        summary.record(store, replace(report, pilot=True))
        if control.aborted is not None or control.failed is not None:  # the pilot could not run: say why
            return RunResult(*outcome(job, control, None, options.resume_command), report)
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
    exit_code, message = outcome(job, control, failed_rows, options.resume_command, skipped_rows)
    if options.fresh and failed_rows is None:
        # Decided (docs/decisions.md): a stopped --fresh run leaves old and new answers side by side; the
        # resume command above keeps the old ones for the rows it did not reach, and says so.
        message += (
            "; this was a --fresh run: resuming without --fresh keeps the earlier answers of the rows it "
            "did not reach (add --fresh to send every row again, those re-sent already included)"
        )
    report = summary.summary(run, exit_code, failed_rows is not None, sending, cpu, booked)
    if failed_rows is not None and job.shape is not None:
        reporter.phase("scoring against gold labels")
        from runner.observe import quality

        report = replace(report, quality=quality.summarise(job, job.shape))
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
