"""What a hybrid deadline means: the batch part ends by it; the online tail (what the batches did not
return) is sent after, whole, however long it takes. The executor runs on an injected clock against the
simulator's real Batch and Messages APIs, so the deadline is judged on that clock, not on a stopwatch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from runner.control import Control
from runner.job.spec import BatchSpec
from runner.records import Request, Result
from runner.send.batch.api import BatchAPI
from runner.send.batch.executor import BatchExecutor
from runner.send.client import Client
from runner.send.limits import Limits
from runner.send.online import OnlineExecutor
from runner.send.retries import wait_backoff
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY

DEADLINE_S = 30.0
ROWS = 40
TAIL_S_PER_ROW = 1.0  # each online answer moves the clock on a second: a tail of 40 s, past the deadline


async def _requests() -> AsyncIterator[Request]:
    for i in range(ROWS):
        params = {"model": "glm-4-air-250414", "max_tokens": 16, "messages": [{"role": "user", "content": f"row {i}"}]}
        yield Request(f"k{i}", params)


async def test_the_batch_part_ends_by_the_deadline_and_the_online_tail_is_sent_whole_after_it(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    """The Batch API returns nothing in time. With the default margin (10% of the 30 s to the deadline,
    3 s) the batch is cancelled 3 s before the deadline and the tail starts then; the tail, 40 rows of
    a second each on the run's clock, runs 37 s past the deadline, and every row is answered online."""
    sim.configure(batch_validating_s=3600.0)
    now = [0.0]

    async def sleep(seconds: float) -> None:  # the executor's waits move its clock, not the test's
        now[0] += seconds
        await asyncio.sleep(0)

    client = Client(sim.url, API_KEY, timeout_s=10, stream=False)
    online = OnlineExecutor(
        client,
        Limits(concurrency=4, requests_per_minute=None, tokens_per_minute=None),
        max_attempts=3,
        estimate_tokens=lambda r: 10,
        wait=wait_backoff(initial=0.01, maximum=0.02, classify=client.classify),
    )
    executor = BatchExecutor(
        job="deadline-test",
        api=lambda: BatchAPI(sim.url + "/api/paas/v4", API_KEY),
        directory=tmp_path / "batches",
        spec=BatchSpec(poll_initial_s=5.0),
        online=online,
        deadline=DEADLINE_S,
        clock=lambda: now[0],
        sleep=sleep,
    )
    answered: list[tuple[float, Result]] = []

    def deliver(result: Result) -> None:
        answered.append((now[0], result))
        if result.api != "batch":  # online answers are labelled by the engine, later
            now[0] += TAIL_S_PER_ROW

    try:
        await executor.run(_requests(), deliver, Control(started=0.0))
    finally:
        await executor.aclose()

    assert sim.stats()["batches"] == {"cancelled": 1}  # the batch part gave up, and ended
    tail = [(at, r) for at, r in answered if r.api != "batch"]
    assert len(tail) == len(answered) == ROWS and all(r.status == "ok" for _, r in tail)
    margin = 0.1 * DEADLINE_S
    first, last = tail[0][0], tail[-1][0]
    assert DEADLINE_S - margin <= first <= DEADLINE_S - margin / 2  # the tail starts before the deadline
    assert last >= DEADLINE_S + (ROWS - 1) * TAIL_S_PER_ROW - margin  # and ends long after it, not cut
    assert sim.stats()["billed"]["batch"] == 0 and sim.stats()["billed"]["online"] == ROWS
