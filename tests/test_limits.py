"""Adaptive concurrency: find the endpoint's in-flight limit, hold it, follow it when it moves."""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

import polars as pl
import pytest

from runner.job.facts import load_facts
from runner.send.limits import AimdController, Limits
from runner.send.online import Gate
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def round_trips(ctrl: AimdController, clock: FakeClock, caps: list[int], latency: float = 0.2) -> list[dict]:
    """Each round trip the controller fills its limit; the server refuses what exceeds its cap (at once,
    with 1302) and answers the rest one latency later. Refusals land last-sent first (the worst order)."""
    history = []
    for cap in caps:
        sent, epoch = ctrl.limit, ctrl.epoch
        accepted = min(sent, cap)
        for i in range(sent - accepted):
            ctrl.on_overload("concurrency", in_flight=sent - i, epoch=epoch)
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
    assert first_back <= 16  # two probes above 6, then slow start (one slot per probe: ~30)
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


def test_a_retry_after_of_a_day_pauses_no_longer_than_the_longest_pause() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=20, maximum=64, max_pause_s=60.0, clock=clock)

    ctrl.on_overload("platform", in_flight=20, retry_after_s=86400.0)

    assert ctrl.paused_until == 60.0


def test_inflating_latency_trims_the_limit_at_most_once_per_round_trip() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=20, maximum=64, clock=clock)
    ctrl.on_overload("concurrency", in_flight=21)  # leave slow start
    for _ in range(50):
        ctrl.on_success(0.2)
    before, epoch = ctrl.limit, ctrl.epoch

    clock.now = 10.0
    for _ in range(2 * before):  # a window and more of answers at 5x the usual: the endpoint is queueing
        ctrl.on_success(1.0)

    assert ctrl.epoch == epoch + 1  # one cut
    assert int(before * 0.9) <= ctrl.limit <= int(before * 0.9) + 1  # (additive increase goes on)


def test_ordinary_latency_noise_is_not_taken_for_queueing() -> None:
    # 0.2 s +- 20% (sd 0.04): over a run one answer comes at -3 sd (0.08 s) and some at +3 sd (0.32 s),
    # 4x the fastest. Single answers like that are noise, not an endpoint that is queueing.
    clock = FakeClock()
    ctrl = AimdController(initial=16, maximum=16, clock=clock)
    ctrl.on_overload("concurrency", in_flight=17)
    ctrl.on_success(0.08)
    for i in range(400):
        clock.now += 0.2 / 16
        ctrl.on_success(0.32 if i % 16 == 0 else 0.2)

    assert ctrl.limit == 16


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


async def test_an_attempt_waiting_for_a_slot_goes_out_when_one_is_released() -> None:
    limits = Limits(concurrency=1, requests_per_minute=None, tokens_per_minute=None)
    release = asyncio.Event()
    order: list[str] = []

    async def attempt(name: str, hold: bool) -> None:
        async with limits.slot(input_tokens=0):
            order.append(name)
            assert limits.in_flight == 1
            if hold:
                await release.wait()

    first = asyncio.create_task(attempt("first", hold=True))
    await asyncio.sleep(0)
    second = asyncio.create_task(attempt("second", hold=False))
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["first"]  # the limit of 1 holds the second back

    release.set()
    async with asyncio.timeout(10):  # a slot given back without waking the waiter hangs here
        await asyncio.gather(first, second)

    assert order == ["first", "second"]
    assert limits.in_flight == 0


async def test_an_attempt_cancelled_while_waiting_for_the_rate_bucket_gives_its_slot_back() -> None:
    # One request a second: the second attempt holds a slot while it waits for the bucket.
    limits = Limits(concurrency=4, requests_per_minute=60, tokens_per_minute=None)
    async with limits.slot(input_tokens=0):
        pass

    async def attempt() -> None:
        async with limits.slot(input_tokens=0):
            raise AssertionError("sent although cancelled")

    waiting = asyncio.create_task(attempt())
    for _ in range(3):
        await asyncio.sleep(0)
    assert limits.in_flight == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    assert limits.in_flight == 0
    assert limits.attempts == 1  # the cancelled one never went out


class Refused(Exception):
    """What the fake endpoint raises for a request over its cap (429/1302)."""


def refusals(exc: Exception) -> tuple[str | None, float | None]:
    return ("concurrency", None) if isinstance(exc, Refused) else (None, None)


