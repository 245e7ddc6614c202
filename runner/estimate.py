"""`glm-batch estimate`: what a job will cost and how long it will take, before spending anything.
`record=False` is `run --dry-run`: the job's state is only read (docs/decisions.md, "The estimate")."""

from __future__ import annotations

import asyncio
import json
import random
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from runner.errors import EndpointAborted, UsageError
from runner.job import catalog
from runner.job.inputs import InputSource, open_input
from runner.job.resolve import Job
from runner.money import ledger
from runner.money.kept_estimate import made_for
from runner.money.measured import OutputModel, calibration_from, earlier_answers, output_model
from runner.money.pricing import PriceTable, require_prices, tier_label
from runner.money.tokens import Calibration, estimate_request, over_context, token_count
from runner.observe.progress import Reporter
from runner.plan import plan
from runner.records import KEY, Request, read_journal, results_frame, scan_results, settles
from runner.send.base import read_at_most
from runner.send.endpoints import endpoint_url
from runner.state.settled import SettledKeys
from runner.state.store import Store, whole_part

EXACT_SAMPLE = 200  # requests counted by the tokenizer API with --exact
TOKENIZER_ANSWER_BYTES = 1 << 20  # a tokenizer answer is a count: far less than this (read_at_most bounds it)
ASSUMED_LATENCY_S = 5.0  # per request, when no run has measured one


@dataclass(frozen=True)
class EstimateOptions:
    """What the estimate may spend to be more exact."""

    exact: bool = False  # count a sample with the tokenizer API (no generation, no cost)
    pilot_rows: int | None = None  # send this many random rows for real first
    latency_s: float | None = None  # override the per-request latency assumption
    fresh: bool = False  # price a full re-run: earlier answers settle nothing
    retry_failed: bool = False  # rows that failed for good count as to send (run --retry-failed)
    record: bool = True  # open the state (lock, recovery) and keep the report; False: only read it


async def estimate_job(job: Job, *, api_key: str, options: EstimateOptions, reporter: Reporter) -> dict[str, Any]:
    """Build the estimate report (and keep it in the job's state for the next run to compare with)."""
    table = require_prices(job, "glm-batch estimate")
    if options.pilot_rows:
        from runner.engine import execute
        from runner.runs import RunOptions

        pilot = await execute(
            job, api_key=api_key, options=RunOptions(pilot_rows=options.pilot_rows), reporter=reporter
        )
        if pilot.exit_code == EndpointAborted.exit_code:  # a bad key or no balance: say so, as a run does
            raise EndpointAborted(pilot.message)

    source = open_input(job)
    if not options.record:
        parts, settled = _read_state(job, options)
        return await _estimate(job, api_key, table, source, parts, settled, options)
    store = Store(job.state_dir, run_id="estimate", rows=job.row_map)
    store.open()
    try:
        settled = SettledKeys.none() if options.fresh else store.settled_keys(retry_failed=options.retry_failed)
        report = await _estimate(job, api_key, table, source, store.result_parts(), settled, options)
        store.write_estimate({**report, "made_for": made_for(job)})  # a run compares only with its own
    finally:
        store.close()
    return report


async def _estimate(
    job: Job,
    api_key: str,
    table: PriceTable,
    source: InputSource,
    parts: list[Path],
    settled: SettledKeys,
    options: EstimateOptions,
) -> dict[str, Any]:
    """The report, from the job's answer parts (calibration, output lengths) and its settled keys."""
    answers = earlier_answers(parts, job)
    calibration = calibration_from(answers) or ledger.calibration(
        job.name, job.spec.model.name, simulated=job.base_url is None
    )
    pending = _pending_estimates(job, source, settled)
    if options.exact and pending.sample:
        calibration = await _tokenizer_calibration(job, api_key, pending.sample)
    output = output_model(answers, job.spec.model.max_tokens, thinks=job.thinking.thinks)
    return _report(job, table, calibration, output, pending, options)


def _read_state(job: Job, options: EstimateOptions) -> tuple[list[Path], SettledKeys]:
    """The job's readable answer parts and settled keys, read without opening the store (nothing made,
    locked or moved); answers in a journal count as settled too, as the next run folds them in."""
    store = Store(job.state_dir, run_id="dry-run", rows=job.row_map)  # never opened: only its paths are used
    parts = [part for part in store.result_parts() if whole_part(part)]  # the run sets the others aside
    if options.fresh:
        return parts, SettledKeys.none()
    journals = sorted(job.state_dir.glob("journal-*.jsonl")) if job.state_dir.is_dir() else []
    frames = [results_frame(read_journal(journal), "").lazy() for journal in journals]
    frames += [scan_results(parts)] if parts else []
    results = pl.concat([f.select(KEY, "status", "retryable") for f in frames]) if frames else None
    if results is None:
        return parts, SettledKeys.none()
    keys = results.filter(settles(options.retry_failed)).select(KEY).unique().sort(KEY).collect()
    return parts, SettledKeys(keys.get_column(KEY))


