"""The worker's side of the cluster limit: the `slot()` of runner.send.limits.Limits, backed by slots
leased from the run's ClusterLimiter actor instead of a local semaphore."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from ray.actor import ActorHandle

from runner.distributed.limiter import DEFAULT_GRANT, ClusterLimiter
from runner.distributed.terms import Directive, Holding, Joined, LeaseLost, Outcomes
from runner.send.limits import AimdController, AnswerLength, Attempt, Overload


class LeasedSlots:
    """A local pool of slots leased from the cluster's limiter, handed to this worker's attempts (the
    runner.send.limits.Slots an OnlineExecutor runs on)."""

    controller: AimdController | None = None  # the adaptive controller, if any, runs in the limiter actor

    def __init__(
        self,
        limiter: ActorHandle[ClusterLimiter],
        worker_id: str,
        *,
        max_grant: int = DEFAULT_GRANT,
        idle_s: float = 0.2,
        report_s: float = 0.1,
        classify: Callable[[Exception], tuple[Overload | None, float | None]] = lambda e: (None, None),
        clock: Callable[[], float] = time.monotonic,
        workers: int = 8,
        paced: bool = False,
        expected_output_tokens: int = 0,
    ) -> None:
        self._limiter = limiter
        self.workers = workers  # attempts an executor may have waiting: the most the limit may ever allow us
        self.concurrency = workers  # the cluster's in-flight limit as of the last report
        self.worker_id = worker_id
        self._max_grant = max_grant
        self._idle_s = idle_s
        self._report_s = report_s
        self._classify = classify
        self._clock = clock
        self._changed = asyncio.Condition()
        self.held = 0  # slots the limiter counts as ours (in use or in the pool)
        self.in_use = 0  # slots with an attempt on them, including unbacked ones
        self._unbacked = 0  # in use under a lease the limiter reclaimed: not to be given back
        self._waiting = 0  # attempts blocked in slot() for a slot
        self._owe = 0  # slots to give back as they come free
        self._to_return = 0  # freed slots set aside for the next report
        self._outcomes = Outcomes()
        self._paused_until = 0.0
        self._last_used = clock()
        self._heartbeat_s = 2.5
        self._fetch: asyncio.Task[None] | None = None
        self._steward: asyncio.Task[None] | None = None
        self._lease_number: int | None = None  # the lease the limiter counts our slots on; None: not joined
        self._joining = asyncio.Lock()  # one join at a time, so two calls finding the lease lost join once
        self._reporting = asyncio.Lock()  # one report at a time (the steward's, or give_back_idle's), in order
        self._instance = uuid.uuid4().hex  # with the join count, tells the limiter a repeated join
        self._joins = 0
        self._calls = 0  # acquire calls made on the lease
        self._settled = 0  # acquire calls ended here (answered or given up) on the lease
        self._reports = 0  # reports made on the lease
        self._unanswered = False  # an acquire call ended without its answer: the next round reports it
        self._closed = False
        self._closing = asyncio.Event()  # set by aclose: the steward stops at once, between calls
        self._closer: asyncio.Task[None] | None = None  # aclose's work, which its caller's cancellation spares
        self._last_report = clock()
        self._failure: Exception | None = None  # the limiter could not be reached: every waiter sees why
        # The run's request and token rates (run.requests_per_minute / tokens_per_minute), booked at the
        # limiter for every attempt waiting at once (runner.distributed.pacing).
        self._paced = paced
        self._pacing: list[tuple[float, asyncio.Future[float]]] = []  # charges waiting for a start time
        self._pacer: asyncio.Task[None] | None = None
        self._output = AnswerLength(expected_output_tokens)  # charged for an answer before it is known
        # Counters, for tests and benches.
        self.attempts = 0
        self.leases = 0  # acquire calls that granted something
        self.reports = 0  # release/renew calls
        self.overloaded = 0  # attempts refused for overload

    @property
    def in_flight(self) -> int:
        """Attempts holding a slot now."""
        return self.in_use

    def overload_rate(self) -> float:
        """Share of this worker's attempts refused for overload (429/1302, 1305, 529)."""
        return self.overloaded / self.attempts if self.attempts else 0.0

    @property
    def free(self) -> int:
        """Leased slots in the local pool, ready for the next attempt."""
        return self.held - (self.in_use - self._unbacked) - self._to_return

    @asynccontextmanager
    async def slot(self, input_tokens: int) -> AsyncIterator[Attempt]:
        """Hold one cluster slot for the duration of one attempt, and report how it ended."""
        await self._take()
        attempt = self._output.charge(input_tokens)
        try:
            if self._paced:
                await self._start_time(attempt.charged_tokens)
            started = self._clock()
            yield attempt
        except Exception as exc:
            kind, retry_after = self._classify(exc)
            if kind is not None:
                self.overloaded += 1
            if kind == "concurrency":
                self._outcomes.refusals.append(self.in_use)
            elif kind == "platform":
                self._outcomes.overloads.append(retry_after)
            raise
        else:
            self._outcomes.latencies_s.append(self._clock() - started)
            self._used(attempt, input_tokens)
        finally:
            await self._give()

    async def aclose(self) -> None:
        """Stop the background work and hand every unused slot back, with the outcomes not reported yet.

        The closing runs in a task of its own, shielded: a caller cancelled while it waits gets its
        CancelledError at once, and the slots still go back (else they would stay counted as this
        worker's until its lease timed out)."""
        if self._closer is None:
            self._closed = True
            self._closing.set()
            if self._pacer is not None:
                self._pacer.cancel()
            self._closer = asyncio.create_task(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        # The steward stops between calls, and the acquire under way is timed: waited for, not cancelled,
        # so what they did at the limiter is booked here before the last report.
        for task in (self._steward, self._fetch):
            if task is not None:
                await asyncio.wait([task])  # however it ends
        if self._lease_number is not None:
            with suppress(LeaseLost):
                await self._report(idle=True)

    async def give_back_idle(self) -> None:
        """Hand the pool's free slots back now, with the grant of an acquire under way: the worker has
        nothing more to send for now, and Ray Data may end it at once (docs/decisions.md, "Ray: a capped
        run's tail and start-up")."""
        if self._fetch is not None:
            await asyncio.wait([self._fetch])  # however it ends
        if self._lease_number is not None and not self._closed:
            await self._report_or_recover(idle=True)

    # -- taking and giving slots -----------------------------------------------------------------------

    async def _take(self) -> None:
        self._waiting += 1
        try:
            async with self._changed:
                while True:
                    if self._closed:
                        raise RuntimeError("LeasedSlots is closed")
                    if self._failure is not None:
                        raise self._failure
                    pause = self._paused_until - self._clock()
                    if pause > 0:
                        # The platform is overloaded: nobody in the cluster starts an attempt meanwhile.
                        # (Waiting on the condition, not sleeping, so attempts ending can still give back.)
                        with suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), pause)
                        continue
                    if self.free > 0:
                        break
                    if self._fetch is None or self._fetch.done():
                        # One acquire at a time per worker, sized by how many attempts wait now; a waiter
                        # cancelled meanwhile does not cancel it, and its grant lands in the pool.
                        self._fetch = asyncio.create_task(self._lease_more())
                    await self._changed.wait()
                self.in_use += 1
                self.attempts += 1
                self._last_used = self._clock()
        finally:
            self._waiting -= 1

    async def _give(self) -> None:
        async with self._changed:
            self.in_use -= 1
            if self._unbacked > 0:
                self._unbacked -= 1  # the limiter already took this one back
            elif self._owe > 0:
                self._owe -= 1
                self._to_return += 1
            self._changed.notify_all()

    async def _lease_more(self) -> None:
        """Ask the limiter for slots, joining first if need be; the attempts waiting look again however it
        ends (granted, nothing free, the lease lost, the call cut off)."""
        try:
            if self._lease_number is None:
                await self._join()
            lease = self._lease_number
            if lease is not None:
                await self._acquire(lease)
        except Exception as exc:  # e.g. the limiter actor died: fail the attempts waiting, do not hang them
            self._failure = exc
            raise
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _acquire(self, lease: int) -> None:
        want = max(1, min(self._max_grant, self._waiting - self.free))
        self._calls += 1
        call, granted, answered = self._calls, 0, False
        try:
            # Timed, so that an acquire never outlives the worker's interest in it (see aclose).
            timeout = min(1.0, self._heartbeat_s)
            granted = await self._limiter.acquire.remote(self.worker_id, want, timeout, lease, call)
            answered = True
        except LeaseLost:
            await self._lost(lease)
        finally:
            # With nothing awaited in between, so every report sees both or neither: the call has ended,
            # and what it granted is held (nothing, if it was cut off: the next report says so).
            if lease == self._lease_number:  # else granted on a lease since dropped: not ours any more
                self._settled = call
                self.held += granted
                self._unanswered |= not answered
                self.leases += 1 if granted else 0

    # -- the run's rates ---------------------------------------------------------------------------------

    async def _start_time(self, charge: float) -> None:
        """Wait until the limiter's rates let this attempt start; attempts waiting together are booked
        in one call."""
        started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pacing.append((charge, started))
        if self._pacer is None or self._pacer.done():
            self._pacer = asyncio.create_task(self._book())
        at = await started
        if (wait := at - self._clock()) > 0:
            await asyncio.sleep(wait)

    async def _book(self) -> None:
        """Book the waiting attempts at the limiter, a grant at a time, until none waits."""
        while waiting := [(c, f) for c, f in self._pacing if not f.done()]:
            try:
                booked, wait = await self._limiter.pace.remote(self.worker_id, [c for c, _ in waiting])
            except Exception as exc:  # the limiter is unreachable: the waiting attempts fail, not hang
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                self._pacing = []
                return
            at = self._clock() + wait
            for _, future in waiting[:booked]:
                if not future.done():  # its attempt was cancelled meanwhile: the booking goes unused
                    future.set_result(at)
            self._pacing = [(c, f) for c, f in self._pacing if not f.done()]

    def _used(self, attempt: Attempt, input_tokens: int) -> None:
        """Learn the mean answer length; tokens used beyond the charge are booked at the next report."""
        if attempt.used_tokens is None:
            return
        self._output.learn(attempt, input_tokens)
        self._outcomes.extra_tokens += max(0, attempt.used_tokens - attempt.charged_tokens)

    # -- talking to the limiter ------------------------------------------------------------------------

    async def _join(self, lost: int | None = None) -> None:
        """Join the limiter (again, if lease `lost` is the one we hold); nothing if someone else did."""
        async with self._joining:
            if self._lease_number != lost:
                return
            self._lease_number = None  # no grant or return from the lost lease is booked from here on
            self._joins += 1
            joined: Joined = await self._limiter.join.remote(self.worker_id, self._instance, self._joins)
            self._heartbeat_s = joined.timeout_s / 4
            self._calls = self._settled = self._reports = 0
            self._lease_number = joined.lease
        if not self._closed and (self._steward is None or self._steward.done()):
            self._steward = asyncio.create_task(self._steward_loop())

    async def _lost(self, lease: int | None) -> None:
        """The limiter reclaimed `lease`: the slots in use now are not ours to return; start afresh.
        Several calls may find the same lease lost; the first joins again, the rest find that done."""
        if lease is None or lease != self._lease_number:
            return
        self._unbacked = self.in_use
        self.held = 0
        self._owe = 0
        self._to_return = 0
        await self._join(lost=lease)

    async def _steward_loop(self) -> None:
        """Report outcomes, return owed and idle slots, and heartbeat, in one call at a time."""
        while not self._closed:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._report_s)  # aclose wakes it at once
            if not await self.steward_round():
                return

    async def steward_round(self) -> bool:
        """One round of the steward: report if there is anything to say or a heartbeat is due. False when
        it should stop (the pool is closed, or the limiter cannot be reached)."""
        if self._closed:
            return False  # aclose makes the last report
        now = self._clock()
        idle = self._waiting == 0 and now - self._last_used >= self._idle_s
        returning = self._to_return + (self.free if idle else 0)
        due = now - self._last_report >= self._heartbeat_s
        if not (returning or self._outcomes or self._unanswered or due):
            return True
        if not await self._report_or_recover(idle=idle):
            return False
        self._last_report = now
        return True

    async def _report_or_recover(self, *, idle: bool) -> bool:
        """Report; join again if the lease was lost. False if the limiter cannot be reached: the attempts
        waiting for slots then fail with its error, not hang."""
        lease = self._lease_number
        try:
            await self._report(idle=idle)
        except LeaseLost:
            await self._lost(lease)
        except Exception as exc:
            async with self._changed:
                self._failure = exc
                self._changed.notify_all()
            return False
        return True

    async def _report(self, *, idle: bool) -> None:
        """Hand back the slots set aside (and, when `idle`, every free one) and state what we hold now
        (Holding), with the outcomes since the last report; take the directive. Slots handed back are gone
        from here even if the call fails: the next report states the holding without them. One at a time,
        so reports reach the limiter in the order they were numbered."""
        async with self._reporting:
            lease = self._lease_number
            if lease is None:
                return  # a join is under way: nothing to report on
            outcomes, self._outcomes = self._outcomes, Outcomes()
            self.held -= self._to_return + (self.free if idle else 0)
            self._to_return = 0
            self._unanswered = False
            self._reports += 1
            holding = Holding(lease, self._reports, self.held, self._settled, self.in_use - self._unbacked)
            try:
                directive: Directive = await self._limiter.report.remote(self.worker_id, holding, outcomes)
            except LeaseLost:
                raise
            except Exception:
                # The call failed (actor unreachable for a moment): keep the outcomes for next time.
                self._outcomes.latencies_s[:0] = outcomes.latencies_s
                self._outcomes.refusals[:0] = outcomes.refusals
                self._outcomes.overloads[:0] = outcomes.overloads
                self._outcomes.extra_tokens += outcomes.extra_tokens
                raise
            self.reports += 1
            async with self._changed:
                if lease != self._lease_number:
                    return  # we joined again meanwhile: the directive was about the old lease
                self._owe = directive.owe
                self.concurrency = directive.limit
                if directive.pause_s > 0:
                    self._paused_until = max(self._paused_until, self._clock() + directive.pause_s)
                # What is owed and free now goes back at the next report, not when an attempt ends.
                pay = min(self._owe, self.free)
                self._owe -= pay
                self._to_return += pay
                self._changed.notify_all()

    def describe(self) -> dict[str, Any]:
        """The pool's state, for logs and tests."""
        return {
            "lease": self._lease_number,
            "held": self.held,
            "in_use": self.in_use,
            "free": self.free,
            "owe": self._owe,
            "attempts": self.attempts,
            "leases": self.leases,
            "reports": self.reports,
        }
