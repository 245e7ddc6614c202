"""What `glm-batch status` and `glm-batch cancel` know of a job's batches. Cancelling keeps what a batch
already finished (billed; the next run harvests it and sends the rest again)."""

from __future__ import annotations

import os
from typing import Any

from runner.job import catalog
from runner.job.resolve import Job
from runner.send.batch.book import OPEN, BatchBook


def _written_book(job: Job) -> BatchBook | None:
    """The job's batch book, or None when no batch run wrote one."""
    directory = job.state_dir / "batches"
    return BatchBook(directory) if (directory / "book.jsonl").exists() else None


def batch_rows(job: Job) -> list[dict[str, Any]]:
    """One line per chunk of the job: its batch, how far it got, its request counts at the last look."""
    book = _written_book(job)
    if book is None:
        return []
    return [
        {
            "chunk": chunk.id,
            "batch": chunk.batch_id,
            "lines": chunk.lines,
            "step": chunk.status,
            "status": chunk.batch_status,
            **{k: chunk.counts.get(k) for k in ("completed", "failed")},
        }
        for chunk in book.chunks.values()
    ]


def stray_rows(job: Job) -> list[dict[str, Any]]:
    """The batches of the job no chunk keeps (a create whose answer was lost landed late), as handled."""
    book = _written_book(job)
    return [] if book is None else list(book.strays.values())


def _looked_at(book: BatchBook) -> list[str]:
    """The chunks whose batches `status` and `cancel` list: open ones past their upload, and those whose
    create a lost answer may still land (runner.send.batch.duplicates.watched)."""
    from runner.send.batch.duplicates import watched

    open_ = [c.id for c in book.open_chunks() if c.uploaded_at is not None]
    return sorted(set(open_) | set(watched(book)))


def has_batches_to_look_at(job: Job) -> bool:
    """Does the job's book name batches at Zhipu that `status` should look at (sends nothing)?"""
    book = _written_book(job)
    return book is not None and bool(_looked_at(book))


async def look_for_strays(job: Job, api_key: str, base_url: str) -> list[dict[str, Any]] | None:
    """For `status`: find the job's batches that no chunk keeps and cancel them (or report the ones
    that ran), as every run does; a batch made for a chunk whose create was never recorded is recorded.
    None when a run of the job is active (it looks itself); else what the look newly said."""
    from runner.errors import LockHeld, UsageError
    from runner.state.lock import JobLock

    directory = job.state_dir / "batches"
    if not has_batches_to_look_at(job) or not os.access(directory, os.W_OK):  # a folder we may only read
        return []
    lock = JobLock(job.state_dir / "lock")
    try:
        lock.acquire()
    except (LockHeld, UsageError):
        return None
    try:
        return await _sweep(job, api_key, base_url, BatchBook(directory))
    finally:
        lock.release()


async def _sweep(job: Job, api_key: str, base_url: str, book: BatchBook) -> list[dict[str, Any]]:
    """One sweep of the job's batches (under its lock); the events it said."""
    from runner.send import job_tag
    from runner.send.batch.api import BatchAPI
    from runner.send.batch.duplicates import Twins

    said: list[dict[str, Any]] = []
    native = catalog.native_url_for(base_url, job.native_url)
    async with BatchAPI(native, api_key) as api:
        await Twins(job_tag(job.state_dir)).sweep(
            api, book, _looked_at(book), lambda event, **fields: said.append({"event": event, **fields}), adopt=True
        )
    return said


async def cancel_batches(job: Job, api_key: str, base_url: str, *, purge: bool = False) -> dict[str, Any]:
    """Cancel every open batch of the job, saying how many lines each had finished (billed). `purge`:
    also delete the job's files at Zhipu (results not collected yet are kept). Refused while a run
    holds the job's lock: it would send the cancelled lines again at once."""
    from runner.errors import LockHeld
    from runner.state.lock import JobLock

    lock = JobLock(job.state_dir / "lock")
    try:
        lock.acquire()
    except LockHeld as exc:
        raise LockHeld(
            f"a run of this job is active, and would send the cancelled lines again: stop it first (Ctrl-C; "
            f"its batches keep running), then cancel ({exc})"
        ) from None
    try:
        return await _cancel(job, api_key, base_url, purge)
    finally:
        lock.release()


async def _cancel(job: Job, api_key: str, base_url: str, purge: bool) -> dict[str, Any]:
    """Cancel (and purge) under the job's lock."""
    from runner.send.batch.api import BatchAPI
    from runner.send.batch.errors import BatchStatusError
    from runner.send.batch.harvest import purge as purge_chunk

    book = BatchBook(job.state_dir / "batches")
    native = catalog.native_url_for(base_url, job.native_url)
    cancelled: list[dict[str, Any]] = []
    deleted = 0
    # Batches made for chunks whose create was never recorded are recorded first (so cancelled below),
    # and strays are cancelled by the sweep.
    strays = await _sweep(job, api_key, base_url, book) if _looked_at(book) else []
    for said in strays:
        cancelled += [{"batch": b, "status": status} for b, status in said.get("extra", {}).items()]
    async with BatchAPI(native, api_key) as api:
        if purge:
            for chunk in list(book.chunks.values()):
                if not chunk.purged and chunk.status != "created":  # a running batch still reads its input
                    deleted += await purge_chunk(api, book, chunk)
        for chunk in book.chunks.values():
            if chunk.status not in OPEN or chunk.batch_id is None:
                continue
            try:
                batch = await api.cancel(chunk.batch_id)
            except BatchStatusError as exc:  # finished meanwhile, or already gone: report, go on
                cancelled.append({"batch": chunk.batch_id, "status": f"not cancelled: {exc}"})
                continue
            book.record(chunk.id, batch_status=batch.status)
            counts = batch.request_counts
            cancelled.append({"batch": batch.id, "status": batch.status, "billed_lines": counts.completed})
    billed = sum(c.get("billed_lines", 0) for c in cancelled)
    return {"batches": cancelled, "billed_lines": billed, "files_deleted": deleted}
