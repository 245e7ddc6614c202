"""The Ray side of a Ray run: Ray up, the input mapped over the sending actors, their blocks taken in.

    stats = await send_on_ray(job, source, store, api_key, settled, accountant, tally, control, progress,
                              reporter, shape)

Imported only when a run has rows to render, so an unchanged re-run never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import polars as pl
import ray

from runner.control import Control
from runner.distributed.engine import Progress, Shape
from runner.distributed.limiter import connect
from runner.distributed.rows import read_rows
from runner.distributed.worker import REPORT, Sender, SenderConfig
from runner.errors import DiskFull, EndpointAborted, StateUnwritable
from runner.job.inputs import InputSource
from runner.job.resolve import Job
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import tier_label
from runner.observe.progress import Reporter
from runner.records import KEY, Result, result_from_json, scan_results
from runner.send.endpoints import endpoint_url
from runner.send.limits import AimdController
from runner.state.settled import SettledKeys
from runner.state.store import Store
from runner.supervise import supervise


@contextlib.contextmanager
def _ray(job: Job) -> Iterator[None]:
    """Ray for this run: the driver's own if it has one, the cluster at run.ray_address or $RAY_ADDRESS,
    else a local instance started here and shut down after."""
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


async def send_on_ray(
    job: Job,
    source: InputSource,
    store: Store,
    api_key: str,
    settled: SettledKeys,
    accountant: Accountant,
    tally: Tally,
    control: Control,
    progress: Progress,
    reporter: Reporter,
    shape: Shape,
) -> dict[str, Any]:
    """Map the input over the sending actors and take in their blocks; the limiter's stats at the end."""
    with _ray(job), endpoint_url(job) as base_url:
        return await _send(
            job, source, store, api_key, base_url, settled, accountant, tally, control, progress, reporter, shape
        )


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
    progress: Progress,
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
        # Ray's core worker prints one line per run to stderr here: "Actor with class name:
        # 'MapWorker(MapBatches(Sender))' ... has constructor arguments in the object store and
        # max_restarts > 0 ... See https://github.com/ray-project/ray/issues/53727". Ray Data always
        # hands its pool actors their constructor arguments (its DataContext and the map function, with
        # our config) as ray.put references, and keeps actors restartable (max_restarts=-1), which is
        # what re-runs a killed sender's block. Harmless here: the references live in this driver for the
        # whole map, and their primary copies are on the driver's node. The line can only be dropped by
        # max_restarts=0 (no restart after a kill) or RAY_BACKEND_LOG_LEVEL=fatal (every error of the
        # core worker hidden); it is a C++ log line sent to stderr, not a Python warning or log record,
        # so there is nothing to filter in this process.
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
            # Nothing to checkpoint here: the actors journal every answer themselves, and the row map is
            # written by `add` (in large files) from the consuming thread alone. Writing it from this
            # loop too raced with `add` and lost the block added between the two (a 500-row hole in a
            # sealed map); it is trusted only once sealed, so a stop loses nothing by not writing it.
            checkpoint=lambda: None,
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


def _take(block: pl.DataFrame, store: Store, tally: Tally, control: Control, progress: Progress) -> None:
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
            broke = StateUnwritable if report.get("failed_code") == StateUnwritable.exit_code else DiskFull
            control.fail(broke(report["failed"]))
        elif report["stopped"] == "budget":
            control.end_dispatch("budget")


def _reconcile(store: Store, tally: Tally, accountant: Accountant, progress: Progress) -> None:
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
