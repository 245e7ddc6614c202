"""How requests are sent: executors behind one protocol (runner.send.base.Executor), chosen here and
imported only when chosen, so commands that send nothing never load the SDK."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.job.resolve import Job
    from runner.records import Request
    from runner.send.base import Executor
    from runner.send.client import Client
    from runner.send.limits import Slots
    from runner.send.online import OnlineExecutor


def make_executor(job: Job, base_url: str, api_key: str, estimate_tokens: Callable[[Request], int]) -> Executor:
    """The executor the job's spec asks for, sending to `base_url` with `api_key`."""
    mode = job.spec.run.mode
    if mode == "online":
        return online_executor(job, base_url, api_key, estimate_tokens)
    online = online_executor(job, base_url, api_key, estimate_tokens) if mode == "hybrid" else None
    return _batch(job, base_url, api_key, online)


def _batch(job: Job, base_url: str, api_key: str, online: Executor | None) -> Executor:
    from runner.job import catalog
    from runner.send.batch.api import BatchAPI
    from runner.send.batch.deadline import deadline_in, seconds_until
    from runner.send.batch.errors import classify_api_error
    from runner.send.batch.executor import BatchExecutor
    from runner.send.retries import wait_backoff

    native = catalog.native_url_for(base_url, job.native_url)
    run = job.spec.run
    deadline = run.deadline

    def api() -> BatchAPI:  # the job's backoff for the Batch API's transient faults too
        wait = wait_backoff(run.backoff_initial_s, run.backoff_max_s, classify=classify_api_error)
        return BatchAPI(native, api_key, wait=wait, not_ready_wait_s=min(2.0, run.batch.poll_initial_s))

    return BatchExecutor(
        job=job_tag(job.state_dir),
        api=api,
        directory=job.state_dir / "batches",
        spec=job.spec.run.batch,
        shape=job.shape,
        online=online,
        # A clock time is a moment; a duration counts from the run's start (its Control), not from here.
        deadline=deadline_in(deadline) if deadline is not None and ":" in deadline else None,
        deadline_after_s=seconds_until(deadline) if deadline is not None and ":" not in deadline else None,
    )


def job_tag(state_dir: Path) -> str:
    """What tags a job's batches (`metadata.glm_batch_job`): a hash of its state folder's resolved
    path, so two jobs with the same name in two folders never take each other's batches."""
    import hashlib

    return "sd-" + hashlib.sha256(str(state_dir.resolve()).encode("utf-8")).hexdigest()[:24]


def online_executor(
    job: Job,
    base_url: str,
    api_key: str,
    estimate_tokens: Callable[[Request], int],
    slots: Callable[[Client], Slots] | None = None,
) -> OnlineExecutor:
    """The Messages API executor for `job`; `slots` builds its limits from the client (a Ray worker's
    leased slots), else the job's own Limits."""
    from runner.send.client import STREAM_FROM_MAX_TOKENS, Client
    from runner.send.limits import AimdController, Limits
    from runner.send.online import OnlineExecutor
    from runner.send.retries import wait_backoff

    run, model = job.spec.run, job.spec.model
    client = Client(
        base_url,
        api_key,
        timeout_s=run.timeout_s,
        stall_s=run.stall_s,
        stream=model.max_tokens >= STREAM_FROM_MAX_TOKENS if model.stream == "auto" else model.stream,
    )
    limits = (
        slots(client)
        if slots is not None
        else Limits(
            concurrency=(
                AimdController(initial=job.concurrency, maximum=run.max_concurrency, learned=job.concurrency_learned)
                if job.adaptive
                else job.concurrency
            ),
            requests_per_minute=run.requests_per_minute,
            tokens_per_minute=run.tokens_per_minute,
            expected_output_tokens=model.max_tokens,
            classify=lambda exc: ((fault := client.classify(exc)).overload, fault.retry_after),
        )
    )
    return OnlineExecutor(
        client,
        limits,
        max_attempts=run.max_attempts,
        # Input tokens for the token bucket (the limits add the expected output).
        estimate_tokens=estimate_tokens,
        shape=job.shape,
        wait=wait_backoff(run.backoff_initial_s, run.backoff_max_s, classify=client.classify, slot_paced=job.adaptive),
    )
