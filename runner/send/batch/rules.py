"""What the batch executor judges from a batch object (and one bounded cancel), and the one-line
messages a stopped run prints."""

from __future__ import annotations

import asyncio

from runner.send.batch.api import BatchAPI
from runner.send.batch.book import Chunk
from runner.send.batch.errors import BatchAPIError, BatchStatusError, classify_api_error
from runner.send.batch.shapes import Batch
from runner.send.retries import Verdict

CLOCK_SLACK_S = 600.0  # how far our clock may run ahead of the API's, when the upload gave no time


def epoch_ms(stamp: int) -> int:
    """A Batch API timestamp in epoch milliseconds (real objects use milliseconds; the docs say seconds)."""
    return stamp * 1000 if stamp < 100_000_000_000 else stamp


def awaiting_output(batch: Batch) -> bool:
    """A finished batch whose counts say lines completed (billed) but which names no output file yet:
    real batches can say `completed` before the file id appears (instructor#1745). Look again."""
    return batch.status != "failed" and batch.output_file_id is None and batch.request_counts.completed > 0


def no_output_file(batch: Batch, looks: int) -> str:
    return (
        f"batch {batch.id} is {batch.status} and says {batch.request_counts.completed} lines completed (billed), "
        f"but named no output file in {looks} looks; its lines are not sent again (they would be paid twice): "
        "run the same command later to collect them"
    )


def api_failing(exc: BatchAPIError) -> str:
    return (
        f"the Batch API kept failing ({exc}); the batches already made keep running at Zhipu, "
        "and the next run collects them"
    )


def file_missing(batch: Batch, exc: BatchAPIError) -> str:
    return (
        f"a result file of batch {batch.id} ({batch.status}) could not be downloaded ({exc}); run again later: "
        "if it is still missing then, its lines fail as batch_result_missing rather than being paid twice"
    )


def no_queue_room(chunk: Chunk, exc: BatchAPIError) -> str:
    """Why a run stops when the model's queue has no room for a chunk and no batch of the job can make any."""
    return (
        f"the Batch API's queue for {chunk.model} has no room for {chunk.id} ({chunk.lines:,} requests: {exc}), "
        "and no batch of this job is running to make room, so waiting could last forever: if other batches of "
        "the account fill the queue, run again when they finish; if not, the account's queue cap for the model "
        f"is below {chunk.lines:,} requests: lower run.batch.max_requests"
    )


def refused_request(batch: Batch) -> bool:
    """Did the batch fail validation for the request itself (a model not taken, a bad field), which
    sending its lines again would not mend? Transient codes, and a failure with no code, are not."""
    coded = [error for error in batch.errors if error.code]
    if not coded:
        return False
    faults = (classify_api_error(BatchStatusError(400, e.code, e.message or "")) for e in coded)
    return all(fault.verdict is not Verdict.RETRY for fault in faults)


def validation_failure(batch: Batch, shown: int = 3) -> str:
    """Zhipu's first few validation errors of a failed batch, on one line, and what happens now."""
    parts = []
    for error in batch.errors[:shown]:
        where = f"line {error.line}" if error.line is not None else "the file"
        param = f" ({error.param})" if error.param else ""
        parts.append(f"{where}: {error.code}{param}: {error.message or 'no message'}")
    more = f" and {len(batch.errors) - shown} more" if len(batch.errors) > shown else ""
    return (
        f"the Batch API refused batch {batch.id} at validation: {'; '.join(parts)}{more}; its lines are not "
        "sent again: fix what the errors name (the model, or the field in the spec) and run again"
    )


async def cancel_within(api: BatchAPI, batch_id: str, bound_s: float) -> str | None:
    """Cancel a batch within `bound_s`; None, or why it could not be (one that finished meanwhile
    cannot be cancelled, which is fine)."""
    try:
        async with asyncio.timeout(bound_s):
            await api.cancel(batch_id)
    except BatchAPIError as exc:
        return str(exc)
    except TimeoutError:
        return f"no answer within {bound_s:.0f} s"
    return None


def lost_message(chunk: Chunk, billed: int) -> str:
    return (
        f"batch {chunk.batch_id} is no longer known to the Batch API (404); it had completed {billed} "
        "lines (billed) at the last look, so its lines were not sent again: --retry-failed sends them"
    )


def not_back_message(chunk: Chunk, status: str, refused: str | None) -> str:
    why = f" (the cancel failed: {refused})" if refused else ""
    return (
        f"batch {chunk.batch_id} was still {status} at the deadline{why}; its lines may be billed, so they were "
        "not sent online: the next run collects them"
    )
