"""Harvesting a finished batch: its result files read into Results, and what is sent again.

    harvester = Harvester(directory, shape, keep_files=False)
    leftovers = await harvester.harvest(api, book, chunk, batch, deliver, control)

A line becomes the same Answer an online call gives (runner.send.batch.native_request) and goes through the same
Conversation; a line is sent again only when the batch's files and counts prove it was not billed
(`_short`). The Harvester holds what one run knows of its requests across rounds: attempts, open
conversations (repairs), and the tokens of billed turns no row holds yet (`carry`). Used by
runner.send.batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.control import Control
from runner.job.structured import AnswerShape, Unusable
from runner.records import Answer, Answers, Request, Result
from runner.send.base import MAX_ANSWER_BYTES, Conversation, Deliver, failure
from runner.send.batch.api import BatchAPI
from runner.send.batch.book import BatchBook, Chunk, read_requests
from runner.send.batch.errors import BatchAPIError, BatchNotFound
from runner.send.batch.native_answer import BadResultLine, UsageMissing, answer_from_chat
from runner.send.batch.native_results import (
    ResultLine,
    classify_failure,
    oversized_line,
    parse_result_line,
    plain_result,
)
from runner.send.batch.shapes import Batch
from runner.send.retries import Fault, Verdict, refusal

__all__ = ["API", "Harvester", "purge", "requests_of"]

API = "batch"


class Harvester:
    """Reads finished batches into Results for one run, keeping what the rounds share."""

    def __init__(self, directory: Path, shape: AnswerShape | None, *, keep_files: bool) -> None:
        self.dir = directory
        self.shape = shape
        self.keep_files = keep_files
        self.conversations: dict[str, Conversation] = {}  # requests with a turn answered in a batch
        self.attempts: dict[str, int] = {}  # of requests not answered for good yet (memory flat in the rows)
        self.carry: dict[str, tuple[int, int, int]] = {}  # key -> tokens of billed turns no row holds yet

    def fail_all(self, chunk: Chunk, fault: Fault, deliver: Deliver) -> None:
        """Fail every line of a chunk with `fault`."""
        for key in chunk.request_keys():
            deliver(failure(Request(key, {}), fault, self.attempts.get(key, 0) + 1, model=chunk.model))

    def merging(self, deliver: Deliver) -> Deliver:
        """`deliver` for answers sent online after batch turns: a repair keeps its batch turns' tokens."""

        def merged(result: Result) -> None:
            before = self.conversations.pop(result.key, None)
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

        return merged

    def carrying(self, deliver: Deliver, api: str | None) -> Deliver:
        """`deliver`, adding to each row the tokens of its billed turns that were not kept (a cut
        `network_error` answer sent again, a blocked one), and naming `api` on a row that has none."""

        def out(result: Result) -> None:
            carried = self.carry.pop(result.key, None)
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

    def carry_turn(self, key: str, answer: Answer) -> None:
        """Keep a billed answer's tokens for its row (the answer itself is not kept)."""
        before = self.carry.get(key, (0, 0, 0))
        tokens = (answer.input_tokens + (answer.cache_read_input_tokens or 0), answer.output_tokens)
        self.carry[key] = (before[0] + tokens[0], before[1] + tokens[1], before[2] + answer.thinking_tokens)

    async def harvest(
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
        block = _Block(control)  # plain answers, handed to the run a block at a time
        later: list[_Later] = []  # lines that need their request's body
        answered = 0  # lines read as answers (billed)
        for download in (1, 2):
            plain = block.answers if self.shape is None else None  # where plain answers go at once
            for count, item in enumerate(await self.result_lines(api, chunk, batch)):
                if count % 1000 == 999:
                    block.hand_over(HARVEST_BLOCK)  # a new block (plain follows it)
                    plain = block.answers if self.shape is None else None
                    await asyncio.sleep(0)
                if isinstance(item, bytes):
                    # Nearly every line: a plain answer, read without a ResultLine or an Answer.
                    if plain is not None and (fast := plain_result(item)) is not None:
                        custom_id = fast[0]
                        if custom_id not in wanted or custom_id in seen:
                            continue
                        if custom_id not in self.conversations and custom_id not in self.carry:
                            plain.add_fields(custom_id, self.attempts.pop(custom_id, 0) + 1, fast[1])
                            seen.add(custom_id)
                            answered += 1
                            continue
                    line = parse_result_line(item)
                else:
                    line = item
                key = line.custom_id
                if key is None or key not in wanted or key in seen or line.problem is not None:
                    continue  # a line we did not send, one we already took, or one we cannot read
                self.attempts[key] = self.attempts.get(key, 0) + 1
                taken = self.take_at_once(key, chunk.model, line, deliver, control, block)
                if taken is _UNREADABLE:  # an answer we cannot read: another download may give it whole
                    self.attempts[key] -= 1
                    continue
                seen.add(key)
                answered += line.ok
                if isinstance(taken, _Later):
                    later.append(taken)
            block.hand_over(0)
            if download == 2 or not _short(batch, answered, wanted - seen):
                break
        unrun = wanted - seen  # lines the batch never ran (expired, cancelled, failed validation)
        if _short(batch, answered, unrun):  # some of them may have been billed
            fault = Fault(Verdict.FAIL, "batch_result_missing", _missing(batch, answered))
            for key in sorted(unrun):
                deliver(failure(Request(key, {}), fault, self.attempts.get(key, 0) + 1, model=chunk.model))
            unrun = set()
        bodies = read_requests(chunk.requests, {pending.key for pending in later} | unrun)
        leftovers = [Request(key, bodies[key]) for key in unrun]
        for pending in later:
            request = Request(pending.key, bodies[pending.key])
            if pending.line is not None:  # an answer without its prompt's count: estimated from the request
                taken = self.take_at_once(
                    pending.key, chunk.model, pending.line, deliver, control, prompt=request.params
                )
                if not isinstance(taken, _Later):
                    continue
                pending = taken
            again = self.take(request, pending.answer, deliver)
            if again is not None:
                leftovers.append(again)
        counts = dataclasses.asdict(batch.request_counts)
        files = {"output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
        if control.checkpoint is not None:  # the answers are journalled before the book says harvested
            control.checkpoint()
            if control.failed is not None:  # not journalled (a full disk): the next run harvests it again
                return []
        chunk = book.record(chunk.id, status="harvested", batch_status=batch.status, counts=counts, **files)
        if not self.keep_files and control.checkpoint is not None:
            await purge(api, book, chunk)  # no paid answer is left only at Zhipu
        return leftovers

    def take_at_once(
        self,
        key: str,
        model: str,
        line: ResultLine,
        deliver: Deliver,
        control: Control,
        block: _Block | None = None,
        prompt: dict[str, Any] | None = None,
    ) -> _Later | object | None:
        """Take one result line as far as it can go without its request's body.

        A valid answer to a first ask is delivered, a failure for good fails its row, an abort stops
        the run: None. Otherwise what `take` (the other half, given the body) needs: the line's
        answer to continue the conversation with (a repair round's answer, or one to repair), or no
        answer when the request is to be sent again as it was (a transient failure). _UNREADABLE for
        an answer whose body cannot be read: it was billed, so it is not sent again on that account.
        With a `block`, a plain answer (free text, nothing carried) goes into it instead of `deliver`.
        An answer without its prompt's token count waits for its request's body (`prompt`), from which
        the count is estimated: it was billed, so it is kept, never sent again."""
        if not line.ok:
            fault = _line_fault(line)
            if fault.verdict is Verdict.RETRY:
                return _Later(key, None)
            if fault.verdict is Verdict.ABORT:
                control.abort(refusal(fault))
            else:
                deliver(failure(Request(key, {}), fault, self.attempts.pop(key), model=model))
            return None
        try:
            answer = answer_from_chat(line.body, line.request_id, prompt)
        except UsageMissing:
            return _Later(key, None, line)
        except BadResultLine:
            return _UNREADABLE
        if answer.stop_reason == "network_error":  # the inference broke off: a cut answer, billed; ask again
            self.carry_turn(key, answer)
            return _Later(key, None)
        if answer.stop_reason == "refusal":  # `sensitive`: Zhipu's content filter blocked the answer
            self.carry_turn(key, answer)
            self.conversations.pop(key, None)
            deliver(failure(Request(key, {}), _BLOCKED, self.attempts.pop(key), model=model))
            return None
        if block is not None and block.answers is not None and _plain(self, key, answer):
            block.answers.add(key, answer, self.attempts.pop(key))
            return None
        if key in self.conversations:
            return _Later(key, answer)  # a repair round's answer: its conversation holds the earlier turns
        if self.shape is not None:
            try:
                self.shape.check(answer)
            except Unusable:
                return _Later(key, answer)  # to be repaired: the next turn needs the conversation so far
        conversation = Conversation(Request(key, {}), self.shape)
        conversation.add(answer)
        deliver(conversation.result(attempts=self.attempts.pop(key), latency_ms=None, api=API))
        return None

    def take(self, request: Request, answer: Answer | None, deliver: Deliver) -> Request | None:
        """The half of taking a line that needs the request's body: add the line's answer to the
        request's conversation and deliver its Result, or return the request to send again (no
        answer: a retry; an answer that needs repair: the repair turn)."""
        if answer is None:
            return request
        key = request.key
        conversation = self.conversations.setdefault(key, Conversation(request, self.shape))
        repair = conversation.add(answer)
        if repair is not None:
            return Request(key, repair)
        del self.conversations[key]
        deliver(conversation.result(attempts=self.attempts.pop(key), latency_ms=None, api=API))
        return None

    async def result_lines(self, api: BatchAPI, chunk: Chunk, batch: Batch) -> Iterator[bytes | ResultLine]:
        """The batch's output and error lines, downloaded (streamed to disk), then read one at a time
        (raw, or a ResultLine for one over the size limit: runner.send.batch.harvest.raw_result_lines).
        A file that answered 404 past the waits on an earlier run too is taken as gone (its lines are
        then missing, and judged by the batch's counts)."""
        files = []
        for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
            if file_id:
                dest = self.dir / f"{chunk.id}.{kind}.jsonl"
                try:
                    await api.download(file_id, dest)
                except BatchNotFound:
                    if not chunk.file_404:
                        raise
                    continue
                files.append(dest)
        return raw_result_lines(files)


HARVEST_BLOCK = 5000  # plain answers handed to the run at once (Control.deliver_answers)


class _Block:
    """The plain answers of a harvest not yet handed to the run, as columns; none where the run takes no
    blocks (then each goes to `deliver` as a Result)."""

    def __init__(self, control: Control) -> None:
        self._take = control.deliver_answers
        self.answers = Answers(dt.datetime.now(dt.UTC), API) if self._take is not None else None

    def hand_over(self, at_least: int) -> None:
        """Hand the block to the run if it holds more than `at_least` answers; a new one is started."""
        if self.answers is not None and self._take is not None and len(self.answers) > at_least:
            taken, self.answers = self.answers, Answers(dt.datetime.now(dt.UTC), API)
            self._take(taken)


def _plain(harvester: Harvester, key: str, answer: Answer) -> bool:
    """A first answer that is the row's whole Result as it stands: free text (no shape, no tool call),
    not cut or blocked, no conversation open and no billed turn carried for it."""
    return (
        harvester.shape is None
        and answer.tool_input is None
        and answer.stop_reason not in ("network_error", "refusal")
        and key not in harvester.conversations
        and key not in harvester.carry
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Later:
    """A line taken as far as it goes without its request's body; `Harvester.take` finishes it."""

    key: str
    answer: Answer | None  # None: send the request again as it was (unless `line` is set)
    line: ResultLine | None = None  # an answer that needs its request's body to be priced: take it then


_BLOCKED = Fault(
    Verdict.FAIL,
    "content_filter",
    "Zhipu's content filter blocked the answer (finish_reason sensitive); it was billed",
)


_UNREADABLE = object()  # a result line answered (billed) whose body cannot be read


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


def requests_of(chunk: Chunk) -> list[Request]:
    """Every request of a chunk, with its body, to be sent again."""
    keys = list(chunk.request_keys())
    bodies = read_requests(chunk.requests, set(keys))
    return [Request(key, bodies[key]) for key in keys]


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


def read_result_lines(paths: list[Path], limit: int = MAX_ANSWER_BYTES) -> Iterator[ResultLine]:
    """Downloaded result files' lines, read one at a time, each bounded by `limit` bytes: a longer one
    is skipped through (its first and last 4 kB kept, to name its request) and fails its request."""
    for item in raw_result_lines(paths, limit):
        yield parse_result_line(item) if isinstance(item, bytes) else item


def raw_result_lines(paths: list[Path], limit: int = MAX_ANSWER_BYTES) -> Iterator[bytes | ResultLine]:
    """What read_result_lines reads, before parsing: each non-blank line of at most `limit` bytes as it
    is, and a longer one as the ResultLine that fails its request."""
    for path in paths:
        with open(path, "rb") as f:
            while raw := f.readline(limit + 1):
                if len(raw) > limit and not raw.endswith(b"\n"):
                    head, tail = raw[:4096], raw[-4096:]
                    del raw
                    while more := f.readline(1 << 20):
                        tail = (tail + more)[-4096:]
                        if more.endswith(b"\n"):
                            break
                    yield oversized_line(head, tail, limit)
                elif raw.strip():
                    yield raw