async def test_refusals_that_land_after_answers_drained_do_not_cut_below_the_cap() -> None:
    # The endpoint refuses at once what is over its cap of 16, while its 16 accepted requests take a
    # round trip. When the refusals are processed the answers may already have drained: the in-flight
    # count then is far below the one the refused requests were sent at, and must not be taken for it.
    clock = FakeClock()
    ctrl = AimdController(initial=20, maximum=64, clock=clock)
    ctrl.on_overload("concurrency", in_flight=21)  # out of slow start, holding 20
    limits = Limits(concurrency=ctrl, requests_per_minute=None, tokens_per_minute=None, classify=refusals, clock=clock)
    cap, busy = 16, 0
    answers, refusals_land = asyncio.Event(), asyncio.Event()

    async def request() -> None:
        nonlocal busy
        async with limits.slot(input_tokens=0):
            if busy >= cap:
                await refusals_land.wait()
                raise Refused()
            busy += 1
            await answers.wait()
            clock.now += 0.2
            busy -= 1

    tasks = [asyncio.create_task(request()) for _ in range(20)]
    for _ in range(5):
        await asyncio.sleep(0)
    answers.set()  # the accepted ones are answered before the refusals are looked at
    for _ in range(5):
        await asyncio.sleep(0)
    refusals_land.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert sum(isinstance(r, Refused) for r in results) == 4
    assert ctrl.limit == 16


def test_a_burst_of_simultaneous_refusals_decreases_the_limit_once() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=24, maximum=64, clock=clock)
    ctrl.on_overload("platform", in_flight=24)  # leave slow start: 24 * 0.8 -> 19
    clock.now = 5.0
    epoch = ctrl.epoch

    for _ in range(10):  # ten refusals of requests sent together, landing together
        ctrl.on_overload("platform", in_flight=19, epoch=epoch)

    assert ctrl.limit == int(19 * 0.8)
    assert ctrl.epoch == epoch + 1


@pytest.mark.parametrize("order", ["first sent first", "last sent first"])
def test_a_burst_of_1302s_leaves_the_limit_at_the_cap_whatever_order_they_land_in(order: str) -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=24, maximum=64, clock=clock)
    epoch = ctrl.epoch
    counts = list(range(17, 25))  # sent as the 17th to 24th in flight; the cap is 16
    if order == "last sent first":
        counts.reverse()

    for in_flight in counts:
        ctrl.on_overload("concurrency", in_flight=in_flight, epoch=epoch)

    assert ctrl.limit == 16
    assert ctrl.epoch == epoch + 1  # one decrease


def test_after_a_cut_the_limit_climbs_back_to_the_last_good_level_within_two_round_trips() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=3, maximum=64, clock=clock)
    round_trips(ctrl, clock, [16] * 30)
    assert ctrl.limit == 16

    clock.now += 5.0
    ctrl.on_overload("platform", in_flight=16)  # a passing platform overload: 16 -> 12
    assert ctrl.limit < 16
    history = round_trips(ctrl, clock, [16] * 3)

    assert history[2]["sent"] >= 16


def test_the_limit_never_exceeds_max_concurrency_even_while_climbing_back() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=30, maximum=32, clock=clock)
    ctrl.on_overload("platform", in_flight=30)

    history = round_trips(ctrl, clock, [100] * 50)

    assert max(h["sent"] for h in history) <= 32
    assert history[-1]["sent"] == 32


async def through_slots(ctrl: AimdController, clock: FakeClock, caps: list[int]) -> list[int]:
    """`round_trips` through Limits.slot, so the in-flight counts and epochs are the ones the executor
    really reports, and a refusal (raised at once) is learned from before the rest of its round trip
    goes out. Each round trip sends what the limit allows; what it sent is answered a latency later.
    The requests in flight as each round trip went out."""
    limits = Limits(concurrency=ctrl, requests_per_minute=None, tokens_per_minute=None, classify=refusals, clock=clock)
    busy = 0
    answers = [asyncio.Event()]  # the next batch of answers; requests sent now wait for it
    sent: list[int] = []

    async def request(cap: int) -> None:
        nonlocal busy
        async with limits.slot(input_tokens=0):
            if busy >= cap:
                raise Refused()
            busy += 1
            await answers[-1].wait()
            busy -= 1

    for cap in caps:
        batch = [asyncio.create_task(request(cap)) for _ in range(ctrl.limit)]
        for _ in range(3):
            await asyncio.sleep(0)
        sent.append(limits.in_flight)
        while not all(t.done() for t in batch):  # a round trip later, what was sent is answered
            clock.now += 0.2
            answers[-1].set()
            answers.append(asyncio.Event())
            for _ in range(3):
                await asyncio.sleep(0)
    return sent


