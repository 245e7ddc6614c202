"""The answer path's shortcuts give what the plain way gives: pricing a result, counting it by day,
the collector left alone while sending, and the CPU a run's answering cost stated in its summary."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
from collections.abc import AsyncIterator, Callable

import pytest

from runner.control import Control
from runner.engine import execute
from runner.job.resolve import load_job
from runner.local import LocalSender
from runner.money.accounting import Tally
from runner.observe.progress import make_reporter
from runner.records import Request, Result, priced
from runner.runs import RunOptions
from runner.send.base import Deliver
from runner.send.fake import FakeExecutor
from tests.conftest import JobFiles, sample_rows

DAY = dt.datetime(2026, 1, 2, 23, 59, tzinfo=dt.UTC)


def every_field_set() -> Result:
    """A result whose every field holds a value of its own, so a field copied to the wrong place shows."""
    return Result(
        key="k" * 32,
        status="invalid",
        attempts=3,
        latency_ms=12.5,
        finished_at=DAY,
        model="glm-4.6",
        response_text="text",
        thinking="thought",
        stop_reason="end_turn",
        input_tokens=11,
        output_tokens=22,
        thinking_tokens=5,
        cache_read_input_tokens=7,
        cache_creation_input_tokens=8,
        request_id="req-1",
        error_type="schema",
        error_message="bad",
        retryable=True,
        cost=None,
        est_input_tokens=None,
        parsed_json='{"a": 1}',
        repairs=2,
        api="online",
        wait_ms=4.5,
    )


def test_pricing_a_result_changes_its_cost_and_estimate_and_nothing_else() -> None:
    result = every_field_set()
    assert priced(result, 0.25, 10) == dataclasses.replace(result, cost=0.25, est_input_tokens=10)
    assert priced(result, None, None) == result
    assert result.cost is None  # the original is left as it was


def answer(day: dt.datetime, model: str, cost: float) -> Result:
    return Result(key="k", status="ok", attempts=1, latency_ms=1.0, finished_at=day, model=model,
                  input_tokens=10, output_tokens=2, cost=cost)  # fmt: skip


def test_results_of_different_days_and_models_are_counted_apart_in_whatever_order_they_come() -> None:
    tally = Tally()
    next_day = DAY + dt.timedelta(minutes=2)
    for day, model, cost in [(DAY, "a", 1.0), (next_day, "a", 2.0), (DAY, "a", 4.0), (DAY, "b", 8.0), (DAY, "a", 16.0)]:
        tally.record(answer(day, model, cost))

    counts = {
        (d.isoformat(), m): (c["requests_ok"], c["cost"], c["input_tokens"]) for (d, m), c in tally.by_day.items()
    }
    assert counts == {
        ("2026-01-02", "a"): (3, 21.0, 30),
        ("2026-01-03", "a"): (1, 2.0, 10),
        ("2026-01-02", "b"): (1, 8.0, 10),
    }
    assert (tally.ok, tally.cost, tally.input_tokens) == (5, 31.0, 50)


class FreezeWatcher(FakeExecutor):
    """The in-process executor, noting whether the collector had frozen the older objects as it sent."""

    frozen_while_sending: int = 0
    young_threshold_while_sending: int = 0

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        self.frozen_while_sending = gc.get_freeze_count()
        self.young_threshold_while_sending = gc.get_threshold()[0]
        await super().run(requests, deliver, control)


async def test_the_collector_leaves_older_objects_alone_while_sending_and_is_put_back_after(
    make_job: Callable[..., JobFiles],
) -> None:
    job = load_job(make_job(rows=sample_rows(20)).spec)
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    watcher = FreezeWatcher()

    report = await execute(
        job, api_key="k", options=RunOptions(), reporter=make_reporter("json"), sender=LocalSender(watcher)
    )

    assert report.exit_code == 0
    assert watcher.frozen_while_sending > 10_000  # the modules imported to get there, at least
    assert watcher.young_threshold_while_sending >= 10_000  # young objects looked at less often
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds


@pytest.mark.parametrize("rows", [1, 30])
async def test_the_summary_states_the_cpu_answering_took(make_job: Callable[..., JobFiles], rows: int) -> None:
    """From the first answer to the last: what a bench compares with a bare SDK loop's (two answers at least)."""
    job = load_job(make_job(rows=sample_rows(rows)).spec)

    report = await execute(
        job, api_key="k", options=RunOptions(), reporter=make_reporter("json"), sender=LocalSender(FakeExecutor())
    )

    cpu = report.summary.cpu_while_answering
    if rows == 1:
        assert cpu is None
    else:
        assert cpu is not None and cpu.seconds >= 0
        assert cpu.ms_per_answer == pytest.approx(1000 * cpu.seconds / (rows - 1), abs=0.01)  # both rounded
