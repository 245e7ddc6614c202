"""One run of a job, top to bottom: open -> send -> finish.

    report = asyncio.run(run_job(job, api_key=key, options=RunOptions(), reporter=reporter, sender=sender))

1. open the input (checks columns and emptiness before anything is sent) and the store (lock, crash
   sweep), and learn which requests are already settled (runner.run.Run.open);
2. send: the sender the caller chose (runner.local.LocalSender unless told otherwise; Ray's is
   runner.distributed.sender.RaySender) plans and sends the rest, every result into the run, which
   journals it at once and folds it into a durable part every `checkpoint_rows` results or
   `checkpoint_seconds`;
3. finish (runner.finish): when every row has a result, the output in input order; the summary
   beside it, the run in the manifest, the spend in the ledger.

SIGINT/SIGTERM are handled from the first line to the end of sending (runner.supervise).
"""

from __future__ import annotations

import datetime as dt
import secrets

from runner.control import Control
from runner.finish import finish
from runner.job.inputs import open_input
from runner.job.resolve import Job
from runner.local import LocalSender
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.run import Run, Sender, check_places
from runner.runs import RunOptions as RunOptions  # re-exported
from runner.runs import RunResult as RunResult
from runner.state.rescue import find_rescued
from runner.state.store import Store
from runner.supervise import stop_on_signals


async def run_job(
    job: Job, *, api_key: str, options: RunOptions, reporter: Reporter, sender: Sender | None = None
) -> RunResult:
    """Run one job to completion, interruption or abort; the result is durable whichever happens."""
    check_places(job)
    control = Control()
    if job.spec.run.mode != "online" and job.batch is not None and job.batch.basis == "unconfirmed":
        reporter.event("batch_unconfirmed", model=job.spec.model.name, warning=job.batch.why)
    with stop_on_signals(control, reporter) as signals:  # a stop while starting still ends the run well
        reporter.phase("reading input")
        source = open_input(job)
        store = Store(
            job.state_dir, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", rows=job.row_map
        )
        store.open()
        try:
            # Answers a run whose state broke could only hold in memory: kept before anything is planned.
            store.adopt_rescued(find_rescued(job.output_path, job.state_dir))
            run = Run.open(job, source, store, options, control, reporter)
            if job.thinking.warning is not None:  # validate and estimate said it too
                reporter.event("thinking_warning", message=job.thinking.warning)
            if not run.unchanged:
                summary.check_ledger(job, reporter)  # before the first request: a warning, never a refusal
            sending = await (sender or LocalSender()).send(run, api_key, reporter, signals)
            signals.close()
            return finish(run, options, reporter, sending)
        finally:
            store.close()
