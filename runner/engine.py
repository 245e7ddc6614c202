"""The pipeline of one run, top to bottom: rows in, requests out, results written.

    report = asyncio.run(run_job(job, api_key=key, options=RunOptions(), reporter=reporter))

1. open the input (checks columns and emptiness before anything is sent);
2. open the store (lock, crash sweep) and learn which requests are already settled;
3. render rows into requests, record each row's request key, skip the settled ones;
4. the executor sends the rest under the limits, with retries; each result is buffered and flushed
   to a durable part file every `checkpoint_rows` results or `checkpoint_seconds`;
5. when every row has a result, compact them into the output Parquet, in input order;
6. write the summary JSON beside the output and the run record into the manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from runner.errors import BudgetExhausted
from runner.job.inputs import ID, ROW, InputSource, open_input
from runner.job.prompts import RequestBuilder, sample_key
from runner.job.resolve import Job
from runner.job.templates import RenderError
from runner.money import ledger
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import Budget, price_table, require_prices
from runner.observe import quality
from runner.observe.progress import Reporter
from runner.records import KEY, Request, Result
from runner.send.client import STREAM_FROM_MAX_TOKENS, Client
from runner.send.limits import AimdController, Limits
from runner.send.online import Control, OnlineExecutor
from runner.send.retries import overload, wait_backoff
from runner.state.store import SettledKeys, Store, write_json_atomic
from runner.testing.simulator import SimConfig, SimulatorThread

RENDER_BATCH_ROWS = 2000  # rows rendered per step; small enough not to stall responses for long


@dataclass(frozen=True)
class RunOptions:
    """How this invocation treats earlier answers, and whether it is a pilot."""

    fresh: bool = False  # ignore earlier answers and send everything again
    retry_failed: bool = False  # send again the rows that failed for good in earlier runs
    pilot_rows: int | None = None  # send only this many randomly chosen rows; write no output
    pilot_seed: int = 0


@dataclass
class RunReport:
    """How a run ended: the exit code, one line for the user, and the summary that was written."""

    exit_code: int
    message: str
    summary: dict[str, Any] = field(default_factory=dict)


async def run_job(job: Job, *, api_key: str, options: RunOptions, reporter: Reporter) -> RunReport:
    """Run one job to completion, interruption or abort; the result is durable whichever happens."""
    source = open_input(job)
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    store = Store(job.state_dir, job.output_path, run_id)
    store.open()
    try:
        return await _run(job, source, store, api_key, options, reporter)
    finally:
        store.close()


async def _run(
    job: Job, source: InputSource, store: Store, api_key: str, options: RunOptions, reporter: Reporter
) -> RunReport:
    started_at = dt.datetime.now(dt.UTC)
    samples = job.spec.output.samples
    tally = Tally(rows_total=source.frame.select(pl.len()).collect().item(), samples=samples)
    run = job.spec.run
    table = price_table(job)
    if run.max_cost is not None:
        table = require_prices(job, "run.max_cost")
    budget = Budget(run.max_cost) if run.max_cost is not None else None
    accountant = Accountant(table, ledger.calibration(job.name, job.spec.model.name), budget, job.spec.model.max_tokens)
    pilot = _pilot_sample(tally.rows_total, options) if options.pilot_rows else None
    shape = job.shape
    if store.lock.took_over:
        reporter.event("stale_lock_taken_over", previous=store.lock.took_over)
    if store.recovered:
        reporter.event("journal_recovered", answers=store.recovered)
    if store.corrupt:
        reporter.event("corrupt_parts_quarantined", files=[str(p) for p in store.corrupt])
    settled = SettledKeys.none() if options.fresh else store.settled_keys(retry_failed=options.retry_failed)
    control = Control()

    with endpoint_url(job) as base_url:
        stream = job.spec.model.stream
        client = Client(
            base_url,
            api_key,
            timeout_s=run.timeout_s,
            stream=job.spec.model.max_tokens >= STREAM_FROM_MAX_TOKENS if stream == "auto" else stream,
        )
        limits = Limits(
            concurrency=(
                AimdController(initial=job.concurrency, maximum=run.max_concurrency)
                if job.adaptive
                else job.concurrency
            ),
            requests_per_minute=run.requests_per_minute,
            tokens_per_minute=run.tokens_per_minute,
            expected_output_tokens=job.spec.model.max_tokens,
            classify=overload,
        )
        executor = OnlineExecutor(
            client,
            limits,
            max_attempts=run.max_attempts,
            workers=limits.workers,
            # Input tokens for the token bucket (the limits add the expected output).
            estimate_tokens=accountant.input_estimate,
            shape=shape,
            wait=wait_backoff(run.backoff_initial_s, run.backoff_max_s),
        )

        def sink(result: Result) -> None:
            result, tier = accountant.settle(result)
            store.add(result)
            tally.record(result, tier)
            if store.buffered >= run.checkpoint_rows:
                store.flush()

        fingerprint = _fingerprint(job)
        unchanged = not options.fresh and pilot is None and store.row_map_is_current(fingerprint, settled, samples)
        if unchanged:
            # Nothing changed since a run that answered every row: no row needs rendering.
            tally.rows_seen = tally.rows_settled = tally.rows_total
            requests: AsyncIterator[Request] = _nothing()
        else:
            store.reset_row_map()
            requests = _pending_requests(
                job, source, store, settled, tally, sink, fingerprint, accountant, control, pilot
            )
        reporter.start(job, tally)
        try:
            await _execute(executor.run(requests, sink, control), control, store, tally, limits, run, reporter)
        finally:
            store.flush()
            await client.aclose()

    ledger.append(_ledger_rows(job, tally, store.run_id), store.run_id)
    concurrency = {
        "adaptive": job.adaptive,
        "final": limits.concurrency,
        "overload_429_rate": round(limits.overload_rate(), 4),
    }
    if pilot is not None:
        summary = _summary(job, store, tally, control, started_at, 0, False, accountant) | {"concurrency": concurrency}
        store.record_run({**summary, "pilot": True})
        return RunReport(0, f"pilot: {tally.ok} rows answered", summary)

    failed_rows: int | None = None  # None: not finalized, the output is not complete yet
    # Complete when every row was rendered and every request this run queued came back; rows whose
    # request was settled before are answered by definition. (Counting beats joining the whole row map.)
    complete = unchanged or (tally.all_rows_rendered and tally.queued_answered == tally.requests_queued)
    if control.reason is None and complete:
        counts = store.finalize(job.spec.input.id_column or "id", shape.fields if shape else None, samples)
        failed_rows = int(counts.filter(pl.col("status") != "ok").get_column("rows").sum())
    finalized = failed_rows is not None
    exit_code, message = _outcome(job, control, failed_rows)
    summary = _summary(job, store, tally, control, started_at, exit_code, finalized, accountant)
    summary["concurrency"] = concurrency
    if finalized and shape is not None:
        summary["quality"] = quality.summarise(job, shape)
    write_json_atomic(summary, job.output_path.with_suffix(".summary.json"))
    store.record_run(summary)
    reporter.finish(summary, message)
    return RunReport(exit_code, message, summary)


async def _execute(
    work: Any, control: Control, store: Store, tally: Tally, limits: Limits, run: Any, reporter: Reporter
) -> None:
    """Run the executor with checkpoints, progress ticks and signal handling around it.

    The first SIGINT/SIGTERM stops dispatch and gives in-flight requests `grace_s` to finish; a second
    one (or the end of the grace period) cancels them. Whatever arrived is flushed by the caller.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    grace: asyncio.TimerHandle | None = None

    def on_signal(signum: int) -> None:
        nonlocal grace
        if control.reason in ("SIGINT", "SIGTERM"):
            task.cancel()  # second signal: stop now
            return
        control.stop(signal.Signals(signum).name)
        reporter.event("interrupted", signal=signal.Signals(signum).name, grace_s=run.grace_s)
        grace = loop.call_later(run.grace_s, task.cancel)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(min(run.checkpoint_seconds, reporter.interval_s))
            store.flush()  # time-based checkpoint: no answer waits longer than checkpoint_seconds
            reporter.tick(tally, limits, control)

    beat = asyncio.create_task(heartbeat())
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we ourselves are being cancelled: let it through
        # otherwise the task was cancelled by our own signal handling; what arrived is kept
    finally:
        beat.cancel()
        if grace is not None:
            grace.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        reporter.tick(tally, limits, control)


