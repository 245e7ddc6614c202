"""The worker's side of the cluster limit: the same `slot()` as runner.send.limits.Limits, backed by slots
leased from the run's ClusterLimiter actor instead of a local semaphore.

    slots = LeasedSlots(limiter, worker_id="worker-3", classify=overload)
    async with slots.slot(estimated_tokens) as attempt:   # what OnlineExecutor._attempt does
        answer = await client.send(params)
        attempt.used_tokens = ...
    await slots.aclose()                                  # hand everything back
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from ray.actor import ActorHandle

from runner.distributed.limiter import ClusterLimiter
from runner.distributed.terms import Directive, Joined, LeaseLost, Outcomes
from runner.send.limits import AimdController, AnswerLength, Attempt, Overload


class LeasedSlots:
    """A local pool of slots leased from the cluster's limiter, handed to this worker's attempts."""

    def __init__(
        self,
        limiter: ActorHandle[ClusterLimiter],
        worker_id: str,
        *,
        max_grant: int = 8,
        idle_s: float = 0.2,
        report_s: float = 0.1,
        classify: Callable[[Exception], tuple[Overload | None, float | None]] = lambda e: (None, None),
        clock: Callable[[], float] = time.monotonic,
        workers: int = 8,
        paced: bool = False,
        expected_output_tokens: int = 0,
    ) -> None:
        self._limiter = limiter
        self._workers = workers
        self._limit = workers  # the cluster's limit as last heard from the limiter
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
        self._closed = False
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

    # -- what runner.send.limits.Slots asks, so OnlineExecutor runs on these slots -----------------------

    @property
    def workers(self) -> int:
        """Attempts an executor may have waiting: the most the cluster limit may ever allow this worker."""
        return self._workers

    @property
    def in_flight(self) -> int:
        """Attempts holding a slot now."""
        return self.in_use

    @property
    def concurrency(self) -> int:
        """The cluster's in-flight limit, as of the last report."""
        return self._limit

    @property
    def controller(self) -> AimdController | None:
        """None: the adaptive controller, if any, runs in the limiter actor."""
        return None

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
        """Stop the background work and hand every unused slot back, with the outcomes not reported yet."""
        self._closed = True
        if self._pacer is not None:
            self._pacer.cancel()
        if self._steward is not None:
            # Let it stop between calls rather than cancelling it inside one: a call cut off at our end
            # still runs at the limiter, and what it did there would go unbooked here.
            with suppress(Exception):
                await self._steward
        if self._fetch is not None:
            # Not cancelled: the limiter may already have granted, and a grant nobody receives is a
            # leak until the lease times out. An acquire is timed, so this wait is short.
            with suppress(Exception):
                await self._fetch
        if self._lease_number is not None:
            with suppress(LeaseLost):
                await self._report(self.free + self._to_return)

    # -- taking and giving slots -----------------------------------------------------------------------

    async def _take(self) -> None:
        if self._lease_number is None:
            await self._join()
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
        want = max(1, min(self._max_grant, self._waiting - self.free))
        async with self._joining:  # a join under way: ask on the lease it makes
            lease = self._lease_number
        if lease is None:
            return
        try:
            # Timed, so that an acquire never outlives the worker's interest in it (see aclose).
            granted = await self._limiter.acquire.remote(self.worker_id, want, min(1.0, self._heartbeat_s), lease)
        except LeaseLost:
            await self._lost(lease)
            granted = 0
        except Exception as exc:  # e.g. the limiter actor died: fail the attempts waiting, do not hang them
            async with self._changed:
                self._failure = exc
                self._changed.notify_all()
            raise
        async with self._changed:
            if lease == self._lease_number:  # else granted on a lease since dropped: not ours any more
                self.held += granted
                self.leases += 1 if granted else 0
            self._changed.notify_all()

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
            joined: Joined = await self._limiter.join.remote(self.worker_id)
            self._heartbeat_s = joined.timeout_s / 4
            self._lease_number = joined.lease
        if self._steward is None:
            self._steward = asyncio.create_task(self._steward_loop())

    async def _lost(self, lease: int | None) -> None:
        """The limiter reclaimed `lease`: the slots in use now are not ours to return; start afresh.
        Several calls may find the same lease lost; the first joins again, the rest find that done."""
        if lease is None or lease != self._lease_number:
            return
        async with self._changed:
            self._unbacked = self.in_use
            self.held = 0
            self._owe = 0
            self._to_return = 0
        await self._join(lost=lease)

    async def _steward_loop(self) -> None:
        """Report outcomes, return owed and idle slots, and heartbeat, in one call at a time."""
        last = self._clock()
        while not self._closed:
            await asyncio.sleep(self._report_s)
            if self._closed:
                return  # aclose makes the last report
            now = self._clock()
            idle = self._waiting == 0 and now - self._last_used >= self._idle_s
            returning = self._to_return + (self.free if idle else 0)
            if returning or self._outcomes or now - last >= self._heartbeat_s:
                lease = self._lease_number
                try:
                    await self._report(returning)
                except LeaseLost:
                    await self._lost(lease)
                except Exception as exc:  # the limiter is unreachable: attempts waiting for slots fail
                    async with self._changed:
                        self._failure = exc
                        self._changed.notify_all()
                    return
                last = now

    async def _report(self, returning: int) -> None:
        outcomes, self._outcomes = self._outcomes, Outcomes()
        lease = self._lease_number
        async with self._changed:
            # Off the books before the call, so no attempt takes them meanwhile.
            set_aside = self._to_return
            self.held -= returning
            self._to_return = 0
        try:
            directive: Directive = await self._limiter.release.remote(
                self.worker_id, returning, outcomes, self.in_use - self._unbacked, lease
            )
        except LeaseLost:
            raise
        except Exception:
            # The call failed (actor unreachable for a moment): keep the slots and outcomes for next time.
            async with self._changed:
                self.held += returning
                self._to_return += set_aside
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
            self._limit = directive.limit
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
            "held": self.held,
            "in_use": self.in_use,
            "free": self.free,
            "owe": self._owe,
            "attempts": self.attempts,
            "leases": self.leases,
            "reports": self.reports,
        }
