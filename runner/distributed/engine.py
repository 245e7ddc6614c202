"""The Ray engine (`run.engine: ray`): the local engine's contract, with reading, rendering and sending
spread over a Ray cluster.

    report = await run_on_ray(job, api_key=key, options=RunOptions(), reporter=reporter)

The driver (this process) does what needs one owner: it opens the input (checks), the store (lock,
crash sweep) and the settled keys, makes the run's ClusterLimiter (the account's one in-flight limit
and run.max_cost), reads the input with Ray Data (runner.distributed.rows: `_row` as the local engine
numbers rows), and maps blocks over a pool of sending actors (runner.distributed.worker.Sender). Each
actor journals its answers to the job's state directory before its block's row-map lines come back;
the driver writes those lines to the row map in order, seals it, and finalizes the output, summary,
ledger and manifest as the local engine does. Request keys are the local engine's, so a job started on
one engine and finished on the other sends nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import ray

from runner.distributed.limiter import connect
from runner.distributed.rows import read_rows
from runner.distributed.worker import REPORT, Sender, SenderConfig
from runner.errors import DiskFull, EndpointAborted, UsageError
from runner.finish import Ending, finish
from runner.job.inputs import InputSource, open_input
from runner.job.resolve import Job
from runner.money import ledger
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import price_table, require_prices, tier_label
from runner.money.tokens import Calibration
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.output.salvage import check_resend, salvage
from runner.plan import ALL_FAIL_ROWS, plan
from runner.records import KEY, Result, result_from_json, scan_results
from runner.runs import RunOptions, RunReport, fingerprint
from runner.send.base import Control
from runner.send.endpoints import endpoint_url
from runner.send.limits import AimdController
from runner.state.store import SettledKeys, Store
from runner.supervise import supervise

BLOCK_ROWS = 500  # rows per block sent by one actor call: a unit of retry and of journal flushing
ACTORS = (2, 4)  # sending actors: at least, at most (Ray Data scales between them)


@dataclass
class Shape:
    """How the run is spread: actors, rows per block, the CPU share of an actor (they wait on I/O)."""

    actors: tuple[int, int] = ACTORS
    block_rows: int = BLOCK_ROWS
    actor_cpus: float = 0.25


@dataclass
class _Progress:
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
    store = Store(job.state_dir, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}")
    store.open()
    try:
        return await _run(job, source, store, api_key, options, reporter, shape or Shape())
    finally:
        store.close()


@contextlib.contextmanager
def _ray(job: Job) -> Iterator[None]:
    """Ray for this run: the driver's own if it has one, the cluster at run.ray_address or $RAY_ADDRESS,
    else a local instance started here and shut down after (only when there is something to send)."""
    if ray.is_initialized():
        yield
        return
    address = job.spec.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


async def _run(
    job: Job, source: InputSource, store: Store, api_key: str, options: RunOptions, reporter: Reporter, shape: Shape
) -> RunReport:
    started_at = dt.datetime.now(dt.UTC)
    run, samples = job.spec.run, job.spec.output.samples
    tally = Tally(rows_total=source.frame.select(pl.len()).collect().item(), samples=samples)
    table = require_prices(job, "run.max_cost") if run.max_cost is not None else price_table(job)
    gated = run.max_cost is not None or run.tokens_per_minute is not None
    calibration = ledger.calibration(job.name, job.spec.model.name) if gated else Calibration()
    # The budget is the limiter's, shared by every actor; this accountant only prices.
    accountant = Accountant(table, calibration, None, job.spec.model.max_tokens, job.model.batch.price_share)
    for name, value in (("stale_lock_taken_over", store.lock.took_over), ("journal_recovered", store.recovered)):
        if value:
            reporter.event(name, detail=value)
    if store.corrupt and (salvaged := salvage(job, store)):
        reporter.event("answers_salvaged", answers=salvaged, source=str(job.output_path))
    settled = SettledKeys.none() if options.fresh else store.settled_keys(retry_failed=options.retry_failed)
    if store.quarantined and not options.fresh:
        check_resend(job, store, settled, tally.rows_total, options.resend_lost)
    next(plan(job, source, settled, batch_rows=ALL_FAIL_ROWS))  # a broken template fails here, not on a worker
    control = Control()
    progress = _Progress()
    built_from = fingerprint(job)
    limits: dict[str, Any] = {}
    if not options.fresh and store.rows.is_current(built_from, settled, samples):
        tally.rows_seen = tally.rows_settled = tally.rows_total  # nothing changed: no row needs rendering
        tally.all_rows_rendered = True
    else:
        store.rows.reset()
        with _ray(job), endpoint_url(job) as base_url:
            limits = await _send(
                job, source, store, api_key, base_url, settled, accountant, tally, control, progress, reporter, shape
            )
        if tally.rows_seen == tally.rows_total and control.reason is None:
            store.rows.seal(built_from)
            tally.all_rows_rendered = True
    ending = Ending(tally, control, accountant, started_at)
    return _finish(job, store, ending, progress, options, reporter, limits)


async def _send(
    job: Job,
    source: InputSource,
    store: Store,
    api_key: str,
    base_url: str,
    settled: SettledKeys,
    accountant: Accountant,
    tally: Tally,
    control: Control,
    progress: _Progress,
    reporter: Reporter,
    shape: Shape,
) -> dict[str, Any]:
    """Map the input over the sending actors and take in their blocks; the limiter's stats at the end."""
    run = job.spec.run
    concurrency = (
        AimdController(initial=job.concurrency, maximum=run.max_concurrency) if job.adaptive else job.concurrency
    )
    limiter = connect(
        f"glm-batch/{job.name}/{store.run_id}",
        concurrency=concurrency,
        max_cost=run.max_cost,
        requests_per_minute=run.requests_per_minute,
        tokens_per_minute=run.tokens_per_minute,
    )
    config = SenderConfig(
        job=job,
        run_id=store.run_id,
        base_url=base_url,
        api_key=api_key,
        limiter=limiter,
        settled=[ray.put(settled.series())],
        accountant=accountant,
        source=source,
        workers=run.max_concurrency if job.adaptive else job.concurrency,
        budgeted=run.max_cost is not None,
    )
    gauges: dict[str, Any] = {}

    def consume() -> None:
        rows = read_rows(job, source, tally.rows_total, shape.block_rows)
        mapped = rows.map_batches(
            Sender,
            fn_constructor_kwargs={"config": config},
            batch_size=shape.block_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=shape.actors[0], max_size=shape.actors[1]),
            num_cpus=shape.actor_cpus,
        )
        for block in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            _take(pl.DataFrame(pl.from_arrow(block)), store, tally, control, progress)
            if control.stopping.is_set():
                break

    async def poll() -> None:
        while True:
            with contextlib.suppress(Exception):  # stats are for display; a slow actor must not stop the run
                stats = await limiter.stats.remote()
                gauges.update(in_flight=stats["in_use"], limit=stats["limit"], adaptive=job.adaptive)
            await asyncio.sleep(1.0)

    reporter.start(job, tally)
    poller = asyncio.create_task(poll())
    try:
        await supervise(
            asyncio.to_thread(consume),
            control=control,
            checkpoint=store.rows.write,
            tick=lambda: reporter.tick(tally, gauges, control),
            every_s=reporter.interval_s,
            grace_s=run.grace_s,
            reporter=reporter,
        )
    finally:
        poller.cancel()
        stats: dict[str, Any] = await limiter.stats.remote()
        ray.kill(limiter)
        _reconcile(store, tally, accountant, progress)
        # A key left to the block that claimed it is answered only if that block answered it this run.
        progress.unanswered += len(progress.deferred - progress.recorded)
    return stats


