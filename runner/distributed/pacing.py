"""The account's request and token rates for a whole cluster, kept in the run's ClusterLimiter actor and
handed out as start times (docs/decisions.md, "Ray runs: one limit, one payment")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pace:
    """One rate as a virtual schedule: `per_minute`, in bursts of at most one second's worth."""

    per_minute: float
    empty_at: float = 0.0  # when the bucket is empty, given everything booked so far (clock seconds)

    @property
    def rate(self) -> float:
        """Units a second."""
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        """The most that may start at once: one second's worth, and at least one unit."""
        return max(1.0, self.rate)

    def start(self, cost: float, now: float) -> float:
        """The earliest time from `now` at which a use of `cost` (at most the capacity) fits the bucket."""
        return max(now, self.empty_at - (self.capacity - min(cost, self.capacity)) / self.rate)

    def book(self, cost: float, at: float) -> None:
        """A use of `cost` starting at `at` (no earlier than `start` said)."""
        self.empty_at = max(self.empty_at, at) + min(cost, self.capacity) / self.rate

    def owe(self, cost: float, now: float) -> None:
        """Units used beyond what was booked (an answer longer than its estimate): later starts wait."""
        self.empty_at = max(self.empty_at, now) + cost / self.rate


class Rates:
    """The request and token rates of one run; either may be absent."""

    def __init__(self, *, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.requests = Pace(requests_per_minute) if requests_per_minute else None
        self.tokens = Pace(tokens_per_minute) if tokens_per_minute else None
        self.booked = 0  # attempts booked
        self.calls = 0  # book calls that granted something

    def book(self, charges: list[float], now: float) -> tuple[int, float]:
        """Book the first attempts of `charges` (their token charges, in order) that fit both buckets at
        once, at least one; how many were booked, and the seconds from `now` until they may start."""
        n, tokens = 0, 0.0
        for charge in charges:
            if n and self.requests is not None and n + 1 > self.requests.capacity:
                break
            if n and self.tokens is not None and tokens + charge > self.tokens.capacity:
                break
            n, tokens = n + 1, tokens + charge
        if n == 0:
            return 0, 0.0
        at = now
        for pace, cost in ((self.requests, float(n)), (self.tokens, tokens)):
            if pace is not None:
                at = max(at, pace.start(cost, now))
        for pace, cost in ((self.requests, float(n)), (self.tokens, tokens)):
            if pace is not None:
                pace.book(cost, at)
        self.booked += n
        self.calls += 1
        return n, at - now

    def owe(self, tokens: float, now: float) -> None:
        """Tokens answers used beyond their charges."""
        if self.tokens is not None and tokens > 0:
            self.tokens.owe(tokens, now)
