"""Run an executor with the things every run needs around it: time-based checkpoints, progress ticks,
and the SIGINT/SIGTERM protocol.

The first SIGINT/SIGTERM stops dispatch and gives in-flight requests `grace_s` to finish; a second one
(or the end of the grace period) cancels them. Whatever arrived is flushed by the caller. Before
sending starts (reading the input, opening the state), `stop_on_signals` holds the same promise: a
first signal lets the run end as any stopped run does (summary, manifest, resume line).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator

from runner.control import Control
from runner.observe.progress import Reporter


async def supervise(
    work: Awaitable[None],
    *,
    control: Control,
    checkpoint: Callable[[], None],
    tick: Callable[[], None],
    every_s: float,
    grace_s: float,
    reporter: Reporter,
) -> None:
    """Await `work`, calling `checkpoint` and `tick` every `every_s`, and handling signals."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    grace: asyncio.TimerHandle | None = None

    def on_signal(signum: int) -> None:
        nonlocal grace
        if control.reason in ("SIGINT", "SIGTERM"):
            task.cancel()  # second signal: stop now
            return
        control.stop(signal.Signals(signum).name)
        reporter.event("interrupted", signal=signal.Signals(signum).name, grace_s=grace_s)
        grace = loop.call_later(grace_s, task.cancel)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(every_s)
            checkpoint()  # time-based checkpoint: no answer waits longer than checkpoint_seconds
            tick()

    beat = asyncio.create_task(heartbeat())
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we ourselves are being cancelled: let it through
        # otherwise the task was cancelled by our own signal handling; what arrived is kept
    finally:
        beat.cancel()
        if grace is not None:
            grace.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        tick()


@contextlib.contextmanager
def stop_on_signals(control: Control, reporter: Reporter) -> Iterator[None]:
    """While a run starts: a first SIGINT/SIGTERM asks it to stop before it sends anything (so it still
    ends with its summary and resume line); a second one cancels it. `supervise` takes over once sending
    starts. Without this, a SIGTERM in the seconds a large input takes to read killed the run silently."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if control.reason in ("SIGINT", "SIGTERM"):
            if task is not None:
                task.cancel()  # second signal: stop now
            return
        control.stop(name)
        reporter.event("interrupted", signal=name, grace_s=0)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
