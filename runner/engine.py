"""One run of a job, top to bottom: open the input, the store and the run; the sender the caller chose
sends the rest; runner.finish writes the output, summary, manifest and ledger. Signals are handled
until sending ends."""

from __future__ import annotations

import datetime as dt
import secrets

from runner.control import Control
from runner.finish import finish
from runner.job.inputs import open_input, record_names_checked
from runner.job.resolve import Job
from runner.local import LocalSender
from runner.money.ledger import check_ledger
from runner.observe.progress import Reporter
from runner.run import Run, Sender, check_places
from runner.runs import RunOptions, RunResult
from runner.state.rescue import find_rescued
from runner.state.store import Store
from runner.supervise import Signals


async def execute(
    job: Job, *, api_key: str, options: RunOptions, reporter: Reporter, sender: Sender | None = None
) -> RunResult:
    """Run one job to completion, interruption or abort; the result is durable whichever happens."""
    check_places(job)
    control = Control()
    if job.spec.run.mode != "online" and job.batch is not None and job.batch.basis == "unconfirmed":
        reporter.event("batch_unconfirmed", model=job.spec.model.name, warning=job.batch.why)
    with Signals(control, reporter) as signals:  # a stop while starting still ends the run well
        reporter.phase("reading input")
        source = open_input(job)
        store = Store(
            job.state_dir, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", rows=job.row_map
        )
        store.open()
        try:
            record_names_checked(job, source)  # an unchanged input is not parsed for the check again
            # Answers a run whose state broke could only hold in memory: kept before anything is planned.
            store.adopt_rescued(find_rescued(job))
            run = Run.open(job, source, store, options, control, reporter)
            if job.thinking.warning is not None:  # validate and estimate said it too
                reporter.event("thinking_warning", message=job.thinking.warning)
            if not run.unchanged:
                check_ledger(job, reporter.event)  # before the first request: a warning, never a refusal
            sending = await (sender or LocalSender()).send(run, api_key, reporter, signals)
            signals.close()
            return finish(run, options, reporter, sending)
        finally:
            store.close()
