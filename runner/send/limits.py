"""Limits on how hard a run pushes the endpoint: requests in flight first, then optional RPM and TPM
buckets (docs/decisions.md, "Limits and retries")."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol

from aiolimiter import AsyncLimiter

Overload = Literal["concurrency", "platform"]


def _bucket(per_minute: float) -> AsyncLimiter:
    """A leaky bucket holding at most one second of the rate (and at least one unit)."""
    capacity = max(1.0, per_minute / 60.0)
    return AsyncLimiter(capacity, time_period=capacity * 60.0 / per_minute)


class AimdController:
    """Finds and tracks the endpoint's in-flight limit from what it answers. Pure logic, no I/O.

    - Slow start (+1 a success) below `good`, the level that last worked; above it, +1 a `probe_windows`
      windows of successes, the windows doubling (to `max_probe_windows`) while the same level is
      refused. `learned`: `initial` is a cap measured before (runner.job.facts): start at it and hold.
    - Two past the level last refused (or learned) with no refusal: the cap rose; slow start again.
    - 1302: the limit becomes what was in flight besides the refused request when it was sent.
    - At most one decrease an epoch; a refusal of a request sent in an earlier epoch does not cut again.
    - 1305 / 529: cut by `platform_cut` and pause for the retry-after (at most `max_pause_s`).
    - Smoothed latency over `latency_inflation` x its floor: queueing; cut by 10%, once a round trip.
    """

    def __init__(
        self,
        *,
        initial: int,
        maximum: int,
        minimum: int = 1,
        probe_windows: float = 4.0,
        max_probe_windows: float = 8.0,
        learned: bool = False,
        platform_cut: float = 0.8,
        pause_s: float = 1.0,
        max_pause_s: float = 60.0,
        latency_inflation: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self._limit = float(min(max(initial, minimum), maximum))
        self._base_windows = self._probe_windows = probe_windows
        self._max_windows = max(probe_windows, max_probe_windows)
        self._platform_cut = platform_cut
        self._pause_s = pause_s
        self._max_pause_s = max_pause_s
        self._inflation = latency_inflation
        self._clock = clock
        # The level that last worked: slow start below it, additive increase above (a learned start holds).
        self.good = self._limit if learned else math.inf
        self.cap: int | None = None  # requests in flight the endpoint took, as its last 1302 measured it
        self._learned: int | None = self.limit if learned else None  # the cap this run was told
        self.epoch = 0  # bumped by every decrease; callers note it at dispatch and hand it back
        self.paused_until = 0.0
        self._latency: float | None = None  # smoothed (EWMA over about one window of answers)
        self._floor_latency: float | None = None  # the lowest smoothed latency lately
        self._last_cut = -math.inf
        self.successes = 0
        self.overloads = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return int(self._limit)

    @property
    def slow_start(self) -> bool:
        """Whether the limit grows by one per success (below the level that last worked)."""
        return self._limit < self.good

    def on_success(self, latency_s: float) -> None:
        """An attempt was answered."""
        self.successes += 1
        now = self._clock()
        smoothed = self._latency = (
            latency_s if self._latency is None else self._latency + (latency_s - self._latency) / max(self._limit, 1.0)
        )
        floor = self._floor_latency
        # The floor drifts up slowly so that a permanently slower endpoint becomes the new normal.
        self._floor_latency = smoothed if floor is None or smoothed < floor else floor * 1.001
        if floor is not None and smoothed > self._inflation * floor and now - self._last_cut > smoothed:
            self._decrease(self._limit * 0.9, now)
            self.good = self._limit  # the level cut from made it queue: not one to return to
            return
        if self.slow_start:
            self._set(min(self._limit + 1, self.good))
        else:
            self._set(self._limit + 1 / (self._probe_windows * self._limit))
            known = self.cap if self.cap is not None else self._learned
            if known is not None and self._limit >= known + 2:  # two past the level last refused: it rose
                self._probe_windows = self._base_windows
                self.good = math.inf  # find the new cap by slow start

    def on_overload(
        self, kind: Overload, *, in_flight: int, retry_after_s: float | None = None, epoch: int | None = None
    ) -> None:
        """An attempt was refused for overload. `in_flight` counts it among ours when it was sent;
        `epoch` is `self.epoch` when it was sent (None: sent now, i.e. the current epoch)."""
        self.overloads += 1
        now = self._clock()
        current = epoch is None or epoch >= self.epoch
        if kind == "concurrency":
            # The cap is below the count this one was sent at. That bound is fixed at dispatch, so the
            # refusals of one burst cannot stack below the lowest of them, whatever order they land in.
            bound = in_flight - 1
            if current:
                # The same level refused again: the cap holds still, so probe it less often.
                same = bound == self.cap
                self._probe_windows = min(2 * self._probe_windows, self._max_windows) if same else self._base_windows
                self.cap = bound
                self._decrease(min(self._limit, bound), now)
                self.good = self._limit
            else:  # same burst: tighten to its bound, but it is not a new decrease
                self.cap = bound if self.cap is None else min(self.cap, bound)
                self._set(min(self._limit, bound))
                self.good = max(self.minimum, min(self.good, bound))
        else:
            pause = min(retry_after_s or self._pause_s, self._max_pause_s)
            self.paused_until = max(self.paused_until, now + pause)
            if current and now - self._last_cut > pause:
                # The platform as a whole was busy, not our share of it: the level cut from still
                # worked for us, and is the one to return to once the pause is over.
                self._decrease(self._limit * self._platform_cut, now)

    def _decrease(self, value: float, now: float) -> None:
        """Cut to `value`, remembering the level cut from as the one to return to, and start an epoch."""
        self.good = self._limit
        self._set(value)
        self._last_cut = now
        self.epoch += 1

    def _set(self, value: float) -> None:
        self._limit = min(float(self.maximum), max(float(self.minimum), value))


@dataclass
class Attempt:
    """One attempt's slot; the sender reports the tokens the answer really used."""

    charged_tokens: int
    used_tokens: int | None = None