async def test_a_cap_that_falls_from_16_to_6_is_followed_through_the_real_slots() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=4, maximum=64, clock=clock)

    sent = await through_slots(ctrl, clock, [16] * 30 + [6] * 30)

    assert sent[29] in (16, 17)
    assert sent[31] <= 7  # one round trip to come down
    assert all(6 <= n <= 7 for n in sent[32:])


def test_a_cap_that_holds_still_is_probed_ever_less_often() -> None:
    # Each probe one past the cap costs a refusal; the same level refused again and again says the cap
    # is not moving, so probes come at most every 8 windows (they came every 4: 1.6% refused at 16).
    clock = FakeClock()
    ctrl = AimdController(initial=3, maximum=64, clock=clock)

    history = round_trips(ctrl, clock, [16] * 400)

    steady = history[40:]
    assert utilisation(steady) >= 0.95
    assert refused_share(steady) < 1 / (6 * 16)


def test_a_start_at_a_learned_cap_holds_it_instead_of_ramping_past_it() -> None:
    # An earlier run (or doctor) measured 16 here: the run starts at 16 and probes above it one slot
    # at a time, instead of doubling into a burst of refusals as on a first run.
    clock = FakeClock()
    learned = AimdController(initial=16, maximum=64, learned=True, clock=clock)
    first_run = AimdController(initial=16, maximum=64, clock=clock)

    held = round_trips(learned, clock, [16] * 20)
    ramped = round_trips(first_run, clock, [16] * 20)

    assert held[0]["sent"] == 16
    assert max(h["refused"] for h in held) <= 1  # one probe at a time
    assert max(h["refused"] for h in ramped) >= 8  # the burst the learned start saves


async def test_an_answer_wakes_only_as_many_waiting_workers_as_it_makes_room_for() -> None:
    # `auto` runs max_concurrency workers (64) for a limit of a few: waking all of them for each answer
    # to find one slot cost more CPU than the answer. Counted here as callbacks the event loop was
    # handed (each waking of a waiter is one) while 400 attempts go through a limit of 4.
    limits = Limits(concurrency=4, requests_per_minute=None, tokens_per_minute=None)
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_soon = loop.call_soon

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal scheduled
        scheduled += 1
        return call_soon(*args, **kwargs)

    async def attempt() -> None:
        async with limits.slot(input_tokens=0):
            await asyncio.sleep(0)

    loop.call_soon = counted  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(attempt() for _ in range(400)))
    finally:
        del loop.call_soon  # type: ignore[method-assign]

    assert limits.in_flight == 0 and limits.attempts == 400
    assert scheduled < 10 * 400  # waking every waiter for each slot: ~200 a slot here


def test_a_second_auto_run_starts_at_the_cap_the_first_measured(make_job, sim: SimulatorThread) -> None:
    sim.configure(concurrency_cap=8, latency_s=0.03)
    run = {"concurrency": "auto", "max_concurrency": 32, "max_attempts": 10}
    first = make_job(sample_rows(240), name="first", run=run)
    second = make_job(sample_rows(240), name="second", run=run)

    assert cli("run", str(first.spec)).exit_code == 0
    refused_first = sim.stats()["outcomes"].get("429_1302_cap", 0)
    learned = load_facts(sim.url, "glm-4.6").concurrency
    assert cli("run", str(second.spec)).exit_code == 0
    refused_second = sim.stats()["outcomes"].get("429_1302_cap", 0) - refused_first

    assert learned is not None and 8 <= learned <= 10  # a 1302 at n in flight: the cap is below n
    assert refused_first >= 3  # the first run ramped up from the catalogue's 5 and overshot
    assert refused_second < refused_first
    assert sim.stats()["max_in_flight"] <= 8


def test_a_cap_that_rises_is_found_by_doubling_once_the_limit_has_climbed_two_past_the_old_one() -> None:
    # Held at 6, the cap rises to 12. One slot every 4 to 8 windows took ~30 round trips to get there;
    # two probes taken above 6 say the old cap is out of date, and slow start doubles to the new one.
    clock = FakeClock()
    ctrl = AimdController(initial=4, maximum=64, clock=clock)
    round_trips(ctrl, clock, [6] * 100)

    after_rise = round_trips(ctrl, clock, [12] * 40)

    first_back = next(i for i, h in enumerate(after_rise) if h["sent"] >= 12)
    assert first_back <= 16
    assert utilisation(after_rise[first_back:]) >= 0.95
    assert refused_share(after_rise) < 0.03