@dataclass
class Pending:
    """The requests a run would send, reduced to what an estimate needs: each one's raw input-token
    estimate (4 bytes a request), and a uniform sample of the requests themselves for --exact."""

    raw: array[int]
    sample: list[Request]
    rows_total: int = 0
    rows_settled: int = 0
    render_failures: int = 0  # rows whose prompt fails to render: a run records them, sends nothing
    first_render_failure: str | None = None


def _pending_estimates(job: Job, source: InputSource, settled: SettledKeys) -> Pending:
    """Plan the run (runner.plan): estimate each distinct unanswered request, keep a reservoir sample."""
    pending = Pending(array("I"), [])
    seen: set[int] = set()  # 64-bit key hashes: a request already counted adds nothing
    rng = random.Random(0)
    for batch in plan(job, source, settled, batch_rows=5000):
        pending.rows_total += batch.frame.height
        for row in batch.rows:
            if row.error is not None:
                pending.render_failures += 1
                pending.first_render_failure = pending.first_render_failure or (
                    f"row {row.position} (id {row.id}): {row.error}"
                )
                continue
            pending.rows_settled += all(row.done)
            for request, is_done in zip(row.requests, row.done, strict=True):
                # hash(), not the key's leading digits: a row's samples share those.
                digest = hash(request.key)
                if is_done or digest in seen:
                    continue
                seen.add(digest)
                pending.raw.append(estimate_request(request.params))
                # Reservoir sampling (Algorithm R): every request has the same chance to be in the sample.
                if len(pending.sample) < EXACT_SAMPLE:
                    pending.sample.append(request)
                elif (slot := rng.randrange(len(pending.raw))) < EXACT_SAMPLE:
                    pending.sample[slot] = request
    return pending


