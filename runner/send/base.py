"""What every executor shares: the protocol, the run's stop state, and turning answers into Results.

An executor takes the run's pending requests (an async iterator), calls `deliver` once per finished
request, and watches `control` to stop early. It knows nothing of specs, files or money. How it sends
(online through the SDK, through Zhipu's Batch API, from Ray actors) is its own business; what a
Result says is decided here, the same way for all of them:

    conversation = Conversation(request, shape)
    while (params := conversation.add(answer)) is not None:   # a structured answer to repair
        answer = await send(params)
    deliver(conversation.result(attempts=..., latency_ms=...))

Failures are described by a transport's classifier as a `Fault`; `failure()` turns one into a Result.
A fault nobody classified is retryable: a bug of ours or a body we could not parse must never become a
row failed for good.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.errors import EndpointAborted, GlmBatchError
from runner.job.structured import AnswerShape, Unusable
from runner.records import Answer, Request, Result
from runner.send.retries import Fault, Verdict, abort_meaning

Deliver = Callable[[Result], None]


@dataclass
class Control:
    """Shared stop state of a run: why dispatch stopped, and the endpoint's refusal if that was why."""

    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    aborted: EndpointAborted | None = None
    failed: GlmBatchError | None = None  # a local failure that stopped the run (a full disk)
    retries: dict[str, int] = field(default_factory=dict)  # error_type -> retries taken
    maybe_billed: list[int] = field(default_factory=list)  # input tokens of attempts that may be billed twice
    # Journals what was delivered so far (the engine's checkpoint); an executor calls it before it lets
    # go of the last copy of paid answers (the Batch API's result files).
    checkpoint: Callable[[], None] | None = None
    started: float = field(default_factory=time.monotonic)  # when the run began (a hybrid deadline counts from it)
    # Structured answers ask with tool_choice auto (validated and repaired) instead of forcing the tool:
    # the endpoint refused a forced tool choice in this run, or a fact learned earlier said it would.
    tool_choice_auto: bool = False
    notify: Callable[..., None] | None = None  # the run's reporter.event, for what happens once in a run

    def fall_back_to_auto_tool_choice(self, message: str) -> bool:
        """The endpoint refused a forced tool choice: ask with auto from now on. True the first time
        (the caller re-sends its request), said once in the log."""
        if self.tool_choice_auto:
            return False
        self.tool_choice_auto = True
        if self.notify is not None:
            self.notify(
                "tool_choice_fallback",
                message="the endpoint refused a forced tool choice; asking with tool_choice auto, "
                "validating and repairing each answer",
                endpoint_said=message,
            )
        return True

    def stop(self, reason: str) -> None:
        """Stop at once: queued requests are dropped unsent; requests in flight may finish."""
        if self.reason is None:
            self.reason = reason
        self.stopping.set()

    def end_dispatch(self, reason: str) -> None:
        """No more requests will be offered, for `reason`; the ones already queued still go out."""
        if self.reason is None:
            self.reason = reason

    def abort(self, fault: Fault) -> None:
        """The endpoint refused the whole job: remember why and stop."""
        if self.aborted is None:
            code = fault.type.rsplit("/", 1)[-1]
            self.aborted = EndpointAborted(
                f"the endpoint refused the job ({fault.type}: {fault.message}): {abort_meaning(code)}"
            )
        self.stop("aborted")

    def abort_with(self, error: EndpointAborted) -> None:
        """Stop for a refusal the run itself recognised (the breaker for systematic failures)."""
        if self.aborted is None:
            self.aborted = error
        self.stop("aborted")

    def fail(self, error: GlmBatchError) -> None:
        """The run cannot go on for `error` (a full disk): stop at once and end with its exit code."""
        if self.failed is None:
            self.failed = error
        self.stop("failed")

    def count_retry(self, fault: Fault) -> None:
        """One more retry of a request that failed with `fault`."""
        self.retries[fault.type] = self.retries.get(fault.type, 0) + 1

    def note_maybe_billed(self, input_tokens: int) -> None:
        """An attempt was sent and then given up on (a timeout): the endpoint may bill it although we
        never got its answer. Its estimated input size prices the worst case."""
        self.maybe_billed.append(input_tokens)


class Executor(Protocol):
    """Sends requests and reports each one's Result."""

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Consume `requests` until exhausted or `control` says stop; call `deliver` for every result."""

    def gauges(self) -> dict[str, Any]:
        """What progress shows of the sending right now (in flight, limit, refusal rate, ...)."""

    async def aclose(self) -> None:
        """Release connections and anything else the executor holds."""


class Conversation:
    """One request's turns: its answers so far, and (for structured jobs) whether to ask again.

    `add` returns the parameters of a repair turn that quotes what was wrong with the answer, or None
    when the request is done: a valid answer, free text, a truncated answer (the same request would be
    cut at the same place) or `max_repairs` spent.
    """

    def __init__(self, request: Request, shape: AnswerShape | None) -> None:
        self.request = request
        self.params = request.params
        self._shape = shape
        self._answers: list[Answer] = []
        self._value: Any = None
        self._problem: Unusable | None = None

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
        """The Result of the finished conversation (at least one answer); `wait_ms`: how long it waited
        in this process before being sent (for the summary); `api`: the API that answered;
        `finished_at`: when its last call returned (default: now)."""
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
            error_message=str(problem) if problem else None,
            # Sorted keys: the same answer always has the same text, so samples can be voted on by it.
            parsed_json=json.dumps(self._value, ensure_ascii=False, sort_keys=True)
            if problem is None and self._shape
            else None,
            repairs=len(answers) - 1,
            api=api,
        )


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
