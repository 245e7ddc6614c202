"""What every executor shares: the protocol, and turning answers into Results the same way for all.
A fault nobody classified is retryable: a bug of ours must never fail a row for good."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from runner.control import Control
from runner.job.structured import AnswerShape, Unusable
from runner.records import Answer, Request, RequestBlock, Result
from runner.send.retries import Fault, Verdict

if TYPE_CHECKING:
    from aiohttp import StreamReader

Deliver = Callable[[Result], None]


@dataclass(slots=True)
class Gauges:
    """What progress and the summary show of the sending right now; None where a sender cannot tell."""

    in_flight: int | None = None
    limit: int | None = None  # the concurrency limit in force
    adaptive: bool | None = None  # whether that limit adapts to the endpoint
    overload_429_rate: float | None = None  # the share of attempts refused for overload
    measured_cap: int | None = None  # the endpoint's cap as the adaptive limit last measured it
    batches: dict[str, int] | None = None  # open batches by status (batch mode)
    batch_lines: dict[str, int] | None = None  # lines in open batches: open, completed, failed
    batch_queue: dict[str, Any] | None = None  # the model's batch queue: creates refused, seconds waited


class Executor(Protocol):
    """Sends requests and reports each one's Result."""

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Consume `requests` until exhausted or `control` says stop; call `deliver` for every result."""

    def gauges(self) -> Gauges:
        """What progress shows of the sending right now."""

    async def aclose(self) -> None:
        """Release connections and anything else the executor holds."""


# The most bytes one answer may take, on either wire (a whole JSON answer, a whole stream, an error body,
# a batch result line): a 131,072-token answer streamed a token an event is about 30 MB. Past it the
# answer is read no further and its row fails (answer_too_large), instead of taking the process's memory.
MAX_ANSWER_BYTES = 64 << 20


async def read_at_most(body: StreamReader, most: int = MAX_ANSWER_BYTES) -> bytes:
    """An HTTP body read until its end or until it is past `most` bytes (then a little past: the caller
    sees it is). The one reader of a whole body over aiohttp: no answer, error or API object takes more."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in body.iter_chunked(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size > most:
            break
    return b"".join(chunks)


@runtime_checkable
class BlockExecutor(Executor, Protocol):
    """An executor that also takes requests a block at a time (runner.records.RequestBlock): a run hands
    it each planned batch's requests at once, not one by one."""

    async def run_blocks(self, blocks: AsyncIterator[RequestBlock], deliver: Deliver, control: Control) -> None:
        """`run`, with the requests in blocks."""


class Conversation:
    """One request's turns; `add` returns a repair turn's parameters, or None when the request is done
    (a valid answer, free text, a truncated answer, or `max_repairs` spent)."""

    def __init__(self, request: Request, shape: AnswerShape | None) -> None:
        self.request = request
        self.params = request.params
        self._shape = shape
        self._answers: list[Answer] = []
        self._value: Any = None
        self._problem: Unusable | None = None

    @classmethod
    def resumed(cls, request: Request, shape: AnswerShape | None, earlier: list[Answer]) -> Conversation:
        """A conversation another process began: `request` is its next turn, `earlier` its billed turns."""
        conversation = cls(request, shape)
        conversation._answers = list(earlier)
        return conversation

    @property
    def answers(self) -> tuple[Answer, ...]:
        """The turns answered so far, oldest first."""
        return tuple(self._answers)

    def add(self, answer: Answer) -> dict[str, Any] | None:
        """Record one turn's answer; the next turn's parameters if a repair is due, else None."""
        self._answers.append(answer)
        if self._shape is None:
            return None
        try:
            self._value, self._problem = self._shape.check(answer), None
            return None
        except Unusable as unusable:
            self._problem = unusable
            if unusable.kind == "truncated" or len(self._answers) > self._shape.max_repairs:
                return None
            self.params = self._shape.repair(self.params, answer, str(unusable))
            return self.params

    def result(
        self,
        *,
        attempts: int,
        latency_ms: float | None,
        wait_ms: float | None = None,
        api: str | None = None,
        finished_at: dt.datetime | None = None,
    ) -> Result:
        """The Result of the finished conversation (at least one answer); `wait_ms`: its wait in this process
        before being sent; `api`: the API that answered; `finished_at`: when its last call returned."""
        answers, problem, last = self._answers, self._problem, self._answers[-1]
        # Every turn is paid for, so every turn's tokens count.
        tokens_in, tokens_out, thinking, cache_read, cache_creation = _usage(answers)
        return Result(
            key=self.request.key,
            status="ok" if problem is None else "invalid",
            attempts=attempts,
            latency_ms=latency_ms,
            wait_ms=wait_ms,
            finished_at=finished_at or dt.datetime.now(dt.UTC),
            model=last.model,
            # For a tool call the raw answer is its input; kept as text so invalid rows show what came back.
            response_text=last.text if last.tool_input is None else json.dumps(last.tool_input, ensure_ascii=False),
            thinking=last.thinking,
            stop_reason=last.stop_reason,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            thinking_tokens=thinking,
            cache_read_input_tokens=cache_read,
            cache_creation_input_tokens=cache_creation,
            request_id=last.request_id,
            error_type=problem.kind if problem else None,
            error_message=_note(str(problem) if problem else None, answers),
            # Sorted keys: the same answer always has the same text, so samples can be voted on by it.
            parsed_json=json.dumps(self._value, ensure_ascii=False, sort_keys=True)
            if problem is None and self._shape
            else None,
            repairs=len(answers) - 1,
            api=api,
        )


def estimated_usage(answers: Iterable[Answer]) -> str | None:
    """What an ok row says when a count of its usage is an estimate (the endpoint reported none), or None."""
    fields = sorted({f for a in answers if a.usage_estimated for f in a.usage_estimated.split(", ")})
    if not fields:
        return None
    return f"usage: {', '.join(f'{name} estimated' for name in fields)}: the endpoint reported none for this answer"


def _note(problem: str | None, answers: list[Answer]) -> str | None:
    """A row's message: its problem, and whether its usage is partly estimated."""
    estimated = estimated_usage(answers) if any(a.usage_estimated for a in answers) else None
    return f"{problem}; {estimated}" if problem and estimated else problem or estimated


def _usage(answers: list[Answer]) -> tuple[int, int, int, int, int]:
    """Input, output, thinking, cache-read and cache-creation tokens of all turns together."""
    if len(answers) == 1:  # nearly every request: no sums to build
        a = answers[0]
        return (
            a.input_tokens,
            a.output_tokens,
            a.thinking_tokens,
            a.cache_read_input_tokens or 0,
            a.cache_creation_input_tokens or 0,
        )
    return (
        sum(a.input_tokens for a in answers),
        sum(a.output_tokens for a in answers),
        sum(a.thinking_tokens for a in answers),
        sum(a.cache_read_input_tokens or 0 for a in answers),
        sum(a.cache_creation_input_tokens or 0 for a in answers),
    )


def failure(request: Request, fault: Fault, attempts: int, model: str | None = None, api: str | None = None) -> Result:
    """The Result of a request that ended in `fault` (on `api`, if it was sent); a retryable one is
    sent again by the next run."""
    return Result(
        key=request.key,
        status="error",
        attempts=attempts,
        latency_ms=None,
        finished_at=dt.datetime.now(dt.UTC),
        model=model or str(request.params.get("model")),
        error_type=fault.type,
        error_message=fault.message,
        request_id=fault.request_id,
        retryable=fault.verdict is Verdict.RETRY,
        api=api,
    )
