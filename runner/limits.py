"""Limits on how hard a run pushes the endpoint: requests in flight first, then optional RPM and TPM.

    limits = Limits(concurrency=8, requests_per_minute=600, tokens_per_minute=None)
    async with limits.slot(estimated_tokens=1200):
        ...send...

Zhipu limits each account by requests in flight per model, so the semaphore is the primary control.
The RPM/TPM buckets (aiolimiter) are sized to one second's worth, not a minute's, so a run never opens
with a minute-sized burst; they must be created inside the running event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter


def _bucket(per_minute: float) -> AsyncLimiter:
    """A leaky bucket holding at most one second of the rate (and at least one unit)."""
    capacity = max(1.0, per_minute / 60.0)
    return AsyncLimiter(capacity, time_period=capacity * 60.0 / per_minute)


class Limits:
    """Concurrency, request-rate and token-rate limits shared by all workers of one run."""

    def __init__(self, *, concurrency: int, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._rpm = _bucket(requests_per_minute) if requests_per_minute else None
        self._tpm = _bucket(tokens_per_minute) if tokens_per_minute else None
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[None]:
        """Hold one request slot for the duration of one attempt."""
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None:
                # A single request larger than the bucket takes the whole bucket rather than failing.
                await self._tpm.acquire(min(float(estimated_tokens), self._tpm.max_rate))
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1
