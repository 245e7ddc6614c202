"""No batch of a job runs unowned: one batch is kept for each chunk, and every other batch tagged for
the job is cancelled, or, when it already ran, reported and left unharvested (docs/decisions.md,
"No chunk keeps two batches"). `belongs` is the one rule of what a batch was made from."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from runner.send.batch.api import BatchAPI
from runner.send.batch.book import OPEN, BatchBook, Chunk
from runner.send.batch.errors import BatchAPIError
from runner.send.batch.rules import epoch_ms
from runner.send.batch.shapes import Batch

# How far along a batch is; a batch that stopped (failed, expired, cancelled) is never the one kept
# while a live one exists.
_ALONG = {"validating": 1, "in_progress": 2, "finalizing": 3, "completed": 4}
_CANCELLABLE = ("validating", "in_progress")
# A create whose answer was lost lands within this of being asked, or never: until then the chunk's
# batches are looked at on every run (and `status`), whatever became of the chunk.
LATE_CREATE_WINDOW_S = 24 * 3600.0


def tag(job: str, chunk: Chunk) -> dict[str, str]:
    """The metadata a chunk's batch is created with: the job, the chunk, and the chunk's content."""
    found = {"glm_batch_job": job, "glm_batch_chunk": chunk.id}
    if chunk.digest:
        found["glm_batch_digest"] = chunk.digest
    return found


def belongs(batch: Batch, chunk: Chunk, job: str) -> bool:
    """Was `batch` made by this job for this chunk? Tagged with both, and made from the chunk's own
    content: its digest in the tag (an input file deleted and uploaded again has a new id, the same
    digest), else (a batch made before digests were tagged) from the chunk's input file."""
    meta = batch.metadata
    if meta.get("glm_batch_job") != job or meta.get("glm_batch_chunk") != chunk.id:
        return False
    digest = meta.get("glm_batch_digest")
    if digest is not None and chunk.digest is not None:
        return bool(digest == chunk.digest)
    return batch.input_file_id is not None and batch.input_file_id == chunk.file_id


