"""While a batch waits, every row's request is in flight. The run holds each key once: its keys in flight
are the accountant's admitted ones, one table, packed in a few bytes a key (16 for the key, 8 for its
estimate), not a str a key in two tables; and that memory goes back when sending ends."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

from runner.engine import execute
from runner.job.resolve import load_job
from runner.local import LocalSender
from runner.observe.progress import LineReporter, Reporter
from runner.observe.summary import Sending
from runner.run import Run
from runner.runs import RunOptions
from runner.simulator.simulator import SimulatorThread
from runner.supervise import Signals
from tests.conftest import JobFiles, sample_rows, until
from tests.test_batch_mode import BATCH_MODEL, FAST_POLL

ROWS = 3_000
BYTES_A_KEY = 24  # a packed key (16) and its estimate (8)


class Watching(LocalSender):
    """This process's sender, looking at the run while its batch waits at the Batch API, and after."""

    waiting: dict[str, object]
    after: dict[str, object]

    async def send(self, run: Run, api_key: str, reporter: Reporter, signals: Signals) -> Sending:
        async def look() -> None:
            await until(lambda: run.tally.all_rows_rendered and run.tally.requests_queued == ROWS, within_s=60)
            table = run.accountant.open_table
            self.waiting = {"one table": run.outstanding.table is table, "bytes": table.held_bytes}

        watcher = asyncio.create_task(look())
        sending = await super().send(run, api_key, reporter, signals)
        await watcher
        self.after = {"in flight": len(run.outstanding), "bytes": run.accountant.open_table.held_bytes}
        return sending


def test_a_waiting_batch_holds_each_key_in_flight_once_in_a_few_bytes(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_validating_s=1.0)  # the batch waits at the Batch API while the run is looked at
    files = make_job(rows=sample_rows(ROWS), model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    sender, quiet = Watching(), LineReporter(io.StringIO(), as_json=True, interval_s=1.0)
    result = asyncio.run(
        execute(load_job(files.spec), api_key="test", options=RunOptions(), reporter=quiet, sender=sender)
    )
    assert result.exit_code == 0, result.message
    assert sender.waiting["one table"], "the run keeps a set of keys in flight apart from the accountant's"
    assert sender.waiting["bytes"] <= BYTES_A_KEY * ROWS, sender.waiting  # packed, not a str a key
    assert sender.after == {"in flight": 0, "bytes": 0}
