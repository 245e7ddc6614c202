"""A sender's work with what every run needs around it: checkpoints, progress ticks, the collector's
settings, and signals. A first SIGINT/SIGTERM stops the run as any stopped run ends (summary, manifest,
resume line), giving requests in flight `grace_s`; a second one (or the grace's end) cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from runner.control import Control
from runner.observe.progress import Reporter

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """SIGINT/SIGTERM for one run, from its first line (a large input takes seconds to read) to the end
    of sending: `with Signals(control, reporter) as signals:`."""

    def __init__(self, control: Control, reporter: Reporter) -> None:
        self._control, self._reporter = control, reporter
        self._loop = asyncio.get_running_loop()
        # What a second signal cancels: the run, or (while it sends) its sending.
        self._target: asyncio.Future[Any] | None = asyncio.current_task()
        self._grace_s: float | None = None  # while sending: the time in-flight requests get
        self._grace: asyncio.TimerHandle | None = None
        for signum in SIGNALS:
            self._loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._control.reason in ("SIGINT", "SIGTERM"):
            if self._target is not None:
                self._target.cancel()  # second signal: stop now
            return
        self._control.stop(name)
        self._reporter.event("interrupted", signal=name, grace_s=self._grace_s or 0)
        if self._grace_s is not None and self._target is not None:
            self._grace = self._loop.call_later(self._grace_s, self._target.cancel)

    @contextlib.contextmanager
    def sending(self, task: asyncio.Future[Any], grace_s: float) -> Iterator[None]:
        """While `task` sends: a stop gives it `grace_s`, and a second signal cancels it (not the run)."""
        outer = self._target
        self._target, self._grace_s = task, grace_s
        try:
            yield
        finally:
            self._target, self._grace_s = outer, None
            if self._grace is not None:
                self._grace.cancel()

    def __enter__(self) -> Signals:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hand the signals back (the run is finishing: its output and summary are written whole)."""
        for signum in SIGNALS:
            self._loop.remove_signal_handler(signum)


@contextlib.contextmanager
def objects_so_far_frozen(young: int = 10_000) -> Iterator[None]:
    """While sending, gc.freeze the objects that exist already (every full collection walked the
    imported modules' ~200,000 again) and collect the young every `young` allocations; both undone after."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(young, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def supervise(
    work: Awaitable[None],
    *,
    control: Control,
    checkpoint: Callable[[], None],
    tick: Callable[[], None],
    every_s: float,
    grace_s: float,
    signals: Signals,
) -> None:
    """Await `work`, calling `checkpoint` and `tick` every `every_s`; signals stop it as above."""
    task = asyncio.ensure_future(work)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(every_s)
            checkpoint()  # time-based checkpoint: no answer waits longer than checkpoint_seconds
            tick()

    beat = asyncio.create_task(heartbeat())
    try:
        with signals.sending(task, grace_s), objects_so_far_frozen():
            await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we ourselves are being cancelled: let it through
        # otherwise the task was cancelled by our own signal handling; what arrived is kept
    finally:
        beat.cancel()
        tick()
