"""`run.deadline`: when a hybrid job must be done, as a point on the monotonic clock.

deadline_in("90m")     # 90 minutes from now
deadline_in("06:30")   # the next 06:30, local time (tomorrow's if it has passed today)
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

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
