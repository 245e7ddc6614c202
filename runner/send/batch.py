"""The batch executor: requests sent through Zhipu's Batch API (half price, no concurrency limit).

    executor = BatchExecutor(api=lambda: BatchAPI(native_url, key), directory=state_dir / "batches", ...)
    await executor.run(requests, deliver, control)

A round writes the pending requests into JSONL chunks (one model per file, within the line and byte
limits), uploads them, creates one batch per chunk, polls with backoff, and harvests each finished
batch: every line becomes the same provider-neutral Answer an online call gives (runner.send.native),
checked and repaired by the same Conversation. Lines that failed for a transient reason, lines an
expired or cancelled batch never ran, and repairs go to the next round; a 400-class line fails its
row; completed lines of an expired batch are kept (they were paid).

`hybrid` (an `online` executor and a deadline): what is not back when the deadline nears is cancelled
there and sent online, and so are retries and repairs when another batch round would not finish in time.

Every step is written ahead in the batch book (runner.send.batch_book), so a run killed at any moment
is resumed by reattaching to its batches, never by submitting the same requests again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from runner.errors import EndpointAborted
from runner.job.spec import BatchSpec
from runner.job.structured import AnswerShape, Unusable
from runner.records import Answer, Request, Result
from runner.send.base import Control, Conversation, Deliver, Executor, failure
from runner.send.batch_api import (
    Batch,
    BatchAbort,
    BatchAPI,
    BatchAPIError,
    BatchNotFound,
    BatchStatusError,
    classify_api_error,
)
from runner.send.batch_book import BatchBook, Chunk, read_requests
from runner.send.batch_files import BatchFileWriter
from runner.send.native import (
    BadResultLine,
    ResultLine,
    answer_from_chat,
    chat_body,
    classify_failure,
    parse_result_line,
)
from runner.send.retries import Fault, Verdict

API = "batch"
# Looks at a finished batch whose counts say lines completed but which names no output file yet
# (instructor#1745) before the run stops, leaving it for the next run: never re-send billed lines.
FILE_WAIT_LOOKS = 20


class BatchExecutor:
    """Sends requests through the Batch API in rounds; finishes stragglers online when given a deadline."""

    def __init__(
        self,
        *,
        job: str,
        api: Callable[[], BatchAPI],
        directory: Path,
        spec: BatchSpec,
        shape: AnswerShape | None = None,
        online: Executor | None = None,
        deadline: float | None = None,  # on `clock`: when the job must be done (hybrid)
        deadline_after_s: float | None = None,  # or: this long after the run's start (Control.started)
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._job = job
        self._api = api
        self._dir = directory
        self._spec = spec
        self._shape = shape
        self._online = online
        self._deadline = deadline
        self._deadline_after_s = deadline_after_s
        self._clock = clock
        self._sleep = sleep
        self._started = clock()
        self._conversations: dict[str, Conversation] = {}  # requests with a turn answered in a batch
        self._attempts: dict[str, int] = {}
        self._statuses: dict[str, str] = {}  # chunk -> the Batch API's status at the last look
        self._lines_open = 0
        self._round_s: float | None = None  # how long a batch round took here: is there time for another?
        self._maybe_created: set[str] = set()
        self._carry: dict[str, tuple[int, int, int]] = {}  # key -> tokens of billed turns no row holds yet
        self._cancel_failed: dict[str, str | None] = {}  # chunk -> why its cancel failed (hybrid deadline)
        self._submitting: Chunk | None = None  # the chunk being submitted (named if that fails)
        self._queue_refused = 0  # creates the model's full queue refused (429)
        self._queue_waited_s = 0.0  # time chunks waited for room in it
        self._queue_since: float | None = None

    def gauges(self) -> dict[str, Any]:
        """Lines in open batches, and how many batches are in each status."""
        statuses: dict[str, int] = {}
        for status in self._statuses.values():
            statuses[status] = statuses.get(status, 0) + 1
        online = self._online.gauges() if self._online is not None else {}
        return {
            "in_flight": self._lines_open + (online.get("in_flight") or 0),
            "limit": online.get("limit"),
            "adaptive": online.get("adaptive", False),
            "overload_429_rate": online.get("overload_429_rate", 0.0),
            "batches": statuses,
            "batch_queue": {"refused": self._queue_refused, "waited_s": round(self._queue_waited_s, 3)},
        }

    async def aclose(self) -> None:
        """Close the online executor's connections, if there is one."""
        if self._online is not None:
            await self._online.aclose()

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Reattach to the job's open batches, submit what is new, and harvest until done or stopped."""
        if self._deadline_after_s is not None:  # the run began before this executor was made
            self._started = control.started
            self._deadline = control.started + self._deadline_after_s
        online_deliver = self._carrying(deliver, None)
        deliver = self._carrying(deliver, API)
        book = BatchBook(self._dir)
        async with self._api() as api:
            chunks = book.open_chunks()
            # Chunks an earlier run uploaded and may have died creating: only these are looked up.
            self._maybe_created = {chunk.id for chunk in chunks if chunk.status == "uploaded"}
            waiting = {key for chunk in chunks for key in chunk.request_keys()}  # answered by a batch already made
            chunks += await self._write_round(book, _skipping(requests, waiting), control)
            leftovers: list[Request] = []
            for round_no in range(self._spec.max_rounds):
                if not chunks or control.stopping.is_set():
                    return
                began = self._clock()
                leftovers = await self._submit_and_watch(api, book, chunks, deliver, control)
                self._round_s = max(self._round_s or 0.0, self._clock() - began)
                if not leftovers or control.stopping.is_set():
                    return
                if self._online is not None and not self._time_for_another_round():
                    await self._finish_online(leftovers, online_deliver, control)
                    return
                if round_no + 1 == self._spec.max_rounds:
                    break
                chunks = await self._write_round(book, _aiter(leftovers), control)
        for request in leftovers:  # out of rounds: retryable, so the next run sends them again
            fault = Fault(Verdict.RETRY, "batch_unanswered", f"no answer after {self._spec.max_rounds} batch rounds")
            deliver(failure(request, fault, self._attempts.get(request.key, 0)))

    def _carrying(self, deliver: Deliver, api: str | None) -> Deliver:
        """`deliver`, adding to each row the tokens of its billed turns that were not kept (a cut
        `network_error` answer sent again, a blocked one), and naming `api` on a row that has none."""

        def out(result: Result) -> None:
            carried = self._carry.pop(result.key, None)
            if carried is not None:
                result = dataclasses.replace(
                    result,
                    input_tokens=(result.input_tokens or 0) + carried[0],
                    output_tokens=(result.output_tokens or 0) + carried[1],
                    thinking_tokens=(result.thinking_tokens or 0) + carried[2],
                )
            if api is not None and result.api is None:
                result = dataclasses.replace(result, api=api)
            deliver(result)

        return out

    def _carry_turn(self, key: str, answer: Answer) -> None:
        """Keep a billed answer's tokens for its row (the answer itself is not kept)."""
        before = self._carry.get(key, (0, 0, 0))
        tokens = (answer.input_tokens + (answer.cache_read_input_tokens or 0), answer.output_tokens)
        self._carry[key] = (before[0] + tokens[0], before[1] + tokens[1], before[2] + answer.thinking_tokens)

    # ---- writing and submitting ------------------------------------------------------------------

    async def _write_round(self, book: BatchBook, requests: AsyncIterator[Request], control: Control) -> list[Chunk]:
        """Write the requests into this round's chunk files (and their bodies, by key); record each chunk."""
        round_no = book.next_round()
        folder = self._dir / f"round-{round_no:04d}"
        writer = BatchFileWriter(
            folder, max_requests=self._spec.max_requests, max_bytes=self._spec.max_bytes, prefix="chunk"
        )
        bodies = folder / "requests.jsonl"
        # Local, buffered writes between awaits: blocking them briefly is cheaper than a thread hop per line.
        with writer, open(bodies, "w", encoding="utf-8") as keep:  # noqa: ASYNC230
            async for request in requests:
                if control.stopping.is_set():
                    break
                writer.add(request.key, chat_body(request.params))
                keep.write(json.dumps({"key": request.key, "params": request.params}, ensure_ascii=False) + "\n")
        chunks = []
        for index, file in enumerate(writer.files):
            chunk_id = f"{folder.name}-{index:04d}"
            chunks.append(
                book.record(
                    chunk_id,
                    path=str(file.path),
                    requests=str(bodies),
                    model=file.model,
                    lines=file.lines,
                    round=round_no,
                    status="written",
                )
            )
        return chunks

    async def _submit(self, api: BatchAPI, book: BatchBook, chunk: Chunk) -> Chunk:
        """Upload and create what the chunk still lacks; a batch made before (metadata) is found, not remade."""
        chunk = book.chunks[chunk.id]  # as far as it got (an earlier try may have uploaded it)
        if chunk.status == "written":
            uploaded = await api.upload(chunk.path)
            at = _ms(uploaded.created_at) if uploaded.created_at else int((time.time() - _CLOCK_SLACK_S) * 1000)
            chunk = book.record(chunk.id, status="uploaded", file_id=uploaded.id, uploaded_at=at)
        if chunk.status == "uploaded":
            assert chunk.file_id is not None
            made = await self._made_before(api, chunk) if chunk.id in self._maybe_created else None
            if made is None:
                metadata = {"glm_batch_job": self._job, "glm_batch_chunk": chunk.id}
                made = await api.create(chunk.file_id, metadata=metadata)
            chunk = book.record(chunk.id, status="created", batch_id=made.id, batch_status=made.status)
        return chunk

    def _refused(self, chunk: Chunk, exc: BatchStatusError) -> str:
        """Why the Batch API would not take a chunk's file (on any run: so the run stops), and what to change."""
        limits = f"run.batch.max_requests ({self._spec.max_requests}) or run.batch.max_bytes ({self._spec.max_bytes})"
        return f"the Batch API refused the file of {chunk.id} ({chunk.lines} requests) with {exc}; if your " + (
            f"account's limits are lower than {limits}, lower them to match"
        )

    async def _made_before(self, api: BatchAPI, chunk: Chunk) -> Batch | None:
        """A batch this job already made for the chunk (a run died between creating it and recording it):
        tagged with this job's state folder and the chunk, and made from the chunk's own input file.
        The list is newest first: paging stops at the first batch older than the chunk's upload."""
        async for batch in api.iter_batches():
            if chunk.uploaded_at is not None and batch.created_at and _ms(batch.created_at) < chunk.uploaded_at:
                return None
            tagged = (
                batch.metadata.get("glm_batch_chunk") == chunk.id and batch.metadata.get("glm_batch_job") == self._job
            )
            if tagged and batch.input_file_id == chunk.file_id:
                return batch
        return None

    # ---- watching and harvesting -----------------------------------------------------------------

    async def _submit_and_watch(
        self, api: BatchAPI, book: BatchBook, chunks: list[Chunk], deliver: Deliver, control: Control
    ) -> list[Request]:
        """Submit the chunks, poll them until each is done, harvest each; the requests to send again.

        A chunk the model's queue has no room for (429 at create) waits, and is submitted while the
        batches already made are polled and drain. A batch the API no longer knows (404) is lost: its
        lines are sent again only if nothing says they were billed. A Batch API that keeps failing
        stops the run (exit 3; the batches run on and the next run reattaches). On a stop (a signal)
        it returns within the second: the batches run on, and the next run reattaches."""
        pending: dict[str, Chunk] = {}
        waiting = list(chunks)  # not submitted yet
        self._lines_open = sum(c.lines for c in chunks)
        leftovers: list[Request] = []
        interval = self._spec.poll_initial_s
        cancelled = False
        file_waits: dict[str, int] = {}  # chunk -> looks at a finished batch that names no output file yet
        first = True
        while pending or waiting:
            if control.stopping.is_set():
                return []
            # Submitted after the looks (which harvest, and delete result files): never more files at once
            # than the queue holds, plus one.
            if first and waiting and not await self._submitted(api, book, waiting, pending, control):
                return []
            first = False
            if self._online is not None and not cancelled and self._deadline_near():
                cancelled = True  # what is not back is cancelled there and sent online after the harvest
                for chunk in pending.values():
                    assert chunk.batch_id is not None
                    self._cancel_failed[chunk.id] = await _cancel(api, chunk.batch_id, self._cancel_bound())
                for chunk in waiting:  # never submitted: straight online
                    self._statuses.pop(chunk.id, None)
                    self._lines_open -= chunk.lines
                    book.record(chunk.id, status="abandoned")
                    leftovers += _requests_of(chunk)
                waiting = []
            for chunk in list(pending.values()):
                assert chunk.batch_id is not None
                try:
                    batch = await api.retrieve(chunk.batch_id)
                except BatchNotFound:
                    leftovers += self._lost(book, chunk, deliver)
                except BatchAPIError as exc:
                    control.fail(EndpointAborted(_api_failing(exc)))
                    return []
                else:
                    pending[chunk.id] = chunk = self._look(book, chunk, batch)
                    if not batch.done:
                        continue
                    if _awaiting_output(batch):
                        file_waits[chunk.id] = file_waits.get(chunk.id, 0) + 1
                        if file_waits[chunk.id] >= FILE_WAIT_LOOKS:
                            control.fail(EndpointAborted(_no_output_file(batch, file_waits[chunk.id])))
                            return []
                        continue
                    if batch.status == "failed" and _refused_request(batch):
                        book.record(chunk.id, status="harvested", batch_status=batch.status)
                        control.fail(EndpointAborted(_validation_failure(batch)))
                        return []
                    try:
                        leftovers += await self._harvest(api, book, chunk, batch, deliver, control)
                    except BatchNotFound as exc:  # a result file still 404 after the waits
                        book.record(chunk.id, file_404=True)
                        control.fail(EndpointAborted(_file_missing(batch, exc)))
                        return []
                    except BatchAPIError as exc:
                        control.fail(EndpointAborted(_api_failing(exc)))
                        return []
                del pending[chunk.id]
                self._lines_open -= chunk.lines
            if waiting and not cancelled and not await self._submitted(api, book, waiting, pending, control):
                return []
            if cancelled and pending and self._clock() >= self._give_up_at():
                for chunk in pending.values():  # still not stopped: its lines may be billed, so not online
                    self._not_back(chunk, deliver)
                return leftovers
            if pending or waiting:
                await self._pause(self._next_look(interval, cancelled), control)
                interval = min(interval * 2, self._spec.poll_max_s)
        return leftovers

    def _next_look(self, interval: float, cancelled: bool) -> float:
        """How long to wait before the next look: the poll interval, but never past the moment to
        cancel for the deadline (hybrid), and at most a second once cancelled."""
        if self._deadline is None:
            return interval
        if cancelled:
            return max(0.0, min(interval, 1.0, self._give_up_at() - self._clock()))
        return max(0.0, min(interval, self._deadline - self._margin() - self._clock()))

    def _give_up_at(self) -> float:
        """When a hybrid run stops waiting for cancelled batches to stop: half the margin before the
        deadline, leaving the other half for the online tail."""
        assert self._deadline is not None
        return self._deadline - self._margin() / 2

    def _cancel_bound(self) -> float:
        """How long a cancel may take (its retries included) before the run goes on without it."""
        return max(1.0, self._margin() / 4)

    def _not_back(self, chunk: Chunk, deliver: Deliver) -> None:
        """A cancelled batch that had not stopped when the deadline came: its lines may have been billed,
        so they are not sent online; they fail retryably, and the next run collects the batch."""
        status = self._statuses.get(chunk.id, chunk.batch_status or "unknown")
        refused = self._cancel_failed.get(chunk.id)
        why = f" (the cancel failed: {refused})" if refused else ""
        fault = Fault(
            Verdict.RETRY,
            "batch_not_back",
            f"batch {chunk.batch_id} was still {status} at the deadline{why}; its lines may be billed, so they were "
            "not sent online: the next run collects them",
        )
        for key in chunk.request_keys():
            deliver(failure(Request(key, {}), fault, self._attempts.get(key, 0) + 1, model=chunk.model))
        self._lines_open -= chunk.lines

    async def _submitted(
        self, api: BatchAPI, book: BatchBook, waiting: list[Chunk], pending: dict[str, Chunk], control: Control
    ) -> bool:
        """Submit what the queue has room for (`waiting` keeps the rest, in place); False if the run stops."""
        try:
            waiting[:] = await self._submit_all(api, book, waiting, pending)
        except BatchAPIError as exc:  # what retrying could not mend: the account, the file, the API
            await self._stop_for(api, book, control, exc, self._submitting or waiting[0])
            return False
        return True

    async def _submit_all(
        self, api: BatchAPI, book: BatchBook, waiting: list[Chunk], pending: dict[str, Chunk]
    ) -> list[Chunk]:
        """Submit the waiting chunks in order, into `pending`; the ones the model's queue has no room
        for yet (429 at create), or the account no room for their file while ours are open (a refused
        upload), are returned, to be tried again after the next look at the others."""
        for index, chunk in enumerate(waiting):
            self._submitting = chunk
            try:
                chunk = await self._submit(api, book, chunk)
            except BatchStatusError as exc:
                # An upload refused while batches of ours are open may be the account's file cap (its code
                # is not documented): their result files are deleted as they are harvested; wait for that.
                full = exc.status == 429 or (pending and book.chunks[chunk.id].status == "written")
                if not full or isinstance(exc, BatchAbort):
                    raise
                self._queue_refused += 1
                if self._queue_since is None:
                    self._queue_since = self._clock()
                for held in waiting[index:]:
                    self._statuses[held.id] = "waiting for queue room"
                return waiting[index:]
            pending[chunk.id] = chunk
            self._statuses[chunk.id] = chunk.batch_status or "created"
        if self._queue_since is not None:
            self._queue_waited_s += self._clock() - self._queue_since
            self._queue_since = None
        return []

    async def _stop_for(
        self, api: BatchAPI, book: BatchBook, control: Control, exc: BatchAPIError, chunk: Chunk
    ) -> None:
        """End the run for a Batch API error at upload or create that retrying did not mend. An input file
        a create refused is deleted (an account holds at most 1,000 files); the next run uploads anew."""
        chunk = book.chunks[chunk.id]
        if chunk.status == "uploaded" and chunk.file_id and isinstance(exc, BatchStatusError):
            with contextlib.suppress(BatchAPIError):
                await api.delete_file(chunk.file_id)
            book.record(chunk.id, status="written", file_id=None, uploaded_at=None)
        fault = classify_api_error(exc)
        if fault.verdict is Verdict.ABORT:
            control.abort(fault)
        elif fault.verdict is Verdict.RETRY:
            control.fail(EndpointAborted(_api_failing(exc)))
        else:
            assert isinstance(exc, BatchStatusError)
            control.fail(EndpointAborted(self._refused(chunk, exc)))

    def _look(self, book: BatchBook, chunk: Chunk, batch: Batch) -> Chunk:
        """Note what a look at a batch saw; the book keeps each new status and count (what `status`
        shows, and what a lost batch is judged by)."""
        self._statuses[chunk.id] = batch.status
        counts = dataclasses.asdict(batch.request_counts)
        if batch.status != chunk.batch_status or counts != chunk.counts:
            return book.record(chunk.id, batch_status=batch.status, counts=counts)
        return chunk

    def _lost(self, book: BatchBook, chunk: Chunk, deliver: Deliver) -> list[Request]:
        """A batch the Batch API no longer knows (404): marked lost. Its lines are sent again when
        nothing says any was billed (no completed line at the last look); otherwise they fail (not
        paid twice; --retry-failed sends them)."""
        billed = chunk.counts.get("completed") or 0
        book.record(chunk.id, status="lost", batch_status="unknown to the Batch API (404)")
        self._statuses.pop(chunk.id, None)
        if not billed:
            return _requests_of(chunk)
        message = (
            f"batch {chunk.batch_id} is no longer known to the Batch API (404); it had completed {billed} "
            "lines (billed) at the last look, so its lines were not sent again: --retry-failed sends them"
        )
        fault = Fault(Verdict.FAIL, "batch_lost", message)
        for key in chunk.request_keys():
            deliver(failure(Request(key, {}), fault, self._attempts.get(key, 0) + 1, model=chunk.model))
        return []

    async def _pause(self, seconds: float, control: Control) -> None:
        """Wait between looks, or less: a stop (a signal) ends the wait at once."""
        if control.stopping.is_set():
            return
        nap = asyncio.ensure_future(self._sleep(seconds))
        stop = asyncio.ensure_future(control.stopping.wait())
        try:
            await asyncio.wait((nap, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            nap.cancel()
            stop.cancel()

    async def _harvest(
        self, api: BatchAPI, book: BatchBook, chunk: Chunk, batch: Batch, deliver: Deliver, control: Control
    ) -> list[Request]:
        """Deliver every answered line of a finished batch; the requests to send again.

        Lines are read one at a time, and a request's body is read back from disk only for the few
        lines that need it (a retry, a repair, a line the batch never ran): memory stays flat in the
        size of the batch. The loop yields now and then, so checkpoints and signals are not held up.

        A line is sent again only when the batch's files prove it was not billed: when the result
        files hold fewer answers than `request_counts.completed` says (a truncated or damaged file),
        they are downloaded again; lines still missing then may have been billed, and fail their rows
        as `batch_result_missing` rather than being paid for twice."""
        wanted = set(chunk.request_keys())
        seen: set[str] = set()
        later: list[_Later] = []  # lines that need their request's body
        answered = 0  # lines read as answers (billed)
        for download in (1, 2):
            for count, line in enumerate(await self._result_lines(api, chunk, batch)):
                key = line.custom_id
                if key is None or key not in wanted or key in seen or line.problem is not None:
                    continue  # a line we did not send, one we already took, or one we cannot read
                self._attempts[key] = self._attempts.get(key, 0) + 1
                taken = self._take_at_once(key, chunk.model, line, deliver, control)
                if taken is _UNREADABLE:  # an answer we cannot read: another download may give it whole
                    self._attempts[key] -= 1
                    continue
                seen.add(key)
                answered += line.ok
                if isinstance(taken, _Later):
                    later.append(taken)
                if count % 1000 == 999:
                    await asyncio.sleep(0)
            if download == 2 or not _short(batch, answered, wanted - seen):
                break
        unrun = wanted - seen  # lines the batch never ran (expired, cancelled, failed validation)
        if _short(batch, answered, unrun):  # some of them may have been billed
            fault = Fault(Verdict.FAIL, "batch_result_missing", _missing(batch, answered))
            for key in sorted(unrun):
                deliver(failure(Request(key, {}), fault, self._attempts.get(key, 0) + 1, model=chunk.model))
            unrun = set()
        bodies = read_requests(chunk.requests, {pending.key for pending in later} | unrun)
        leftovers = [Request(key, bodies[key]) for key in unrun]
        for pending in later:
            again = self._take(Request(pending.key, bodies[pending.key]), pending.answer, deliver)
            if again is not None:
                leftovers.append(again)
        counts = dataclasses.asdict(batch.request_counts)
        files = {"output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
        if control.checkpoint is not None:  # the answers are journalled before the book says harvested
            control.checkpoint()
            if control.failed is not None:  # not journalled (a full disk): the next run harvests it again
                return []
        chunk = book.record(chunk.id, status="harvested", batch_status=batch.status, counts=counts, **files)
        if not self._spec.keep_files and control.checkpoint is not None:
            await purge(api, book, chunk)  # no paid answer is left only at Zhipu
        return leftovers

    def _take_at_once(
        self, key: str, model: str, line: ResultLine, deliver: Deliver, control: Control
    ) -> _Later | object | None:
        """Take one result line as far as it can go without its request's body.

        A valid answer to a first ask is delivered, a failure for good fails its row, an abort stops
        the run: None. Otherwise what `_take` (the other half, given the body) needs: the line's
        answer to continue the conversation with (a repair round's answer, or one to repair), or no
        answer when the request is to be sent again as it was (a transient failure). _UNREADABLE for
        an answer whose body cannot be read: it was billed, so it is not sent again on that account."""
        if not line.ok:
            fault = _line_fault(line)
            if fault.verdict is Verdict.RETRY:
                return _Later(key, None)
            if fault.verdict is Verdict.ABORT:
                control.abort(fault)
            else:
                deliver(failure(Request(key, {}), fault, self._attempts[key], model=model))
            return None
        try:
            answer = answer_from_chat(line.body, line.request_id)
        except BadResultLine:
            return _UNREADABLE
        if answer.stop_reason == "network_error":  # the inference broke off: a cut answer, billed; ask again
            self._carry_turn(key, answer)
            return _Later(key, None)
        if answer.stop_reason == "refusal":  # `sensitive`: Zhipu's content filter blocked the answer
            self._carry_turn(key, answer)
            self._conversations.pop(key, None)
            deliver(failure(Request(key, {}), _BLOCKED, self._attempts[key], model=model))
            return None
        if key in self._conversations:
            return _Later(key, answer)  # a repair round's answer: its conversation holds the earlier turns
        if self._shape is not None:
            try:
                self._shape.check(answer)
            except Unusable:
                return _Later(key, answer)  # to be repaired: the next turn needs the conversation so far
        conversation = Conversation(Request(key, {}), self._shape)
        conversation.add(answer)
        deliver(conversation.result(attempts=self._attempts[key], latency_ms=None, api=API))
        return None

    def _take(self, request: Request, answer: Answer | None, deliver: Deliver) -> Request | None:
        """The half of taking a line that needs the request's body: add the line's answer to the
        request's conversation and deliver its Result, or return the request to send again (no
        answer: a retry; an answer that needs repair: the repair turn)."""
        if answer is None:
            return request
        key = request.key
        conversation = self._conversations.setdefault(key, Conversation(request, self._shape))
        repair = conversation.add(answer)
        if repair is not None:
            return Request(key, repair)
        del self._conversations[key]
        deliver(conversation.result(attempts=self._attempts[key], latency_ms=None, api=API))
        return None

    async def _result_lines(self, api: BatchAPI, chunk: Chunk, batch: Batch) -> Iterator[ResultLine]:
        """The batch's output and error lines, downloaded (streamed to disk), then read one at a time.
        A file that answered 404 past the waits on an earlier run too is taken as gone (its lines are
        then missing, and judged by the batch's counts)."""
        files = []
        for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
            if file_id:
                dest = self._dir / f"{chunk.id}.{kind}.jsonl"
                try:
                    await api.download(file_id, dest)
                except BatchNotFound:
                    if not chunk.file_404:
                        raise
                    continue
                files.append(dest)
        return _read_lines(files)

    # ---- hybrid ----------------------------------------------------------------------------------

    def _margin(self) -> float:
        """How long before the deadline to give up on the Batch API and finish online."""
        if self._spec.online_margin_s is not None:
            return self._spec.online_margin_s
        assert self._deadline is not None
        return max(1.0, 0.1 * (self._deadline - self._started))

    def _deadline_near(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline - self._margin()

    def _time_for_another_round(self) -> bool:
        """Would one more batch round (as long as the longest so far) end before the online margin?"""
        if self._deadline is None:
            return True
        return self._clock() + (self._round_s or 0.0) < self._deadline - self._margin()

    async def _finish_online(self, requests: list[Request], deliver: Deliver, control: Control) -> None:
        """Send the leftovers online; a repair keeps the tokens its batch turns used."""
        assert self._online is not None

        def merged(result: Result) -> None:
            before = self._conversations.pop(result.key, None)
            if before is not None and result.status != "error":
                earlier = before.result(attempts=0, latency_ms=None)
                result = dataclasses.replace(
                    result,
                    input_tokens=(result.input_tokens or 0) + (earlier.input_tokens or 0),
                    output_tokens=(result.output_tokens or 0) + (earlier.output_tokens or 0),
                    thinking_tokens=(result.thinking_tokens or 0) + (earlier.thinking_tokens or 0),
                    repairs=result.repairs + earlier.repairs + 1,
                )
            deliver(result)

        await self._online.run(_aiter(requests), merged, control)


@dataclasses.dataclass(frozen=True, slots=True)
class _Later:
    """A line taken as far as it goes without its request's body; `_take` finishes it."""

    key: str
    answer: Answer | None  # None: send the request again as it was


_CLOCK_SLACK_S = 600.0  # how far our clock may run ahead of the API's, when the upload gave no time


def _ms(stamp: int) -> int:
    """A Batch API timestamp in epoch milliseconds (real objects use milliseconds; the docs say seconds)."""
    return stamp * 1000 if stamp < 100_000_000_000 else stamp


_BLOCKED = Fault(
    Verdict.FAIL,
    "content_filter",
    "Zhipu's content filter blocked the answer (finish_reason sensitive); it was billed",
)
_UNREADABLE = object()  # a result line answered (billed) whose body cannot be read


def _awaiting_output(batch: Batch) -> bool:
    """A finished batch whose counts say lines completed (billed) but which names no output file yet:
    real batches can say `completed` before the file id appears (instructor#1745). Look again."""
    return batch.status != "failed" and batch.output_file_id is None and batch.request_counts.completed > 0


def _no_output_file(batch: Batch, looks: int) -> str:
    return (
        f"batch {batch.id} is {batch.status} and says {batch.request_counts.completed} lines completed (billed), "
        f"but named no output file in {looks} looks; its lines are not sent again (they would be paid twice): "
        "run the same command later to collect them"
    )


async def purge(api: BatchAPI, book: BatchBook, chunk: Chunk) -> int:
    """Delete a chunk's files at Zhipu (its input, and its result files once harvested); how many went.
    A file already gone (auto-deleted input) is fine; any other failure leaves it for a later purge."""
    deleted = 0
    ids = [chunk.file_id] + ([chunk.output_file_id, chunk.error_file_id] if chunk.status == "harvested" else [])
    complete = True
    for file_id in filter(None, ids):
        try:
            deleted += await api.delete_file(file_id)
        except BatchNotFound:
            continue
        except BatchAPIError:
            complete = False
    if complete and chunk.status == "harvested":
        book.record(chunk.id, purged=True)
    return deleted


def _requests_of(chunk: Chunk) -> list[Request]:
    """Every request of a chunk, with its body, to be sent again."""
    keys = list(chunk.request_keys())
    bodies = read_requests(chunk.requests, set(keys))
    return [Request(key, bodies[key]) for key in keys]


def _api_failing(exc: BatchAPIError) -> str:
    return (
        f"the Batch API kept failing ({exc}); the batches already made keep running at Zhipu, "
        "and the next run collects them"
    )


def _file_missing(batch: Batch, exc: BatchAPIError) -> str:
    return (
        f"a result file of batch {batch.id} ({batch.status}) could not be downloaded ({exc}); run again later: "
        "if it is still missing then, its lines fail as batch_result_missing rather than being paid twice"
    )


def _refused_request(batch: Batch) -> bool:
    """Did the batch fail validation for the request itself (a model not taken, a bad field), which
    sending its lines again would not mend? Transient codes, and a failure with no code, are not."""
    coded = [error for error in batch.errors if error.code]
    if not coded:
        return False
    faults = (classify_api_error(BatchStatusError(400, e.code, e.message or "")) for e in coded)
    return all(fault.verdict is not Verdict.RETRY for fault in faults)


def _validation_failure(batch: Batch, shown: int = 3) -> str:
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


def _short(batch: Batch, answered: int, missing: set[str]) -> bool:
    """Lines are missing from the result files and the batch's counts cannot prove them unbilled: the
    counts say more completed than the files answered, or there are no counts to go by."""
    if not missing or batch.status == "failed":  # failed validation: no line ran
        return False
    counts = batch.request_counts
    if counts.total == 0:  # no counts: only a batch that never started proves its lines unrun
        return batch.in_progress_at is not None or batch.output_file_id is not None
    return counts.completed > answered


def _missing(batch: Batch, answered: int) -> str:
    counts = batch.request_counts
    said = f"says {counts.completed} lines completed" if counts.total else "gave no request counts"
    return (
        f"batch {batch.id} ({batch.status}) {said} but its result files answered {answered}, twice downloaded; "
        "this line may have been billed, so it was not sent again: --retry-failed sends it (paying again)"
    )


def _line_fault(line: ResultLine) -> Fault:
    """What a failed result line means for its request, as the Fault a failed row records."""
    name = f"batch/{line.error_code or line.status_code}"
    return Fault(classify_failure(line), name, line.error_message or line.problem or "")


async def _cancel(api: BatchAPI, batch_id: str, bound_s: float) -> str | None:
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


def _read_lines(paths: list[Path]) -> Iterator[ResultLine]:
    """Downloaded result files' lines, read one at a time."""
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield parse_result_line(raw)


async def _skipping(requests: AsyncIterator[Request], skip: set[str]) -> AsyncIterator[Request]:
    async for request in requests:
        if request.key not in skip:
            yield request


async def _aiter(items: Iterable[Request]) -> AsyncIterator[Request]:
    for item in items:
        yield item