def _take(block: pl.DataFrame, store: Store, tally: Tally, control: Control, progress: _Progress) -> None:
    """One block back from the actors: its lines into the row map, its report into the tally."""
    store.rows.add(block.drop(REPORT))
    tally.rows_seen += block.height
    for text in block.get_column(REPORT).drop_nulls().to_list():
        report = json.loads(text)
        tally.rows_settled += report["rows_settled"]
        tally.requests_queued += report["requests_queued"]
        progress.unanswered += report["unanswered"]
        progress.workers.add(report["worker"])
        progress.deferred.update(report["deferred"])
        for line, tier in report["results"]:
            result = result_from_json(line)
            if result.key not in progress.recorded:
                progress.recorded.add(result.key)
                tally.record(result, tier)
        for kind, n in report["retries"].items():
            control.retries[kind] = control.retries.get(kind, 0) + n
        if report["aborted"] and control.aborted is None:
            control.aborted = EndpointAborted(report["aborted"])
            control.stop("aborted")
        elif report["failed"]:
            control.fail(DiskFull(report["failed"]))
        elif report["stopped"] == "budget":
            control.end_dispatch("budget")


def _reconcile(store: Store, tally: Tally, accountant: Accountant, progress: _Progress) -> None:
    """Fold journals that actors left (one killed mid-block) into parts, and count answers of this run
    that no block reported (the killed attempt's, which its retry found and did not send again)."""
    for journal in sorted(store.state_dir.glob(f"journal-{store.run_id}-*.jsonl")):
        store.recover(journal)
    parts = sorted(store.results_dir.glob(f"part-{store.run_id}-*.parquet"))
    if not parts:
        return
    known = pl.Series(KEY, sorted(progress.recorded), dtype=pl.String)
    missed = scan_results(parts).filter(~pl.col(KEY).is_in(known.implode())).unique(KEY, keep="first").collect()
    table = accountant.table
    for row in missed.iter_rows(named=True):
        result = Result(**{name: row[name] for name in Result.__slots__ if name in row})  # wait_ms is not stored
        tokens_in, tokens_out = (result.input_tokens or 0) + (result.cache_read_input_tokens or 0), result.output_tokens
        tier = (
            tier_label(table.tier(tokens_in, tokens_out or 0)) if table is not None and result.status == "ok" else None
        )
        progress.recorded.add(result.key)
        progress.unanswered = max(0, progress.unanswered - 1)
        tally.record(result, tier)


def _finish(
    job: Job,
    store: Store,
    ending: Ending,
    progress: _Progress,
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