def watched(book: BatchBook, now_ms: int | None = None) -> list[str]:
    """The chunks whose create may have been made twice and may still land: looked at on every run."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    window = int(LATE_CREATE_WINDOW_S * 1000)
    return [
        c.id
        for c in book.chunks.values()
        if c.unsure
        and c.uploaded_at is not None
        and (now - c.created_ms < window if c.created_ms is not None else c.status in OPEN)
    ]


class Twins:
    """Keeps one batch for each chunk of one job and cancels (or reports) every other batch tagged for it."""

    def __init__(self, job: str) -> None:
        self._job = job
        self.watched: set[str] = set()  # chunks whose create may have been made twice

    def watch(self, chunk_id: str) -> None:
        """Sweep this chunk on every look from now on: its create may have been made twice."""
        self.watched.add(chunk_id)

    async def sweep(
        self,
        api: BatchAPI,
        book: BatchBook,
        chunk_ids: Iterable[str],
        notify: Callable[..., None] | None = None,
        *,
        adopt: bool = False,
    ) -> set[str]:
        """Look at the job's batches since the chunks' oldest upload: an open chunk keeps the live batch
        furthest along; every other batch tagged for the job is a stray, cancelled while it can be and
        reported (once) when it ran. A chunk not created yet leaves its batches to its create (`adopt`).
        The chunks whose batch changed; a Batch API failure leaves the sweep to the next look."""
        chunks = {c: book.chunks[c] for c in chunk_ids if book.chunks[c].uploaded_at is not None}
        if not chunks:
            return set()
        try:
            found = [b async for b in batches_since(api, min(c.uploaded_at or 0 for c in chunks.values()))]
        except BatchAPIError:
            return set()
        owned = book.owned()
        mine: dict[str, list[Batch]] = {}
        unknown: list[Batch] = []  # tagged for the job, made for no chunk the book has as it is
        for batch in found:
            if batch.metadata.get("glm_batch_job") != self._job:
                continue
            named = book.chunks.get(str(batch.metadata.get("glm_batch_chunk")))
            if named is not None and belongs(batch, named, self._job):
                mine.setdefault(named.id, []).append(batch)
            elif batch.id not in owned:
                unknown.append(batch)
        changed = set()
        for chunk_id, batches in mine.items():
            chunk = book.chunks[chunk_id]
            if chunk.status in ("written", "uploaded"):
                if not adopt:
                    continue  # its create looks for a batch made before and adopts it
                first = max(batches, key=lambda b: _rank(b, chunk))
                chunk = book.created(chunk, first, unsure=True)
                changed.add(chunk_id)
            kept = chunk.batch_id
            live = [b for b in batches if b.status in _ALONG]
            if chunk.status == "created" and live and kept in {b.id for b in batches}:
                keep = max(live, key=lambda b: _rank(b, chunk))
                if keep.id != kept:
                    chunk = book.record(chunk_id, batch_id=keep.id, batch_status=keep.status)
                    changed.add(chunk_id)
                kept = keep.id
            owned = book.owned()
            extra = [b for b in batches if b.id != kept and b.id not in owned]
            await self._strays(api, book, chunk, kept, extra, notify)
        await self._strays(api, book, None, None, unknown, notify)
        return changed

    async def _strays(
        self,
        api: BatchAPI,
        book: BatchBook,
        chunk: Chunk | None,
        kept: str | None,
        batches: list[Batch],
        notify: Callable[..., None] | None,
    ) -> None:
        """Cancel the strays that can be, record each once, and say what became of them."""
        said = []
        for batch in batches:
            if batch.id in book.strays:
                continue
            status = batch.status
            if status in _CANCELLABLE:
                try:
                    status = (await api.cancel(batch.id)).status
                except BatchAPIError:
                    continue  # tried again at the next sweep
            billed = batch.request_counts.completed
            made_for = chunk.id if chunk else batch.metadata.get("glm_batch_chunk")
            book.record_stray(batch.id, chunk=made_for, status=status, billed=billed)
            if billed or status != batch.status or status in ("finalizing", "completed", "cancelling"):
                said.append((batch, status))  # one that stopped by itself before any line ran is not news
        if said and notify is not None:
            notify("batch_duplicate", **_said(chunk, kept, said))


async def batches_since(api: BatchAPI, since_ms: int | None) -> AsyncIterator[Batch]:
    """The account's batches made at or after `since_ms` (epoch ms; None: all), page by page; the
    list's order is not documented, so only a newest-first page that ends before `since_ms` stops it."""
    async for page in api.pages():
        stamps = [epoch_ms(b.created_at) if b.created_at else None for b in page.data]
        for batch, stamp in zip(page.data, stamps, strict=True):
            if since_ms is None or stamp is None or stamp >= since_ms:
                yield batch
        known = [stamp for stamp in stamps if stamp is not None]
        newest_first = known == sorted(known, reverse=True)
        if since_ms is not None and known and newest_first and known[-1] < since_ms:
            return


def _rank(batch: Batch, chunk: Chunk) -> tuple[int, int, int, int]:
    """The batch to keep is the greatest: furthest along, most lines done, the book's own, the oldest."""
    counts = batch.request_counts
    created = -epoch_ms(batch.created_at) if batch.created_at else 0
    return (_ALONG.get(batch.status, 0), counts.completed + counts.failed, batch.id == chunk.batch_id, created)


def _said(chunk: Chunk | None, kept: str | None, strays: list[tuple[Batch, str]]) -> dict[str, Any]:
    """What the log says of batches found beside the one a chunk keeps (or for no chunk at all)."""
    billed = sum(b.request_counts.completed for b, _ in strays)
    ran = [b.id for b, status in strays if status in ("finalizing", "completed")]
    where = f"{chunk.id}, which keeps {kept}" if chunk is not None and kept else "no chunk of this job"
    message = (
        f"{len(strays)} more batch(es) were made for {where} (a create whose answer was lost landed late): "
        + ", ".join(f"{b.id} {status}" for b, status in strays)
        + (
            f"; they had completed {billed} lines, billed twice and not collected"
            if billed
            else "; cancelled before any line ran"
        )
    )
    return {
        "chunk": chunk.id if chunk is not None else None,
        "kept": kept,
        "cancelled": [b.id for b, status in strays if status in ("cancelling", "cancelled")],
        "ran": ran,
        "extra": {b.id: status for b, status in strays},
        "billed_twice": billed,
        "message": message,
    }
