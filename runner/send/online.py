"""Executors: how a stream of Requests becomes a stream of Results. The online one is here.

An executor takes the run's pending requests (an async iterator), calls `sink` once per finished request,
and watches `control` to stop early. It knows nothing of specs, files or money; that keeps a server-side
batch executor (Zhipu's Batch API) or a distributed one (Ray Data) a drop-in replacement.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenacity import RetryCallState

from runner.errors import EndpointAborted
from runner.job.structured import AnswerShape, Unusable
from runner.records import Answer, Request, Result
from runner.send.limits import Limits
from runner.send.retries import Verdict, classify, error_message, error_type, retrying, wait_backoff

Sink = Callable[[Result], None]


@dataclass
class Control:
    """Shared stop state of a run: why dispatch stopped, and the endpoint's refusal if that was why."""

    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    aborted: EndpointAborted | None = None
    retries: dict[str, int] = field(default_factory=dict)  # error_type -> retries taken

    def stop(self, reason: str) -> None:
        """Stop at once: queued requests are dropped unsent; requests in flight may finish."""
        if self.reason is None:
            self.reason = reason
        self.stopping.set()

    def end_dispatch(self, reason: str) -> None:
        """No more requests will be offered, for `reason`; the ones already queued still go out."""
        if self.reason is None:
            self.reason = reason


class Executor(Protocol):
    """Sends requests and reports each one's Result."""

    async def run(self, requests: AsyncIterator[Request], sink: Sink, control: Control) -> None:
        """Consume `requests` until exhausted or `control` says stop; call `sink` for every result."""


class Sender(Protocol):
    """What the online executor needs of a client (runner.send.client.Client)."""

    async def send(self, params: dict[str, object]) -> Answer: ...


class OnlineExecutor:
    """Fans requests out to the Messages API under the run's limits, with tenacity retries."""

    def __init__(
        self,
        client: Sender,
        limits: Limits,
        *,
        max_attempts: int,
        workers: int,
        estimate_tokens: Callable[[Request], int],
        shape: AnswerShape | None = None,
        wait: wait_backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._limits = limits
        self._max_attempts = max_attempts
        self._workers = workers
        self._estimate = estimate_tokens
        self._wait = wait or wait_backoff()
        self._shape = shape
        self._sleep = sleep
        self._clock = clock

    async def run(self, requests: AsyncIterator[Request], sink: Sink, control: Control) -> None:
        """Run `workers` tasks pulling from a small queue fed by `requests`."""
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=self._workers * 2)

        async def feed() -> None:
            async for request in requests:
                if control.stopping.is_set():
                    break
                await queue.put(request)
            # One sentinel per worker, on the normal path only: when the run is cancelled the task group
            # cancels the workers itself, and nobody would drain a full queue to take them.
            for _ in range(self._workers):
                await queue.put(None)

        async def work() -> None:
            while (request := await queue.get()) is not None:
                if control.stopping.is_set():
                    continue  # drain without sending, so the feeder's sentinels get through
                result = await self._send(request, control)
                if result is not None:
                    sink(result)

        async with asyncio.TaskGroup() as group:
            group.create_task(feed())
            for _ in range(self._workers):
                group.create_task(work())

    async def _send(self, request: Request, control: Control) -> Result | None:
        """One request: retried until answered, then (for structured jobs) checked and re-asked with
        the problem up to max_repairs times. None if the endpoint refused the whole run."""
        params = request.params
        answers: list[Answer] = []
        attempts = 0
        latency_ms: float | None = None
        value: Any = None
        problem: Unusable | None = None
        while True:
            tries = [0]  # attempts of this turn, counted even when the turn fails
            try:
                answer, latency_ms = await self._call(params, request, control, tries)
            except Exception as exc:  # an Exception only: cancellation must pass through untouched
                return self._failure(request, exc, attempts + tries[0], control)
            attempts += tries[0]
            answers.append(answer)
            if self._shape is None:
                break
            try:
                value, problem = self._shape.check(answer), None
                break
            except Unusable as unusable:
                problem = unusable
                if unusable.kind == "truncated" or len(answers) > self._shape.max_repairs:
                    break
                params = self._shape.repair(params, answer, str(unusable))
        last = answers[-1]
        return Result(
            key=request.key,
            status="ok" if problem is None else "invalid",
            attempts=attempts,
            latency_ms=latency_ms,
            finished_at=dt.datetime.now(dt.UTC),
            model=last.model,
            # For a tool call the raw answer is its input; kept as text so invalid rows show what came back.
            response_text=last.text if last.tool_input is None else json.dumps(last.tool_input, ensure_ascii=False),
            thinking=last.thinking,
            stop_reason=last.stop_reason,
            # Every turn is paid for, so every turn's tokens count.
            input_tokens=sum(a.input_tokens for a in answers),
            output_tokens=sum(a.output_tokens for a in answers),
            thinking_tokens=sum(a.thinking_tokens for a in answers),
            cache_read_input_tokens=sum(a.cache_read_input_tokens or 0 for a in answers),
            cache_creation_input_tokens=sum(a.cache_creation_input_tokens or 0 for a in answers),
            request_id=last.request_id,
            error_type=problem.kind if problem else None,
            error_message=str(problem) if problem else None,
            # Sorted keys: the same answer always has the same text, so samples can be voted on by it.
            parsed_json=json.dumps(value, ensure_ascii=False, sort_keys=True)
            if problem is None and self._shape
            else None,
            repairs=len(answers) - 1,
        )

    async def _call(
        self, params: dict[str, Any], request: Request, control: Control, tries: list[int]
    ) -> tuple[Answer, float]:
        """Send one turn with retries; the answer and its latency in ms. `tries[0]` counts attempts."""
        latency_ms = 0.0

        def count_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None:
                name = error_type(exc)
                control.retries[name] = control.retries.get(name, 0) + 1

        policy = retrying(self._max_attempts, sleep=self._sleep, wait=self._wait, before_sleep=count_retry)
        async for attempt in policy:
            with attempt:
                tries[0] = attempt.retry_state.attempt_number
                async with self._limits.slot(self._estimate(request)) as slot:
                    started = self._clock()
                    answer = await self._client.send(params)
                    latency_ms = (self._clock() - started) * 1000
                    slot.used_tokens = (
                        answer.input_tokens + (answer.cache_read_input_tokens or 0) + answer.output_tokens
                    )
        return answer, latency_ms

    def _failure(self, request: Request, exc: Exception, attempts: int, control: Control) -> Result | None:
        verdict = classify(exc)
        if verdict is Verdict.ABORT:
            if control.aborted is None:
                control.aborted = EndpointAborted(
                    f"the endpoint refused the job: {error_type(exc)} {error_message(exc)}"
                )
            control.stop("aborted")
            return None
        return Result(
            key=request.key,
            status="error",
            attempts=attempts,
            latency_ms=None,
            finished_at=dt.datetime.now(dt.UTC),
            model=str(request.params.get("model")),
            error_type=error_type(exc),
            error_message=error_message(exc),
            retryable=verdict is Verdict.RETRY,
        )
