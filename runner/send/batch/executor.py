"""The batch executor: requests sent through Zhipu's Batch API (half price, no concurrency limit).

    executor = BatchExecutor(api=lambda: BatchAPI(native_url, key), directory=state_dir / "batches", ...)
    await executor.run(requests, deliver, control)

Rounds of chunks, uploaded, polled and harvested; `hybrid` sends online what a deadline would miss.
Every step is written ahead in the batch book (runner.send.batch.book).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

from runner.control import Control
from runner.errors import EndpointAborted
from runner.job.spec import BatchSpec
from runner.job.structured import AnswerShape
from runner.records import Request
from runner.send.base import Deliver, Executor, Gauges, failure
from runner.send.batch.api import BatchAPI
from runner.send.batch.book import BatchBook, Chunk
from runner.send.batch.deadline import HybridDeadline
from runner.send.batch.duplicates import Twins, batches_since, belongs, tag, watched
from runner.send.batch.errors import BatchAbort, BatchAPIError, BatchNotFound, BatchStatusError, classify_api_error
from runner.send.batch.files import write_round
from runner.send.batch.harvest import API, Harvester, requests_of
from runner.send.batch.rules import (
    CLOCK_SLACK_S,
    api_failing,
    awaiting_output,
    cancel_within,
    epoch_ms,
    file_missing,
    lost_message,
    no_output_file,
    no_queue_room,
    not_back_message,
    refused_request,
    validation_failure,
)
from runner.send.batch.shapes import Batch
from runner.send.batch.turns import restore_turns, save_turns
from runner.send.retries import Fault, Verdict, refusal
from runner.state.rescue import state_failure

# Looks at a finished batch whose counts say lines completed but which names no output file yet
# (instructor#1745) before the run stops, leaving it for the next run: never re-send billed lines.
FILE_WAIT_LOOKS = 20
# Creates in a row the model's queue refuses for room while no batch of the job runs (so nothing of ours
# will make room) before the run stops and says why, rather than wait for ever.
NO_ROOM_LOOKS = 3


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
        self._deadline_after_s = deadline_after_s
        self._hybrid = HybridDeadline(deadline, clock(), spec.online_margin_s, clock)
        self._harvester = Harvester(directory, shape, keep_files=spec.keep_files)
        self._clock = clock
        self._sleep = sleep
        self._statuses: dict[str, str] = {}  # chunk -> the Batch API's status at the last look
        self._lines_open = 0
        self._counts: dict[str, tuple[int, int]] = {}  # open chunk -> its batch's (completed, failed) lines
        self._round_s: float | None = None  # how long a batch round took here: is there time for another?
        self._maybe_created: set[str] = set()
        self._twins = Twins(job)  # no chunk keeps two batches (a create that landed after its answer was lost)
        self._cancel_failed: dict[str, str | None] = {}  # chunk -> why its cancel failed (hybrid deadline)
        self._submitting: Chunk | None = None  # the chunk being submitted (named if that fails)
        self._queue_refused = 0  # creates the model's full queue refused (429)
        self._queue_waited_s = 0.0  # time chunks waited for room in it
        self._queue_since: float | None = None
        self._no_room_looks = 0  # creates in a row refused for queue room while none of the job's batches ran

    def gauges(self) -> Gauges:
        """Lines in open batches, and how many batches are in each status."""
        statuses: dict[str, int] = {}
        for status in self._statuses.values():
            statuses[status] = statuses.get(status, 0) + 1
        online = self._online.gauges() if self._online is not None else Gauges()
        return Gauges(
            in_flight=self._lines_open + (online.in_flight or 0),
            limit=online.limit,
            adaptive=bool(online.adaptive),
            overload_429_rate=online.overload_429_rate or 0.0,
            batches=statuses,
            batch_lines=self._lines_gauge(),
            batch_queue={"refused": self._queue_refused, "waited_s": round(self._queue_waited(), 3)},
        )

    def _lines_gauge(self) -> dict[str, int]:
        """Lines in this round's open batches, and how many of them the Batch API counts as done
        (`request_counts` at the last look): progress while nothing is back yet."""
        completed, failed = sum(c for c, _ in self._counts.values()), sum(f for _, f in self._counts.values())
        return {"open": self._lines_open, "completed": completed, "failed": failed}

    def _close(self, chunk: Chunk) -> None:
        """A chunk's lines are no longer open (harvested, lost, left to the next run or sent online)."""
        self._lines_open -= chunk.lines
        self._counts.pop(chunk.id, None)

    def _queue_waited(self) -> float:
        """Seconds chunks have waited for room in the model's queue, the wait going on included."""
        ongoing = self._clock() - self._queue_since if self._queue_since is not None else 0.0
        return self._queue_waited_s + ongoing

    async def aclose(self) -> None:
        """Close the online executor's connections, if there is one."""
        if self._online is not None:
            await self._online.aclose()

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Reattach to the job's open batches, submit what is new, and harvest until done or stopped.

        A write to the job's batch folder that fails (a chunk file, a result file downloaded, the book)
        stops the run as a state failure (DiskFull, exit 5; StateUnwritable, exit 74), never a crash:
        the batches made keep running at Zhipu and the next run collects them."""
        try:
            await self._run(requests, deliver, control)
        except OSError as exc:
            failure = state_failure(exc, self._dir)
            if failure is None:
                raise
            control.fail(failure)

    async def _run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        if self._deadline_after_s is not None:  # the run began before this executor was made
            self._hybrid = HybridDeadline(
                control.started + self._deadline_after_s, control.started, self._spec.online_margin_s, self._clock
            )
        online_deliver = self._harvester.carrying(deliver, None)
        deliver = self._harvester.carrying(deliver, API)
        book = BatchBook(self._dir)
        async with self._api() as api:
            chunks = book.open_chunks()
            # Chunks an earlier run uploaded and may have died creating, or whose create failed (its input
            # deleted, to be uploaded again): only these are looked up before they are created.
            self._maybe_created = {
                c.id for c in chunks if c.status == "uploaded" or (c.status == "written" and c.unsure)
            }
            chunks = await self._resumed(api, book, chunks, control)
            restore_turns(self._harvester, chunks)  # the billed turns the open rounds continue
            waiting = {key for chunk in chunks for key in chunk.request_keys()}  # answered by a batch already made
            fresh = _skipping(requests, waiting) if waiting else requests  # no step a request when none is skipped
            chunks += await write_round(book, self._spec, fresh, control, self._too_large(online_deliver))
            leftovers: list[Request] = []
            for round_no in range(self._spec.max_rounds):
                if not chunks or control.stopping.is_set():
                    return
                began = self._clock()
                leftovers = await self._submit_and_watch(api, book, chunks, deliver, control)
                self._round_s = max(self._round_s or 0.0, self._clock() - began)
                if not leftovers or control.stopping.is_set():
                    return
                if self._online is not None and not self._hybrid.time_for_another_round(self._round_s):
                    await self._finish_online(leftovers, online_deliver, control)
                    return
                if round_no + 1 == self._spec.max_rounds:
                    break
                # Before the round's files exist: the folder write_round makes for the next round.
                save_turns(self._harvester, leftovers, book.directory / f"round-{book.next_round():04d}")
                chunks = await write_round(book, self._spec, _aiter(leftovers), control)
        for request in leftovers:  # out of rounds: retryable, so the next run sends them again
            fault = Fault(Verdict.RETRY, "batch_unanswered", f"no answer after {self._spec.max_rounds} batch rounds")
            deliver(failure(request, fault, self._harvester.attempts.get(request.key, 0)))

    # ---- writing and submitting ------------------------------------------------------------------

    @staticmethod
    def _too_large(deliver: Deliver) -> Callable[[Request, str], None]:
        """What becomes of a request no batch file can hold: its row fails, unsent, saying why."""

        def refuse(request: Request, why: str) -> None:
            deliver(failure(request, Fault(Verdict.FAIL, "batch_line_too_large", why), 0))

        return refuse

    async def _submit(self, api: BatchAPI, book: BatchBook, chunk: Chunk) -> Chunk:
        """Upload and create what the chunk still lacks; a batch made before (metadata) is found, not remade."""
        chunk = book.chunks[chunk.id]  # as far as it got (an earlier try may have uploaded it)
        maybe = chunk.id in self._maybe_created
        made = await self._made_before(api, chunk) if maybe else None
        if chunk.status == "written" and made is None:
            uploaded = await api.upload(chunk.path)
            at = epoch_ms(uploaded.created_at) if uploaded.created_at else int((time.time() - CLOCK_SLACK_S) * 1000)
            at = min(at, chunk.uploaded_at or at)  # batches made from an earlier upload of it are looked for too
            chunk = book.record(chunk.id, status="uploaded", file_id=uploaded.id, uploaded_at=at)
        if chunk.status in ("written", "uploaded"):
            if made is None:
                assert chunk.file_id is not None
                made = await api.create(chunk.file_id, metadata=tag(self._job, chunk))
            unsure = maybe or chunk.file_id in api.retried_creates
            chunk = book.created(chunk, made, unsure=unsure)
            if unsure:
                self._twins.watch(chunk.id)
        return chunk

    async def _resumed(self, api: BatchAPI, book: BatchBook, chunks: list[Chunk], control: Control) -> list[Chunk]:
        """The open chunks a run resumes, after a sweep for a second batch of each created one and of every
        chunk whose create a lost answer may still land (`watched`: open or not, so a run with nothing
        left to send looks too); the unsure open ones are watched for the rest of the run."""
        created = [chunk.id for chunk in chunks if chunk.status == "created"]
        self._twins.watched.update(chunk.id for chunk in chunks if chunk.unsure)
        looked = sorted(set(created) | set(watched(book)))
        if looked:
            await self._twins.sweep(api, book, looked, control.notify)
        return [book.chunks[chunk.id] for chunk in chunks]

    async def _swept(self, api: BatchAPI, book: BatchBook, pending: dict[str, Chunk], control: Control) -> None:
        """Sweep the chunks whose create may have been made twice; a chunk whose kept batch is not the one
        it had is watched from now on by the batch kept."""
        if self._twins.watched:
            for chunk_id in await self._twins.sweep(api, book, sorted(self._twins.watched), control.notify):
                if chunk_id in pending:
                    pending[chunk_id] = book.chunks[chunk_id]

    def _refused(self, chunk: Chunk, exc: BatchStatusError) -> str:
        """Why the Batch API would not take a chunk's file (on any run: so the run stops), and what to change.
        Which limit refused it is not documented: a refused upload may be the account's file count (Zhipu
        keeps 1,000 files an account), which fewer, larger files ease and smaller ones make worse; a
        refused create (the file was taken) is the file's size or lines against the account's limits."""
        spec = self._spec
        if chunk.status != "uploaded":  # the upload was refused
            kept = " and set run.batch.keep_files: false" if spec.keep_files else ""
            return (
                f"the Batch API refused the upload of {chunk.id} ({chunk.lines:,} requests) with {exc}; if the "
                f"account holds too many files (Zhipu keeps at most 1,000), delete finished ones (`glm-batch cancel "
                f"JOB.yaml --purge` deletes this job's{kept}) or use fewer, larger files (raise "
                f"run.batch.max_requests, now {spec.max_requests:,}, up to 50,000); if the file is over the "
                "account's limits, lower run.batch.max_requests or run.batch.max_bytes"
            )
        limits = f"run.batch.max_requests ({spec.max_requests:,}) or run.batch.max_bytes ({spec.max_bytes:,})"
        return f"the Batch API refused the file of {chunk.id} ({chunk.lines:,} requests) with {exc}; if your " + (
            f"account's limits are lower than {limits}, lower them to match"
        )

    async def _made_before(self, api: BatchAPI, chunk: Chunk) -> Batch | None:
        """A batch this job already made for the chunk (a run died between creating it and recording it,
        or a create whose answer was lost landed): `belongs` to the chunk (its tag and its content).
        Only batches made since the chunk's first upload are read (`batches_since`)."""
        async for batch in batches_since(api, chunk.uploaded_at):
            if belongs(batch, chunk, self._job):
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
            if self._online is not None and not cancelled and self._hybrid.near():
                cancelled = True  # what is not back is cancelled there and sent online after the harvest
                for chunk in pending.values():
                    assert chunk.batch_id is not None
                    self._cancel_failed[chunk.id] = await cancel_within(
                        api, chunk.batch_id, self._hybrid.cancel_bound()
                    )
                for chunk in waiting:  # never submitted: straight online
                    self._statuses.pop(chunk.id, None)
                    self._close(chunk)
                    book.record(chunk.id, status="abandoned")
                    leftovers += requests_of(chunk)
                waiting = []
            await self._swept(api, book, pending, control)
            for chunk in list(pending.values()):
                assert chunk.batch_id is not None
                try:
                    batch = await api.retrieve(chunk.batch_id)
                except BatchNotFound:
                    leftovers += self._lost(book, chunk, deliver)
                except BatchAPIError as exc:
                    control.fail(EndpointAborted(api_failing(exc)))
                    return []
                else:
                    pending[chunk.id] = chunk = self._look(book, chunk, batch)
                    if not batch.done:
                        continue
                    if awaiting_output(batch):
                        file_waits[chunk.id] = file_waits.get(chunk.id, 0) + 1
                        if file_waits[chunk.id] >= FILE_WAIT_LOOKS:
                            control.fail(EndpointAborted(no_output_file(batch, file_waits[chunk.id])))
                            return []
                        continue
                    if batch.status == "failed" and refused_request(batch):
                        book.record(chunk.id, status="harvested", batch_status=batch.status)
                        control.fail(EndpointAborted(validation_failure(batch)))
                        return []
                    try:
                        leftovers += await self._harvester.harvest(api, book, chunk, batch, deliver, control)
                    except BatchNotFound as exc:  # a result file still 404 after the waits
                        book.record(chunk.id, file_404=True)
                        control.fail(EndpointAborted(file_missing(batch, exc)))
                        return []
                    except BatchAPIError as exc:
                        control.fail(EndpointAborted(api_failing(exc)))
                        return []
                del pending[chunk.id]
                self._close(chunk)
            if waiting and not cancelled and not await self._submitted(api, book, waiting, pending, control):
                return []
            if cancelled and pending and self._clock() >= self._hybrid.give_up_at():
                for chunk in pending.values():  # still not stopped: its lines may be billed, so not online
                    self._not_back(chunk, deliver)
                return leftovers
            if pending or waiting:
                await self._pause(self._hybrid.next_look(interval, cancelled), control)
                interval = min(interval * 2, self._spec.poll_max_s)
        await self._swept(api, book, pending, control)  # a late create that landed during the last look
        return leftovers

    def _not_back(self, chunk: Chunk, deliver: Deliver) -> None:
        """A cancelled batch that had not stopped when the deadline came: its lines may have been billed,
        so they are not sent online; they fail retryably, and the next run collects the batch."""
        status = self._statuses.get(chunk.id, chunk.batch_status or "unknown")
        message = not_back_message(chunk, status, self._cancel_failed.get(chunk.id))
        self._harvester.fail_all(chunk, Fault(Verdict.RETRY, "batch_not_back", message), deliver)
        self._close(chunk)

    async def _submitted(
        self, api: BatchAPI, book: BatchBook, waiting: list[Chunk], pending: dict[str, Chunk], control: Control
    ) -> bool:
        """Submit what the queue has room for (`waiting` keeps the rest, in place); False if the run stops."""
        try:
            waiting[:] = await self._submit_all(api, book, waiting, pending)
        except _NoRoom as stuck:
            await self._stop_for(
                api, book, control, stuck.error, stuck.chunk, why=no_queue_room(stuck.chunk, stuck.error)
            )
            return False
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
                if not pending and book.chunks[chunk.id].status == "uploaded":
                    # The create found no room and no batch of this job is running to make some: another's
                    # batches fill the queue, or this chunk alone is over the account's cap. A few looks
                    # (a queue that counts a finished batch a little late), never a blind wait.
                    self._no_room_looks += 1
                    if self._no_room_looks >= NO_ROOM_LOOKS:
                        raise _NoRoom(book.chunks[chunk.id], exc) from None
                self._queue_refused += 1
                if self._queue_since is None:
                    self._queue_since = self._clock()
                for held in waiting[index:]:
                    self._statuses[held.id] = "waiting for queue room"
                return waiting[index:]
            pending[chunk.id] = chunk
            self._statuses[chunk.id] = chunk.batch_status or "created"
            self._no_room_looks = 0
        if self._queue_since is not None:
            self._queue_waited_s += self._clock() - self._queue_since
            self._queue_since = None
        return []

    async def _stop_for(
        self, api: BatchAPI, book: BatchBook, control: Control, exc: BatchAPIError, chunk: Chunk, why: str = ""
    ) -> None:
        """End the run for a Batch API error at upload or create that retrying did not mend. An input file
        a create refused is deleted (an account holds at most 1,000 files); the next run uploads anew. A
        create that failed with a 5xx, or was sent more than once, may still have been made (an answer
        lost behind the error): the chunk is marked unsure, so the next run looks for that batch (by the
        chunk's content) before it uploads again."""
        chunk = book.chunks[chunk.id]
        if chunk.status == "uploaded" and chunk.file_id and isinstance(exc, BatchStatusError):
            with contextlib.suppress(BatchAPIError):
                await api.delete_file(chunk.file_id)
            maybe = exc.status >= 500 or chunk.file_id in api.retried_creates  # a 4xx answer made nothing
            book.record(chunk.id, status="written", file_id=None, unsure=chunk.unsure or maybe)
        fault = classify_api_error(exc)
        if why:
            control.fail(EndpointAborted(why))
        elif fault.verdict is Verdict.ABORT:
            control.abort(refusal(fault))
        elif fault.verdict is Verdict.RETRY:
            control.fail(EndpointAborted(api_failing(exc)))
        else:
            assert isinstance(exc, BatchStatusError)
            control.fail(EndpointAborted(self._refused(chunk, exc)))

    def _look(self, book: BatchBook, chunk: Chunk, batch: Batch) -> Chunk:
        """Note what a look at a batch saw; the book keeps each new status and count (what `status`
        shows, and what a lost batch is judged by)."""
        self._statuses[chunk.id] = batch.status
        self._counts[chunk.id] = (batch.request_counts.completed, batch.request_counts.failed)
        counts = dataclasses.asdict(batch.request_counts)
        if batch.status != chunk.batch_status or counts != chunk.counts:
            return book.record(chunk.id, batch_status=batch.status, counts=counts)
        return chunk

    def _lost(self, book: BatchBook, chunk: Chunk, deliver: Deliver) -> list[Request]:
        """A batch the Batch API no longer knows (404): marked lost. Its lines are sent again when
        nothing says any was billed (no completed line at the last look); else they fail (not paid twice)."""
        billed = chunk.counts.get("completed") or 0
        book.record(chunk.id, status="lost", batch_status="unknown to the Batch API (404)")
        self._statuses.pop(chunk.id, None)
        if not billed:
            return requests_of(chunk)
        self._harvester.fail_all(chunk, Fault(Verdict.FAIL, "batch_lost", lost_message(chunk, billed)), deliver)
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

    # ---- hybrid ----------------------------------------------------------------------------------

    async def _finish_online(self, requests: list[Request], deliver: Deliver, control: Control) -> None:
        """Send the leftovers online; a repair keeps the tokens its batch turns used."""
        assert self._online is not None
        await self._online.run(_aiter(requests), self._harvester.merging(deliver), control)


class _NoRoom(Exception):
    """A create the model's queue has no room for, while no batch of the job runs that could make room."""

    def __init__(self, chunk: Chunk, error: BatchStatusError) -> None:
        super().__init__(str(error))
        self.chunk = chunk
        self.error = error


async def _skipping(requests: AsyncIterator[Request], skip: set[str]) -> AsyncIterator[Request]:
    async for request in requests:
        if request.key not in skip:
            yield request


async def _aiter(items: Iterable[Request]) -> AsyncIterator[Request]:
    for item in items:
        yield item