async def _nothing() -> AsyncIterator[Request]:
    return
    yield  # pragma: no cover - makes this an (empty) async generator


def _fingerprint(job: Job) -> dict[str, Any]:
    """What a row map depends on: the spec (after overrides) and each input file's identity."""
    files = []
    for path in job.input_paths:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return {"spec_hash": job.spec_hash, "inputs": files}


async def _pending_requests(
    job: Job,
    source: InputSource,
    store: Store,
    settled: SettledKeys,
    tally: Tally,
    sink: Any,
    fingerprint: dict[str, Any],
    accountant: Accountant,
    control: Control,
    pilot: frozenset[int] | None,
) -> AsyncIterator[Request]:
    """Render every input row; record its request key; yield each unsettled request once (once per
    sample with `output.samples`).

    Stops early, leaving the row map unsealed, when the budget cannot cover the next request.
    """
    builder = RequestBuilder(job)
    queued: set[str] = set()
    for frame in source.batches(RENDER_BATCH_ROWS):
        keys: list[str] = []
        rows: list[list[Request]] = []  # per row, its requests: one, or one per sample
        for row in frame.iter_rows(named=True):
            try:
                request = builder.build(row)
            except RenderError as exc:  # a user template failing on one row's values fails that row only
                keys.append(_render_failure(row, exc, sink, builder.samples))
                rows.append([])
                continue
            keys.append(request.key)
            rows.append(builder.samples_of(request))
        key_series = pl.Series(KEY, keys, dtype=pl.String)
        store.add_rows(frame.select(ROW, ID, *source.keep_columns).with_columns(key_series))
        wanted = pl.Series(KEY, [r.key for requests in rows for r in requests], dtype=pl.String)
        settled_now = iter(settled.contains(wanted).to_list())
        positions = frame.get_column(ROW).to_list()
        tally.rows_seen += frame.height
        for position, requests in zip(positions, rows, strict=True):
            if not requests:
                continue  # a row that failed to render: already recorded
            done = [next(settled_now) for _ in requests]
            # Answered before; or, in a pilot (which sends only its sample of rows), not wanted now.
            if all(done) or (pilot is not None and position not in pilot):
                tally.rows_settled += 1
                continue
            for pending, is_done in zip(requests, done, strict=True):
                if is_done or pending.key in queued:
                    continue
                if not accountant.admit(pending):
                    control.end_dispatch("budget")  # what was admitted is paid for in advance: send it
                    return
                queued.add(pending.key)
                tally.requests_queued += 1
                yield pending
        await asyncio.sleep(0)  # let answers in between batches
    store.seal_row_map(fingerprint)  # reached only when every input row was rendered
    tally.all_rows_rendered = True


