"""`run.deadline`: when a hybrid job must be done ("90m" from now, or the next "06:30" local time), as a
point on the monotonic clock."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def seconds_until(spec: str, now: dt.datetime | None = None) -> float:
    """Seconds from `now` (local time) to the deadline `spec` describes."""
    if ":" in spec:
        now = now or dt.datetime.now().astimezone()
        hour, minute = (int(part) for part in spec.split(":"))
        target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if target <= now:
            target += dt.timedelta(days=1)
        return (target - now).total_seconds()
    return float(spec[:-1]) * _UNITS[spec[-1]]


def deadline_in(spec: str, clock: Callable[[], float] = time.monotonic) -> float:
    """The deadline on `clock` (monotonic by default: a wall-clock change does not move it)."""
    return clock() + seconds_until(spec)


@dataclass
class HybridDeadline:
    """When a hybrid run gives up on the Batch API: `at` (on `clock`) is the deadline, `margin()` before
    it the open batches are cancelled, half a margin before it the run stops waiting for them."""

    at: float | None
    started: float
    _margin_s: float | None = None  # run.batch.online_margin_s; default 10% of the time to the deadline
    clock: Callable[[], float] = field(default=time.monotonic)

    def margin(self) -> float:
        """How long before the deadline to give up on the Batch API and finish online."""
        if self._margin_s is not None:
            return self._margin_s
        assert self.at is not None
        return max(1.0, 0.1 * (self.at - self.started))

    def near(self) -> bool:
        return self.at is not None and self.clock() >= self.at - self.margin()

    def time_for_another_round(self, round_s: float | None) -> bool:
        """Would one more batch round (as long as the longest so far) end before the online margin?"""
        if self.at is None:
            return True
        return self.clock() + (round_s or 0.0) < self.at - self.margin()

    def next_look(self, interval: float, cancelled: bool) -> float:
        """How long to wait before the next look: the poll interval, but never past the moment to
        cancel for the deadline (hybrid), and at most a second once cancelled."""
        if self.at is None:
            return interval
        if cancelled:
            return max(0.0, min(interval, 1.0, self.give_up_at() - self.clock()))
        return max(0.0, min(interval, self.at - self.margin() - self.clock()))

    def give_up_at(self) -> float:
        """When a hybrid run stops waiting for cancelled batches to stop: half the margin before the
        deadline, leaving the other half for the online tail."""
        assert self.at is not None
        return self.at - self.margin() / 2

    def cancel_bound(self) -> float:
        """How long a cancel may take (its retries included) before the run goes on without it."""
        return max(1.0, self.margin() / 4)
