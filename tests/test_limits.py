"""Adaptive concurrency: find the endpoint's in-flight limit, hold it, follow it when it moves."""

from __future__ import annotations

import json
import statistics

import polars as pl
import pytest

from runner.send.limits import AimdController
from runner.testing.simulator import SimulatorThread
from tests.conftest import cli, sample_rows


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def round_trips(ctrl: AimdController, clock: FakeClock, caps: list[int], latency: float = 0.2) -> list[dict]:
    """Each round trip the controller fills its limit; the server refuses what exceeds its cap (at once,
    with 1302) and answers the rest one latency later."""
    history = []
    for cap in caps:
        sent = ctrl.limit
        accepted = min(sent, cap)
        for i in range(sent - accepted):
            ctrl.on_overload("concurrency", in_flight=sent - i)
        clock.now += latency
        for _ in range(accepted):
            ctrl.on_success(latency)
        history.append({"cap": cap, "sent": sent, "accepted": accepted, "refused": sent - accepted})
    return history


def utilisation(history: list[dict]) -> float:
    return sum(h["accepted"] for h in history) / sum(h["cap"] for h in history)


def refused_share(history: list[dict]) -> float:
    return sum(h["refused"] for h in history) / sum(h["sent"] for h in history)


def test_it_converges_near_a_fixed_cap_and_holds_it() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=3, maximum=64, clock=clock)

    history = round_trips(ctrl, clock, [16] * 300)

    steady = history[20:]
    assert utilisation(steady) >= 0.95
    assert refused_share(steady) < 0.03
    assert statistics.mean(h["sent"] for h in steady) == pytest.approx(16, abs=1)


def test_it_finds_the_cap_quickly_from_a_low_start() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=1, maximum=64, clock=clock)

    history = round_trips(ctrl, clock, [16] * 8)

    assert history[-1]["sent"] >= 15  # slow start doubles each round trip


def test_it_follows_a_cap_that_falls_and_then_rises() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=4, maximum=64, clock=clock)

    history = round_trips(ctrl, clock, [16] * 100 + [6] * 100 + [12] * 200)

    after_drop = history[100:]
    assert after_drop[1]["sent"] <= 7  # one round trip to come down to the new cap
    assert utilisation(after_drop[2:100]) >= 0.95
    assert refused_share(after_drop[2:100]) < 0.05
    after_rise = history[200:]
    first_back = next(i for i, h in enumerate(after_rise) if h["sent"] >= 12)
    assert first_back <= 40  # additive increase: about 4 round trips per slot
    assert utilisation(after_rise[first_back:]) >= 0.95


@pytest.mark.parametrize("cap", [1, 3, 100])
def test_it_never_exceeds_max_concurrency_nor_falls_below_one(cap: int) -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=8, maximum=10, clock=clock)

    history = round_trips(ctrl, clock, [cap] * 200)

    assert max(h["sent"] for h in history) <= 10
    assert min(h["sent"] for h in history) >= 1
    assert history[-1]["sent"] == min(cap, 10)


def test_platform_overload_pauses_everyone_for_the_retry_after_and_cuts_once() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=20, maximum=64, clock=clock)

    ctrl.on_overload("platform", in_flight=20, retry_after_s=7.0)
    ctrl.on_overload("platform", in_flight=19, retry_after_s=7.0)  # same episode: no second cut

    assert ctrl.paused_until == 7.0
    assert ctrl.limit == 16


def test_inflating_latency_trims_the_limit_at_most_once_per_round_trip() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=20, maximum=64, clock=clock)
    ctrl.on_overload("concurrency", in_flight=21)  # leave slow start
    for _ in range(50):
        ctrl.on_success(0.2)
    before = ctrl.limit

    clock.now = 10.0
    ctrl.on_success(1.0)  # 5x the floor: the endpoint is queueing
    ctrl.on_success(1.0)

    assert ctrl.limit == int(before * 0.9)


def test_auto_concurrency_finds_the_simulators_hidden_cap_in_a_real_run(make_job, sim: SimulatorThread) -> None:
    sim.configure(concurrency_cap=5, latency_s=0.05)
    job = make_job(sample_rows(400), run={"concurrency": "auto", "max_concurrency": 32, "max_attempts": 10})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert set(pl.read_parquet(job.output).get_column("status")) == {"ok"}
    summary = json.loads(job.summary.read_text())
    assert summary["concurrency"]["adaptive"] is True
    assert summary["concurrency"]["final"] in (4, 5, 6)
    assert summary["concurrency"]["overload_429_rate"] < 0.10
    assert sim.stats()["max_in_flight"] <= 5


def test_a_fixed_concurrency_is_never_exceeded(make_job, sim: SimulatorThread) -> None:
    sim.configure(latency_s=0.02)
    job = make_job(sample_rows(100), run={"concurrency": 3})

    assert cli("run", str(job.spec)).exit_code == 0
    assert sim.stats()["max_in_flight"] == 3


async def test_the_token_bucket_is_charged_the_tokens_an_answer_really_used() -> None:
    from runner.send.limits import Limits

    # 600 tokens a minute: a bucket of 10 tokens a second. The estimate says 2, the answer used 10.
    limits = Limits(concurrency=1, requests_per_minute=None, tokens_per_minute=600, expected_output_tokens=0)
    async with limits.slot(input_tokens=2) as attempt:
        assert attempt.charged_tokens == 2
        assert limits._tpm is not None and limits._tpm.has_capacity(8)
        attempt.used_tokens = 10

    assert not limits._tpm.has_capacity(1)  # the 8 tokens of debt were paid into the bucket


async def test_the_token_charge_learns_the_mean_answer_length() -> None:
    from runner.send.limits import Limits

    limits = Limits(concurrency=1, requests_per_minute=None, tokens_per_minute=60_000, expected_output_tokens=500)
    for used in (110, 130):  # input 10 each: answers of 100 and 120 tokens
        async with limits.slot(input_tokens=10) as attempt:
            attempt.used_tokens = used

    async with limits.slot(input_tokens=10) as attempt:
        assert attempt.charged_tokens == 10 + 110  # no longer max_tokens (500): the mean seen so far