def _render_failure(row: dict[str, Any], exc: RenderError, sink: Any, samples: int) -> str:
    """Record a row whose prompt cannot be rendered as failed (each of its samples); nothing is sent."""
    key = f"render-{row[ID]}"
    for index in range(samples):
        sink(
            Result(
                key=sample_key(key, index),
                status="error",
                attempts=0,
                latency_ms=None,
                finished_at=dt.datetime.now(dt.UTC),
                error_type="render_error",
                error_message=str(exc),
            )
        )
    return key


@contextlib.contextmanager
def endpoint_url(job: Job) -> Iterator[str]:
    """The base URL to send to; for `endpoint: simulator`, a simulator running for this run only."""
    if job.base_url is not None:
        yield job.base_url
        return
    sim = job.spec.simulator
    config = SimConfig(
        latency_s=sim.latency_s,
        latency_jitter_s=sim.latency_jitter_s,
        concurrency_cap=sim.concurrency_cap,
        fault_rate=sim.fault_rate,
        invalid_rate=sim.invalid_rate,
        sample_disagreement=sim.sample_disagreement,
        seed=sim.seed,
    )
    with SimulatorThread(config) as server:
        yield server.url


def _pilot_sample(rows_total: int, options: RunOptions) -> frozenset[int]:
    """The row positions a pilot sends: a seeded random sample, the same on every try."""
    count = min(options.pilot_rows or 0, rows_total)
    return frozenset(random.Random(options.pilot_seed).sample(range(rows_total), count))


def _ledger_rows(job: Job, tally: Tally, run_id: str) -> pl.DataFrame:
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


def _outcome(job: Job, control: Control, failed_rows: int | None) -> tuple[int, str]:
    """The exit code and message; for a finished run they describe the whole output, not just this run."""
    resume = f"glm-batch run {job.spec_path}"
    if control.reason == "budget":
        return BudgetExhausted.exit_code, (
            f"stopped before run.max_cost ({job.spec.run.max_cost} {job.currency}) could be exceeded; "
            f"answers so far are saved; continue later with: {resume}"
        )
    if control.aborted is not None:
        return control.aborted.exit_code, f"{control.aborted}; fix that, then resume with: {resume}"
    if control.reason in ("SIGINT", "SIGTERM"):
        code = 130 if control.reason == "SIGINT" else 143
        return code, f"interrupted by {control.reason}; answers so far are saved; resume with: {resume}"
    if failed_rows is None:
        return 1, f"some rows have no answer yet; resume with: {resume}"
    if failed_rows:
        return 1, (
            f"finished; {failed_rows} rows failed (see error_type in {job.output_path}); "
            f"send them again with: {resume} --retry-failed"
        )
    return 0, f"all rows answered; results in {job.output_path}"


def _summary(
    job: Job,
    store: Store,
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
    }
    estimate = store.read_estimate()
    if estimate is not None and table is not None and tally.ok:
        # How good was `glm-batch estimate`? Compare its expected cost per request with this run's.
        answerable = estimate.get("requests_answerable", estimate["requests_to_send"])
        expected = estimate["cost"]["expected"] / max(1, answerable) * tally.ok
        cost["estimate"] = {
            "estimated": round(expected, 6),
            "spent": round(tally.cost, 6),
            "error_pct": round(100 * (expected - tally.cost) / tally.cost, 1) if tally.cost else None,
        }
    return {
        "job": job.name,
        "run_id": store.run_id,
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
