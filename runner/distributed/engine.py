"""The Ray engine (`run.engine: ray`): the local engine's contract, with reading, rendering and sending
spread over a Ray cluster (docs/decisions.md, "Ray runs: one limit, one payment").

    report = await run_on_ray(job, api_key=key, options=RunOptions(), reporter=reporter)
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import Any

from runner.control import Control
from runner.errors import UsageError
from runner.finish import Ending, finish
from runner.job.inputs import InputSource, open_input
from runner.job.resolve import Job
from runner.money import ledger
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import price_table, require_prices
from runner.money.tokens import Calibration
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.plan import ALL_FAIL_ROWS, plan
from runner.resume import settled_keys
from runner.runs import RunOptions, RunReport, fingerprint
from runner.state.rescue import find_rescued
from runner.state.store import Store

BLOCK_ROWS = 500  # rows per block sent by one actor call: a unit of retry and of journal flushing
ACTORS = (2, 4)  # sending actors: at least, at most (Ray Data scales between them)


@dataclass
class Shape:
    """How the run is spread: actors, rows per block, the CPU share of an actor (they wait on I/O)."""

    actors: tuple[int, int] = ACTORS
    block_rows: int = BLOCK_ROWS
    actor_cpus: float = 0.25


@dataclass
class Progress:
    """What the block reports added up to, on the driver."""

    recorded: set[str] = field(default_factory=set)  # keys counted in the tally (identical prompts count once)
    unanswered: int = 0  # requests a block queued and got no result for
    deferred: set[str] = field(default_factory=set)  # keys a block left to the block that claimed them
    workers: set[str] = field(default_factory=set)


async def run_on_ray(
    job: Job, *, api_key: str, options: RunOptions, reporter: Reporter, shape: Shape | None = None
) -> RunReport:
    """Run one job on Ray to completion, interruption or abort; the same contract as runner.engine.run_job."""
    if job.spec.run.mode != "online":
        raise UsageError(f"{job.spec_path}: run.engine: ray: batch mode runs on the local engine")
    source = open_input(job)
    store = Store(job.state_dir, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", rows=job.row_map)
    store.open()
    try:
        store.adopt_rescued(find_rescued(job.output_path, job.state_dir))  # left by a run whose state broke
        return await _run(job, source, store, api_key, options, reporter, shape or Shape())
    finally:
        store.close()


async def _run(
    job: Job, source: InputSource, store: Store, api_key: str, options: RunOptions, reporter: Reporter, shape: Shape
) -> RunReport:
    started_at = dt.datetime.now(dt.UTC)
    run, samples = job.spec.run, job.spec.output.samples
    tally = Tally(rows_total=source.rows, samples=samples)  # counted when the input was opened
    table = require_prices(job, "run.max_cost") if run.max_cost is not None else price_table(job)
    gated = run.max_cost is not None or run.tokens_per_minute is not None
    calibration = (
        ledger.calibration(job.name, job.spec.model.name, simulated=job.base_url is None) if gated else Calibration()
    )
    # The budget is the limiter's, shared by every actor; this accountant only prices.
    accountant = Accountant(table, calibration, None, job.spec.model.max_tokens, job.model.batch.price_share)
    settled = settled_keys(job, store, fresh=options.fresh, retry_failed=options.retry_failed,
                           resend_lost=options.resend_lost, rows_total=tally.rows_total, reporter=reporter)  # fmt: skip
    control = Control()
    progress = Progress()
    built_from = fingerprint(job)
    limits: dict[str, Any] = {}
    if not options.fresh and store.rows.is_current(built_from, settled, samples):
        # Nothing changed since a run that answered every row: no row needs rendering and nothing is
        # sent, so Ray is not even imported (the cover record may vouch for every key unread, too).
        tally.rows_seen = tally.rows_settled = tally.rows_total
        tally.all_rows_rendered = True
    else:
        next(plan(job, source, settled, batch_rows=ALL_FAIL_ROWS))  # a broken template fails here, not on a worker
        from runner.distributed.cluster import send_on_ray  # Ray's import alone takes seconds

        store.rows.reset()
        summary.check_ledger(job, reporter)  # before the first request: a warning, never a refusal
        limits = await send_on_ray(
            job, source, store, api_key, settled, accountant, tally, control, progress, reporter, shape
        )
        if tally.rows_seen == tally.rows_total and control.reason is None:
            store.rows.seal(built_from)
            tally.all_rows_rendered = True
    ending = Ending(tally, control, accountant, started_at)
    return _finish(job, store, ending, progress, options, reporter, limits)


def _finish(
    job: Job,
    store: Store,
    ending: Ending,
    progress: Progress,
    options: RunOptions,
    reporter: Reporter,
    limits: dict[str, Any],
) -> RunReport:
    """Output, summary, ledger and manifest, as the local engine writes them (runner.finish)."""
    gauges = {"adaptive": job.adaptive, "limit": limits.get("limit"), "overload_429_rate": None}
    engine = {"name": "ray", "actors": len(progress.workers), "limiter": limits}
    # Complete when every row came back from the actors and every request they queued was answered.
    complete = ending.tally.all_rows_rendered and progress.unanswered == 0
    sending = summary.sending(job, gauges) | {"engine": engine}
    return finish(job, store, ending, options, reporter, complete=complete, sending=sending)