class AnswerLength:
    """The mean answer length (tokens) of the last ~100 answers, from a first guess: what an attempt is
    charged for its answer before it is known (by the local limits and a Ray worker's leased slots)."""

    __slots__ = ("_answers", "mean")

    def __init__(self, expected_output_tokens: int) -> None:
        self.mean, self._answers = float(expected_output_tokens), 0

    def charge(self, input_tokens: int) -> Attempt:
        """A new attempt, charged its input and the mean answer."""
        return Attempt(charged_tokens=input_tokens + round(self.mean))

    def learn(self, attempt: Attempt, input_tokens: int) -> None:
        """Count the answer of an attempt that reports the tokens it used (else nothing)."""
        if attempt.used_tokens is not None:
            self._answers += 1
            self.mean += (max(0, attempt.used_tokens - input_tokens) - self.mean) / min(self._answers, 100)


class Slots(Protocol):
    """What the online executor needs of its limits: Limits here, or a cluster worker's leased slots
    (runner.distributed.slots.LeasedSlots)."""

    @property
    def workers(self) -> int:
        """How many attempts the executor should be able to have waiting for a slot."""

    @property
    def in_flight(self) -> int:
        """Attempts holding a slot now."""

    @property
    def concurrency(self) -> int:
        """The in-flight limit in force now."""

    @property
    def controller(self) -> AimdController | None:
        """The adaptive controller, if this process runs one."""

    def overload_rate(self) -> float:
        """Share of attempts refused for overload so far."""

    def slot(self, input_tokens: int) -> AbstractAsyncContextManager[Attempt]:
        """Hold one slot for one attempt."""