async def _tokenizer_calibration(job: Job, api_key: str, sample: list[Request]) -> Calibration:
    """Count a random sample of requests with Zhipu's tokenizer API and learn the ratio to the estimate."""
    import aiohttp

    semaphore = asyncio.Semaphore(max(1, job.concurrency))
    headers = {"authorization": f"Bearer {api_key}"}

    async def count(session: aiohttp.ClientSession, url: str, request: Request) -> int:
        messages = [{"role": "system", "content": request.params["system"]}] if request.params.get("system") else []
        messages += request.params["messages"]
        try:
            async with (
                semaphore,
                session.post(
                    url,
                    json={"model": job.spec.model.name, "messages": messages},
                    headers=headers,
                    allow_redirects=False,  # the key goes to the endpoint named, nowhere else
                ) as response,
            ):
                status = response.status
                raw = await read_at_most(response.content, TOKENIZER_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EndpointAborted(f"the tokenizer API could not be reached ({type(exc).__name__}: {exc})") from None
        if status in (401, 403):
            raise EndpointAborted(f"the tokenizer API refused the key (HTTP {status})")
        counted = _tokens_counted(raw) if status == 200 else None
        if counted is None:
            said = f"HTTP {status}" if status != 200 else f"{len(raw):,} bytes that are no token count"
            raise UsageError(f"the tokenizer API answered {said}; try again without --exact")
        return counted

    with endpoint_url(job) as base_url:
        url = catalog.native_url_for(base_url, job.native_url) + "/tokenizer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            exact = await asyncio.gather(*(count(session, url, r) for r in sample))
    estimated = sum(estimate_request(r.params) for r in sample)
    return Calibration(sum(exact) / estimated, len(sample), f"tokenizer API on {len(sample)} sampled requests")


def _tokens_counted(raw: bytes) -> int | None:
    """The count in a tokenizer answer (`{"usage": {"prompt_tokens": n}}`), or None when it holds none:
    over TOKENIZER_ANSWER_BYTES, not JSON, an error object, a count that is not one."""
    if len(raw) > TOKENIZER_ANSWER_BYTES:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return token_count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None


def _report(
    job: Job,
    table: PriceTable,
    calibration: Calibration,
    output: OutputModel,
    pending: Pending,
    options: EstimateOptions,
) -> dict[str, Any]:
    calibrated = array("I", (calibration.apply(raw) for raw in pending.raw))
    # A prompt over the model's context window is refused (400/1261) before any token is billed: it
    # costs nothing and takes no time, but the user must hear of it before the run.
    context = job.model.context
    inputs = array("I", (t for raw, t in zip(pending.raw, calibrated, strict=True) if not over_context(raw, context)))
    too_long = len(calibrated) - len(inputs)
    n = len(inputs)
    # Calibrated estimates are good to a few percent; raw ones can be off by a third either way.
    in_low, in_high = (0.95, 1.05) if calibration.samples >= 20 else (0.75, 1.35)
    max_tokens = job.spec.model.max_tokens

    def total(in_scale: float, out_tokens: float) -> float:
        return sum(table.cost(input_tokens=round(t * in_scale), output_tokens=round(out_tokens)) for t in inputs)

    tiers = dict(Counter(tier_label(table.tier(t, round(output.expected))) for t in inputs))
    latency = options.latency_s or output.latency_s or ASSUMED_LATENCY_S
    latency_basis = "given" if options.latency_s else "median of measured answers" if output.latency_s else "assumed"
    expected = total(1.0, output.expected)
    return {
        "job": job.name,
        "model": job.spec.model.name,
        "endpoint": job.endpoint_name,
        "currency": job.currency,
        "prices_confirmed": table.confirmed,
        "fresh": options.fresh,
        "rows": pending.rows_total,
        "rows_answered_already": pending.rows_settled,
        "requests_to_send": len(calibrated),
        "requests_answerable": n,  # the cost and time below are theirs
        "render_failures": {"rows": pending.render_failures, "first": pending.first_render_failure},
        "over_context": {"requests": too_long, "context_tokens": context},
        "input_tokens": {
            "expected": sum(inputs),
            "calibration": {
                "ratio": round(calibration.ratio, 4),
                "samples": calibration.samples,
                "basis": calibration.source,
            },
        },
        "output_tokens": {
            "low": round(n * output.low),
            "expected": round(n * output.expected),
            "high": round(n * output.high),
            "ceiling": n * max_tokens,
            "per_request_expected": round(output.expected, 1),
            "basis": output.basis,
        },
        "cost": {
            "low": round(total(in_low, output.low), 6),
            "expected": round(expected, 6),
            "high": round(total(in_high, output.high), 6),
            "ceiling": round(total(in_high, max_tokens), 6),
        },
        "batch_api_expected": (
            round(expected * job.model.batch.price_share, 6) if job.batch is None or job.batch.allowed else None
        ),
        "tier_mix": tiers,
        "wall_time_s": {
            "expected": round(n * latency / max(1, job.concurrency), 1),
            "latency_s_per_request": round(latency, 3),
            "latency_basis": latency_basis,
            "concurrency": job.concurrency,
        },
        "modes": _modes(job, expected, n * latency / max(1, job.concurrency)),
    }


BATCH_TURNAROUND_S = 24 * 3600.0  # Zhipu: most batches finish within 24 h (expire after 7 days)


def _modes(job: Job, online_cost: float, online_s: float) -> dict[str, Any]:
    """Online, batch and hybrid side by side: expected cost and wall time of each way to run the job."""
    batch = job.model.batch
    modes: dict[str, Any] = {"online": {"cost": round(online_cost, 6), "wall_time_s": round(online_s, 1)}}
    verdict = job.batch
    if verdict is not None and not verdict.allowed:
        modes["batch"] = modes["hybrid"] = {"eligible": False, "why": verdict.why}
        return modes
    batch_cost = online_cost * batch.price_share
    unconfirmed = verdict is not None and verdict.basis == "unconfirmed"
    modes["batch"] = {
        "cost": round(batch_cost, 6),
        "wall_time_s": BATCH_TURNAROUND_S,
        "basis": "up to 24 h: Zhipu finishes most batches within a day"
        + ("; the model is not on Zhipu's list: the batch may fail at validation" if unconfirmed else ""),
        "price_confirmed": batch.confirmed and batch.eligible,
        "eligibility": verdict.basis if verdict is not None else "catalogue",
    }
    deadline = job.spec.run.deadline
    if deadline is not None:
        from runner.send.batch.deadline import seconds_until

        budget_s = seconds_until(deadline)
        # The share the Batch API is expected to finish by the deadline, if batches progress evenly over a
        # day; the rest goes online at full price (no later than the deadline).
        batch_share = min(1.0, budget_s / BATCH_TURNAROUND_S)
        modes["hybrid"] = {
            "cost": round(batch_cost * batch_share + online_cost * (1 - batch_share), 6),
            "cost_range": [round(batch_cost, 6), round(online_cost, 6)],
            "wall_time_s": round(min(budget_s, max(online_s, budget_s)), 1),
            "basis": f"deadline {deadline}; assumes batches progress evenly over a day",
        }
    else:
        modes["hybrid"] = {"cost_range": [round(batch_cost, 6), round(online_cost, 6)], "basis": "set run.deadline"}
    return modes
