"""The online executor: `workers` tasks send the run's requests to the Messages API, each holding one
request through its conversation (retries, then repair turns) under a slot of its `Slots`."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState

from runner.control import Control
from runner.errors import deliberate
from runner.job.structured import AnswerShape
from runner.records import Answer, Request, Result
from runner.send.base import Conversation, Deliver, Gauges, estimated_usage, failure
from runner.send.limits import Slots
from runner.send.retries import TOOL_CHOICE_REFUSED, Classify, Verdict, refusal, retrying, wait_backoff

if TYPE_CHECKING:
    from runner.send.client import Client


class OnlineExecutor:
    """Fans requests out to the Messages API under the run's limits, with tenacity retries."""

    def __init__(
        self,
        client: Client,
        limits: Slots,
        *,
        max_attempts: int,
        estimate_tokens: Callable[[Request], int],
        shape: AnswerShape | None = None,
        wait: wait_backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._classify: Classify = client.classify
        self._limits = limits
        self._max_attempts = max_attempts
        self._workers = limits.workers
        self._estimate = estimate_tokens
        self._wait = wait or wait_backoff(classify=self._classify)
        self._shape = shape
        self._sleep = sleep
        self._said_estimated = False  # the log said once that a usage count was estimated
        self._clock = clock
        self._anchor = (dt.datetime.now(dt.UTC), clock())  # wall time of one `clock` reading: see _span

    def gauges(self) -> Gauges:
        """Requests in flight, the concurrency limit (and whether it adapts), the share refused, and the
        endpoint's cap as the adaptive limit last measured it (None: not measured)."""
        limits = self._limits
        controller = limits.controller
        return Gauges(
            in_flight=limits.in_flight,
            limit=limits.concurrency,
            adaptive=controller is not None,
            overload_429_rate=round(limits.overload_rate(), 4),
            measured_cap=controller.cap if controller is not None else None,
        )

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._client.aclose()

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Run `workers` tasks pulling from a small queue fed by `requests`."""
        queue: asyncio.Queue[tuple[Request, float] | None] = asyncio.Queue(maxsize=self._workers * 2)
        clock = self._clock

        async def feed() -> None:
            async for request in requests:
                if control.stopping.is_set():
                    break
                await queue.put((request, clock()))
            # One sentinel per worker, on the normal path only: when the run is cancelled the task group
            # cancels the workers itself, and nobody would drain a full queue to take them.
            for _ in range(self._workers):
                await queue.put(None)

        # An adaptive limit runs `workers` (its maximum) tasks for a limit of a few; those beyond the limit
        # wait at the gate holding no request, so a worker that gives a slot back takes it again for its
        # next request at once, instead of handing it to a waiting worker that runs a turn of the loop later.
        gate = Gate(lambda: self._limits.concurrency) if self._limits.controller is not None else None

        async def work(index: int) -> None:
            while True:
                if gate is not None:
                    await gate.admit(index)
                item = await queue.get()
                if item is None:
                    break
                if control.stopping.is_set():
                    continue  # drain without sending, so the feeder's sentinels get through
                request, queued_at = item
                waited = [(clock() - queued_at) * 1000]  # in ms: the queue, then each attempt's slot
                result = await self._send(request, control, waited)
                if result is not None:
                    deliver(result)
                if gate is not None:
                    gate.wake()  # the limit may have grown meanwhile
            if gate is not None:
                gate.open()  # the end of the requests: every worker must get to its sentinel

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(feed())
                for index in range(self._workers):
                    group.create_task(work(index))
        except ExceptionGroup as failed:  # an error raised on purpose (a UsageError) reaches the caller as itself
            raise deliberate(failed) or failed from None

    async def _send(self, request: Request, control: Control, waited: list[float]) -> Result | None:
        """One request's conversation: each turn retried until answered, repairs as the shape asks.
        None if the endpoint refused the whole run. `waited[0]` adds up the ms spent waiting for slots."""
        conversation = Conversation(request, self._shape)
        params: dict[str, Any] | None = request.params
        attempts = 0
        latency_ms: float | None = None
        ended: dt.datetime | None = None
        while params is not None:
            if control.tool_choice_auto and self._shape is not None:
                params = self._shape.auto(params)
            tries = [1]  # attempts of this turn, counted even when the turn fails
            try:
                try:
                    # The first attempt goes out directly: most are answered, and building tenacity's
                    # machinery for each of them was the largest cost of the runner's own while sending.
                    answer, latency_ms, ended = await self._attempt(params, request, waited)
                except Exception as first:  # an Exception only: cancellation must pass through untouched
                    answer, latency_ms, ended = await self._retry(first, params, request, control, tries, waited)
            except Exception as exc:
                fault = self._classify(exc)
                if fault.maybe_billed:  # the last attempt's timeout (earlier ones were noted as retries)
                    control.note_maybe_billed(self._estimate(request))
                if fault.verdict is Verdict.ABORT:
                    control.abort(refusal(fault))
                    return None
                if fault.type == TOOL_CHOICE_REFUSED and self._shape is not None and self._shape.auto(params) != params:
                    # Refused for forcing the tool: this request (and every later one) asks with auto.
                    control.fall_back_to_auto_tool_choice(fault.message)
                    attempts += tries[0]
                    continue
                return failure(request, fault, attempts + tries[0])
            attempts += tries[0]
            params = conversation.add(answer)
        self._say_estimated(conversation.answers, control)
        return conversation.result(attempts=attempts, latency_ms=latency_ms, wait_ms=waited[0], finished_at=ended)

    def _say_estimated(self, answers: tuple[Answer, ...], control: Control) -> None:
        """Say once a run that an answer came without a usage count (which its row names as estimated)."""
        if self._said_estimated or control.notify is None:
            return
        note = estimated_usage(answers)
        if note is not None:
            self._said_estimated = True
            control.notify(
                "usage_estimated",
                message=f"an answer came without a usage count; {note}; such rows say so in error_message",
            )

    def _span(self, started: float, ended: float) -> tuple[float, dt.datetime]:
        """A call's latency in ms and the wall time it returned, from the same two `clock` readings
        inside its slot, so calls through one slot never overlap in the report."""
        wall, at = self._anchor
        # Whole microseconds since the anchor, the datetime's own resolution: one timedelta, not four.
        begin_us, end_us = round((started - at) * 1e6), round((ended - at) * 1e6)
        return (end_us - begin_us) / 1000, wall + dt.timedelta(microseconds=end_us)

    async def _retry(
        self,
        first: Exception,
        params: dict[str, Any],
        request: Request,
        control: Control,
        tries: list[int],
        waited: list[float],
    ) -> tuple[Answer, float, dt.datetime]:
        """Retry a turn whose first attempt failed with `first` (tenacity takes it as attempt 1); the
        answer, its latency in ms and when it returned. `tries[0]` counts attempts; `waited[0]` adds the
        ms each attempt waited for its slot."""
        pending: Exception | None = first

        def count_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None:
                fault = self._classify(exc)
                control.count_retry(fault.type)
                if fault.maybe_billed:
                    control.note_maybe_billed(self._estimate(request))

        policy = retrying(
            self._max_attempts, classify=self._classify, sleep=self._sleep, wait=self._wait, before_sleep=count_retry
        )
        async for attempt in policy:
            with attempt:
                tries[0] = attempt.retry_state.attempt_number
                if pending is not None:  # attempt 1 is the one already made
                    failed, pending = pending, None
                    raise failed
                answer, latency_ms, ended = await self._attempt(params, request, waited)
        return answer, latency_ms, ended

    async def _attempt(
        self, params: dict[str, Any], request: Request, waited: list[float]
    ) -> tuple[Answer, float, dt.datetime]:
        """One attempt under a slot: the answer, the SDK call's ms and when it returned (see _span); the
        slot's wait goes to `waited`."""
        asked = self._clock()
        async with self._limits.slot(self._estimate(request)) as slot:
            started = self._clock()
            waited[0] += (started - asked) * 1000
            answer = await self._client.send(params)
            latency_ms, ended = self._span(started, self._clock())
            slot.used_tokens = answer.input_tokens + (answer.cache_read_input_tokens or 0) + answer.output_tokens
        return answer, latency_ms, ended


class Gate:
    """Where the workers numbered at or above the limit (`limit()`) wait, holding no request: so at most
    `limit` workers (at least one) take requests, and a slot a worker gives back is normally its own to
    take again. `wake` lets in those now under the limit; `open` lets every one through for good."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._parked: dict[int, asyncio.Future[None]] = {}
        self._open = False

    async def admit(self, index: int) -> None:
        """Return once worker `index` is under the limit (or the gate is open)."""
        while not self._open and index >= max(1, self._limit()):
            waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._parked[index] = waiting
            try:
                await waiting
            finally:
                self._parked.pop(index, None)

    def wake(self) -> None:
        """Let in the waiting workers now under the limit."""
        parked = self._parked
        under = list(parked) if self._open else [i for i in range(max(1, self._limit())) if i in parked]
        for index in under:
            if not parked[index].done():
                parked[index].set_result(None)

    def open(self) -> None:
        """Let every worker through from now on (the requests have ended)."""
        self._open = True
        self.wake()
