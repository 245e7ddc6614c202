"""The Ray side of a Ray run: Ray up, the run's ClusterLimiter made, the input's blocks mapped over the
sending actors (runner.distributed.worker), and their row-map lines and reports taken in, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Generator, Iterator
from typing import Any, cast

import polars as pl
import ray

from runner.distributed.blocks import Progress, Shape
from runner.distributed.limiter import connect
from runner.distributed.rows import read_rows
from runner.distributed.worker import REPORT, ActorConfig, SendingActor
from runner.errors import DiskFull, EndpointAborted, StateUnwritable
from runner.job.resolve import Job
from runner.observe.progress import Reporter
from runner.records import KEY, Result, result_from_json, scan_results
from runner.run import Run
from runner.send.base import Gauges
from runner.send.endpoints import endpoint_url
from runner.send.limits import AimdController
from runner.supervise import Signals, supervise


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
        # address="local": a new instance even where another Ray runs on this machine (without it,
        # ray.init joins that one, and refuses num_cpus there: a crash, not a run).
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


async def send_on_ray(
    run: Run, api_key: str, reporter: Reporter, signals: Signals, shape: Shape
) -> tuple[dict[str, Any], int]:
    """Map the input over the sending actors and take in their blocks; the limiter's stats at the end,
    and how many actors sent."""
    with _ray(run.job), endpoint_url(run.job) as base_url:
        return await _send(run, api_key, base_url, reporter, signals, shape)


async def _send(
    run: Run, api_key: str, base_url: str, reporter: Reporter, signals: Signals, shape: Shape
) -> tuple[dict[str, Any], int]:
    """`send_on_ray`, with Ray up and the endpoint's URL."""
    job, store, tally, control = run.job, run.store, run.tally, run.control
    progress = Progress()
    spec = job.spec.run
    concurrency = (
        AimdController(initial=job.concurrency, maximum=spec.max_concurrency) if job.adaptive else job.concurrency
    )
    limiter = connect(
        f"glm-batch/{job.name}/{store.run_id}",
        concurrency=concurrency,
        max_cost=spec.max_cost,
        requests_per_minute=spec.requests_per_minute,
        tokens_per_minute=spec.tokens_per_minute,
    )
    config = ActorConfig(
        job=job,
        run_id=store.run_id,
        base_url=base_url,
        api_key=api_key,
        limiter=limiter,
        settled=[ray.put(run.settled.series())],
        accountant=run.accountant,
        source=run.source,
        workers=spec.max_concurrency if job.adaptive else job.concurrency,
        budgeted=spec.max_cost is not None,
    )
    gauges = Gauges()
    intake = Intake()

    def consume() -> None:
        try:
            _consume()
        finally:
            intake.ended.set()

    def _consume() -> None:
        if control.stopping.is_set():  # stopped while Ray started: nothing is sent
            return
        rows, blocks_total = read_rows(run.source, tally.rows_total, shape.block_rows)
        fewest, most = shape.pool(blocks_total)
        # Ray prints one harmless line per run here about constructor arguments (docs/decisions.md).
        mapped = rows.map_batches(
            SendingActor,
            fn_constructor_kwargs={"config": config},
            batch_size=shape.block_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=fewest, max_size=most),
            num_cpus=shape.actor_cpus,
        )
        # A generator (Ray Data's iterable makes one per iter()), whose close shuts its executor down.
        blocks = cast("Generator[Any, None, None]", iter(mapped.iter_batches(batch_size=None, batch_format="pyarrow")))
        try:
            for block in blocks:
                with intake.lock:
                    if intake.closed:  # the run has ended without us (a second Ctrl-C): take nothing more
                        break
                    _take(pl.DataFrame(pl.from_arrow(block)), run, progress)
                if control.stopping.is_set():
                    break
        finally:
            if ray.is_initialized():
                blocks.close()  # Ray Data's executor is shut down here, not by a collected generator later

    async def poll() -> None:
        while True:
            with contextlib.suppress(Exception):  # stats are for display; a slow actor must not stop the run
                stats = await limiter.stats.remote()
                gauges.in_flight, gauges.limit, gauges.adaptive = stats["in_use"], stats["limit"], job.adaptive
            await asyncio.sleep(1.0)

    reporter.start(job, tally)
    poller = asyncio.create_task(poll())
    try:
        await supervise(
            asyncio.to_thread(consume),
            control=control,
            # Nothing to checkpoint: the actors journal every answer, and the row map is written by `add`
            # from the consuming thread alone (written from here too, it raced `add` and lost a block).
            checkpoint=lambda: None,
            tick=lambda: reporter.tick(tally, gauges, control),
            every_s=reporter.interval_s,
            grace_s=spec.grace_s,
            signals=signals,
        )
    finally:
        poller.cancel()
        intake.close()  # from here on the run's state is this coroutine's alone
        stats: dict[str, Any] = await limiter.stats.remote()
        ray.kill(limiter)  # actors waiting for a slot fail now, so the map fails and the intake ends
        if not await asyncio.to_thread(intake.ended.wait, INTAKE_END_S):
            reporter.event("ray_intake_lingers", seconds=INTAKE_END_S)
        _reconcile(run, progress)
        # A key left to the block that claimed it is answered only if that block answered it this run.
        deferred = sorted(progress.deferred)
        answered = progress.recorded.contains_batch(deferred)
        run.outstanding.update(key for key, done in zip(deferred, answered, strict=True) if not done)
    return stats, len(progress.workers)