def test_a_learned_cap_that_is_out_of_date_and_too_low_is_left_behind_within_a_few_round_trips() -> None:
    # The facts say 8 (an earlier run, a smaller plan); the endpoint now takes 16.
    clock = FakeClock()
    ctrl = AimdController(initial=8, maximum=64, learned=True, clock=clock)

    history = round_trips(ctrl, clock, [16] * 40)

    assert history[0]["sent"] == 8  # it starts where it was told
    first_at_cap = next(i for i, h in enumerate(history) if h["sent"] >= 16)
    assert first_at_cap <= 12  # one slot per probe: 34 round trips
    assert utilisation(history[first_at_cap + 1 :]) >= 0.95


def test_a_learned_cap_that_holds_still_is_never_left_for_slow_start() -> None:
    # The cap refuses every probe one above it, so the limit never gets two past it: no bursts.
    clock = FakeClock()
    ctrl = AimdController(initial=16, maximum=64, learned=True, clock=clock)

    history = round_trips(ctrl, clock, [16] * 300)

    assert max(h["sent"] for h in history) <= 17
    assert refused_share(history) < 1 / (6 * 16)


async def test_a_cap_that_rises_from_6_to_12_is_found_through_the_real_slots_with_one_burst_of_refusals() -> None:
    clock = FakeClock()
    ctrl = AimdController(initial=4, maximum=64, clock=clock)

    sent = await through_slots(ctrl, clock, [6] * 40 + [12] * 30)
    after_rise = sent[40:]

    assert all(6 <= n <= 7 for n in sent[5:40])
    first_back = next(i for i, n in enumerate(after_rise) if n >= 12)
    assert first_back <= 16
    assert all(12 <= n <= 13 for n in after_rise[first_back + 1 :])  # the burst was cut at the new cap
    assert ctrl.cap == 12


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_workers_beyond_the_adaptive_limit_wait_at_the_gate_and_are_let_in_as_it_grows() -> None:
    # `auto` runs 64 workers for a limit of a few. Those beyond the limit wait holding no request, so
    # the ones under it take their slot again for their next request themselves: a slot handed to a
    # waiting worker was used only a turn of the loop later, which on a busy loop cost ~3% of the cap.
    limit = [2]
    gate = Gate(lambda: limit[0])
    admitted: list[int] = []

    async def worker(index: int) -> None:
        await gate.admit(index)
        admitted.append(index)

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    await settle()
    assert sorted(admitted) == [0, 1]

    limit[0] = 4
    await settle()
    assert sorted(admitted) == [0, 1]  # only `wake` (a worker done with a request) lets them in
    gate.wake()
    await settle()
    assert sorted(admitted) == [0, 1, 2, 3]

    gate.open()  # the requests have ended: every worker must get to its sentinel
    await settle()
    assert sorted(admitted) == [0, 1, 2, 3, 4]
    await asyncio.gather(*tasks)


async def test_the_first_worker_is_never_held_at_the_gate_whatever_the_limit_says() -> None:
    gate = Gate(lambda: 0)  # even a limit of none: someone must be left to take requests and wake the rest

    async with asyncio.timeout(1):
        await gate.admit(0)


async def test_a_worker_over_a_limit_that_fell_waits_at_the_gate_after_its_request() -> None:
    limit = [3]
    gate = Gate(lambda: limit[0])
    await gate.admit(2)  # under the limit: it takes a request
    limit[0] = 2  # cut meanwhile

    waiting = asyncio.create_task(gate.admit(2))  # done with its request, it comes back for another
    await settle()
    assert not waiting.done()
    limit[0] = 3
    gate.wake()
    await settle()
    assert waiting.done()


def test_an_auto_run_with_a_limit_of_a_few_and_64_workers_answers_every_row_and_stops(
    make_job, sim: SimulatorThread
) -> None:
    # The gate must let every parked worker reach its sentinel, or the run never ends.
    sim.configure(concurrency_cap=3, latency_s=0.01)
    job = make_job(sample_rows(120), run={"concurrency": "auto", "max_concurrency": 64, "max_attempts": 10})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert set(pl.read_parquet(job.output).get_column("status")) == {"ok"}
    assert sim.stats()["max_in_flight"] <= 3