class Limits:
    """In-flight, request-rate and token-rate limits shared by all workers of one run. The token bucket
    is charged the input estimate plus the mean output so far, and an answer that used more pays the
    difference before its worker sends again (aiolimiter cannot refund)."""

    def __init__(
        self,
        *,
        concurrency: int | AimdController,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        expected_output_tokens: int = 0,
        classify: Callable[[Exception], tuple[Overload | None, float | None]] = lambda e: (None, None),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = concurrency if isinstance(concurrency, AimdController) else None
        self._fixed = concurrency if isinstance(concurrency, int) else None
        self._rpm = _bucket(requests_per_minute) if requests_per_minute else None
        self._tpm = _bucket(tokens_per_minute) if tokens_per_minute else None
        self._classify = classify
        self._clock = clock
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()  # attempts queued in `_take`, in order
        self.attempts = 0
        self._output = AnswerLength(expected_output_tokens)
        self.overloaded = 0  # attempts refused with 429/1302, 1305 or 529

    @property
    def concurrency(self) -> int:
        """The in-flight limit in force now."""
        return self.controller.limit if self.controller is not None else self._fixed or 1

    @property
    def workers(self) -> int:
        """How many workers a run needs to be able to use every slot the limit may ever allow."""
        return self.controller.maximum if self.controller is not None else self.concurrency

    def overload_rate(self) -> float:
        """Share of attempts refused for overload so far."""
        return self.overloaded / self.attempts if self.attempts else 0.0

    def slot(self, input_tokens: int) -> AbstractAsyncContextManager[Attempt]:
        """Hold one in-flight slot for the duration of one attempt, and learn from how it ended."""
        return _Slot(self, input_tokens)

    async def _take(self) -> None:
        """Wait until fewer than the limit are in flight, and count this attempt in. Waiters queue in
        order, and a slot given back is handed to the first of them (counted in by the giver)."""
        if not self._waiters and self.in_flight < self.concurrency:
            self.in_flight += 1  # room, and nobody queued before us: no suspension
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # a slot was handed over as we were cancelled
                self._give_back()
            else:
                self._waiters.remove(handed)
            raise

    def _give_back(self) -> None:
        """Count an attempt out and hand the room there is now to as many waiters, first come first
        served (waking them all for each answer cost more than the answer)."""
        self.in_flight -= 1
        waiters = self._waiters
        while waiters and self.in_flight < self.concurrency:
            self.in_flight += 1
            waiters.popleft().set_result(None)


class _Slot:
    """One attempt's hold on a slot of `Limits` (a plain class: an @asynccontextmanager cost more
    than the work, once per attempt)."""

    __slots__ = ("_attempt", "_input_tokens", "_limits", "_sent_epoch", "_sent_in_flight", "_started")

    def __init__(self, limits: Limits, input_tokens: int) -> None:
        self._limits = limits
        self._input_tokens = input_tokens
        self._attempt = limits._output.charge(input_tokens)
        self._sent_in_flight = 0
        self._sent_epoch = 0
        self._started = 0.0

    async def __aenter__(self) -> Attempt:
        limits = self._limits
        if not limits._waiters and limits.in_flight < limits.concurrency:
            limits.in_flight += 1  # _take's fast path, without a coroutine for it
        else:
            await limits._take()
        entered = False
        try:
            if limits.controller is not None:  # a refusal for the platform's overload pauses every sender
                pause = limits.controller.paused_until - limits._clock()
                if pause > 0:
                    await asyncio.sleep(pause)
            if limits._rpm is not None:
                await limits._rpm.acquire()
            if limits._tpm is not None:
                # A single request larger than the bucket takes the whole bucket rather than failing.
                await limits._tpm.acquire(min(float(self._attempt.charged_tokens), limits._tpm.max_rate))
            entered = True
        finally:
            if not entered:  # cancelled while waiting for the buckets: the slot is not used
                limits._give_back()
        limits.attempts += 1
        # What the controller needs to judge a refusal: how many were in flight as this one went out
        # (it included), and in which of its epochs. Counts taken when the refusal lands are lower
        # (answers drain meanwhile), and would cut below the cap.
        self._sent_in_flight = limits.in_flight
        self._sent_epoch = limits.controller.epoch if limits.controller is not None else 0
        self._started = limits._clock()
        return self._attempt

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        limits = self._limits
        try:
            if exc is None:
                if limits.controller is not None:
                    limits.controller.on_success(limits._clock() - self._started)
                attempt = self._attempt
                limits._output.learn(attempt, self._input_tokens)
                debt = (attempt.used_tokens or 0) - attempt.charged_tokens
                if debt > 0 and limits._tpm is not None:  # an answer that used more pays before its worker sends again
                    await limits._tpm.acquire(min(float(debt), limits._tpm.max_rate))
            elif isinstance(exc, Exception):  # cancellation teaches the controller nothing
                kind, retry_after = limits._classify(exc)
                if kind is not None:
                    limits.overloaded += 1
                    if limits.controller is not None:
                        limits.controller.on_overload(
                            kind, in_flight=self._sent_in_flight, retry_after_s=retry_after, epoch=self._sent_epoch
                        )
        finally:
            limits._give_back()