INTAKE_END_S = 30.0  # how long a stopped run waits for the intake to end before Ray is shut down


class Intake:
    """The taking in of blocks, in a thread of its own while the driver's loop supervises: once closed
    it takes no block more, so the row map, tally and progress are the driver's alone as the run ends
    (a second Ctrl-C cancels the wait for the thread, not the thread: docs/decisions.md, "Ray under faults")."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while a block is taken in
        self.closed = False
        self.ended = threading.Event()  # the thread has returned and closed Ray Data's iterator

    def close(self) -> None:
        """Take no block more (waits for one being taken in)."""
        with self.lock:
            self.closed = True


def _take(block: pl.DataFrame, run: Run, progress: Progress) -> None:
    """One block back from the actors: its lines into the row map, its report into the run."""
    tally, control = run.tally, run.control
    run.store.rows.add(block.drop(REPORT))
    tally.rows_seen += block.height
    for text in block.get_column(REPORT).drop_nulls().to_list():
        report = json.loads(text)
        tally.rows_settled += report["rows_settled"]
        tally.requests_queued += report["requests_queued"]
        run.outstanding.update(report["unanswered"])
        progress.workers.add(report["worker"])
        progress.deferred.update(report["deferred"])
        results = [(result_from_json(line), tier) for line, tier in report["results"]]
        fresh = progress.recorded.add_batch([result.key for result, _ in results])
        for (result, tier), new in zip(results, fresh, strict=True):
            if new:
                run.cpu.begin()
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


def _reconcile(run: Run, progress: Progress) -> None:
    """Fold journals that actors left (one killed mid-block) into parts, and count answers of this run
    that no block reported (the killed attempt's, which its retry found and did not send again)."""
    store = run.store
    for journal in sorted(store.state_dir.glob(f"journal-{store.run_id}-*.jsonl")):
        store.recover(journal)
    parts = sorted(store.results_dir.glob(f"part-{store.run_id}-*.parquet"))
    if not parts:
        return
    table = run.accountant.table
    for part in parts:  # a part at a time, so no column of every key of the run is held at once
        results = scan_results([part]).unique(KEY, keep="first").collect()
        known = progress.recorded.contains_batch(results.get_column(KEY).to_list())
        for row in results.filter(~pl.Series(known, dtype=pl.Boolean)).iter_rows(named=True):
            result = Result(**{name: row[name] for name in Result.__slots__ if name in row})  # wait_ms not stored
            if not progress.recorded.add(result.key):
                continue  # answered in an earlier part too (a retried block): counted once
            tier = table.charge(result)[1] if table is not None and result.status == "ok" else None
            run.outstanding.discard(result.key)
            run.tally.record(result, tier)
