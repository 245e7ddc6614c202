"""No chunk keeps two live batches: the job's batches for a chunk are listed, one is kept, the others
cancelled at once (a create whose answer was lost can land after another was made; docs/decisions.md,
"No chunk keeps two batches").

    guard = Twins(job_tag); guard.watch(chunk_id)
    changed = await guard.sweep(api, book, chunk_ids, notify)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from runner.send.batch.api import BatchAPI
from runner.send.batch.book import BatchBook, Chunk
from runner.send.batch.errors import BatchAPIError
from runner.send.batch.rules import epoch_ms
from runner.send.batch.shapes import Batch

__all__ = ["Twins", "batches_since"]

# How far along a batch is; a batch that stopped (failed, expired, cancelled) is never the one kept
# while a live one exists.
_ALONG = {"validating": 1, "in_progress": 2, "finalizing": 3, "completed": 4}
_CANCELLABLE = ("validating", "in_progress")


class Twins:
    """Finds chunks of one job with more than one batch, keeps one, cancels the others."""

    def __init__(self, job: str) -> None:
        self._job = job
        self.watched: set[str] = set()  # chunks whose create may have been made twice
        self.cancelled: list[str] = []  # batch ids cancelled as extra (each at most once)

    def watch(self, chunk_id: str) -> None:
        """Sweep this chunk on every look from now on: its create may have been made twice."""
        self.watched.add(chunk_id)

    async def sweep(
        self, api: BatchAPI, book: BatchBook, chunk_ids: Iterable[str], notify: Callable[..., None] | None = None
    ) -> set[str]:
        """Keep one batch for each of the chunks (those created so far) and cancel the others; the chunks
        whose batch in the book changed. A Batch API failure leaves the sweep to the next look."""
        chunks = {c: book.chunks[c] for c in chunk_ids if book.chunks[c].batch_id is not None}
        if not chunks:
            return set()
        try:
            found = await self._batches_of(api, chunks)
        except BatchAPIError:
            return set()
        changed = set()
        for chunk_id, found_batches in found.items():
            batches = [b for b in found_batches if b.status in _ALONG]  # live: not failed, expired, cancelled
            if len({b.id for b in batches}) < 2:
                continue
            chunk = chunks[chunk_id]
            keep = max(batches, key=lambda b: _rank(b, chunk))
            extra = [b for b in batches if b.id != keep.id and b.id not in self.cancelled]
            if keep.id != chunk.batch_id and chunk.status == "created":
                book.record(chunk_id, batch_id=keep.id, batch_status=keep.status)
                changed.add(chunk_id)
            for batch in extra:
                await self._cancel(api, batch)
            if notify is not None and extra:
                notify("batch_duplicate", **_said(chunk, keep, extra))
        return changed

    async def _batches_of(self, api: BatchAPI, chunks: dict[str, Chunk]) -> dict[str, list[Batch]]:
        """The job's batches for the chunks, made since the oldest of their uploads."""
        uploads = [c.uploaded_at for c in chunks.values()]
        oldest = None if None in uploads else min(u for u in uploads if u is not None)
        found: dict[str, list[Batch]] = {}
        async for batch in batches_since(api, oldest):
            if batch.metadata.get("glm_batch_job") != self._job:
                continue
            chunk = chunks.get(str(batch.metadata.get("glm_batch_chunk")))
            if chunk is not None and batch.input_file_id == chunk.file_id:
                found.setdefault(chunk.id, []).append(batch)
        return found

    async def _cancel(self, api: BatchAPI, batch: Batch) -> None:
        """Cancel an extra batch (once); one that has stopped, or can no longer be, is left as it is."""
        self.cancelled.append(batch.id)
        if batch.status in _CANCELLABLE:
            try:
                await api.cancel(batch.id)
            except BatchAPIError:
                self.cancelled.remove(batch.id)  # tried again at the next sweep


async def batches_since(api: BatchAPI, since_ms: int | None) -> AsyncIterator[Batch]:
    """The account's batches made at or after `since_ms` (epoch ms; None: all), page by page.

    The list's order is not documented (real-wire.md): a page whose batches run newest first and
    end before `since_ms` is the last one read; pages in any other order are read to the end."""
    after: str | None = None
    while True:
        page = await api.list(after=after, limit=100)
        stamps = [epoch_ms(b.created_at) if b.created_at else None for b in page.data]
        for batch, stamp in zip(page.data, stamps, strict=True):
            if since_ms is None or stamp is None or stamp >= since_ms:
                yield batch
        known = [stamp for stamp in stamps if stamp is not None]
        newest_first = known == sorted(known, reverse=True)
        if since_ms is not None and known and newest_first and known[-1] < since_ms:
            return
        following = page.last_id or (page.data[-1].id if page.data else None)
        if not page.has_more or following is None or following == after:
            return
        after = following


def _rank(batch: Batch, chunk: Chunk) -> tuple[int, int, int, int]:
    """The batch to keep is the greatest: furthest along, most lines done, the book's own, the oldest."""
    counts = batch.request_counts
    created = -epoch_ms(batch.created_at) if batch.created_at else 0
    return (_ALONG.get(batch.status, 0), counts.completed + counts.failed, batch.id == chunk.batch_id, created)


def _said(chunk: Chunk, keep: Batch, extra: list[Batch]) -> dict[str, Any]:
    """What the log says of a chunk found with more than one batch."""
    billed = sum(b.request_counts.completed for b in extra)
    return {
        "chunk": chunk.id,
        "kept": keep.id,
        "cancelled": [b.id for b in extra if b.status in _CANCELLABLE],
        "extra": {b.id: b.status for b in extra},
        "message": f"{len(extra) + 1} batches were made for {chunk.id} (a create whose answer was lost landed "
        f"late); kept {keep.id}, cancelled the others"
        + (f"; they had completed {billed} lines, billed twice" if billed else ", before any line ran"),
    }
