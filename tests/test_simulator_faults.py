"""The simulator's rudeness, specified over real sockets with aiohttp as the client (not our engine):
Gaussian latency, the gateway faults a real endpoint throws (an HTML page labelled JSON, a truncated
body, a request that never answers), and a bill that counts what the server generated even when the
client had already given up."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from runner.simulator.answers import answer_for, prompt_text
from runner.simulator.config import FAULTS, RETRYABLE_FAULTS, SimConfig
from runner.simulator.simulator import Simulator, SimulatorThread
from tests.conftest import until

KEY = "sim-test-key"


@pytest.fixture
def server() -> Iterator[SimulatorThread]:
    """A simulator of this module's own, answering at once."""
    with SimulatorThread(SimConfig()) as sim:
        yield sim


def body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    """A minimal Messages request."""
    return {"model": "glm-4.6", "max_tokens": 256, "messages": [{"role": "user", "content": text}], **extra}


async def post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> tuple[int, str, str]:
    """POST a Messages request; the status, content type and raw body text."""
    async with session.post(f"{url}/v1/messages", json=payload, headers={"x-api-key": KEY}) as resp:
        return resp.status, resp.content_type, await resp.text()


def test_latency_jitter_is_a_gaussian_standard_deviation_truncated_at_zero() -> None:
    """latency_s is the mean and latency_jitter_s the standard deviation of each answer's delay; a draw
    below zero is answered at once rather than being redrawn."""
    sim = Simulator(SimConfig(latency_s=1.0, latency_jitter_s=0.2, seed=3))
    draws = [sim.delay() for _ in range(4000)]
    assert statistics.fmean(draws) == pytest.approx(1.0, abs=0.02)
    assert statistics.stdev(draws) == pytest.approx(0.2, abs=0.02)
    assert max(draws) > 1.4  # not a uniform add-on bounded by the jitter: a tail beyond 2 sd
    sim.configure(latency_s=0.01, latency_jitter_s=0.05)
    truncated = [sim.delay() for _ in range(2000)]
    assert min(truncated) == 0.0
    assert 0.3 < sum(d == 0.0 for d in truncated) / len(truncated) < 0.6  # P(N(0.01, 0.05) < 0) = 0.42
    sim.configure(latency_jitter_s=0.0)
    assert {sim.delay() for _ in range(10)} == {0.01}


async def test_refusals_over_the_concurrency_cap_are_answered_at_once(server: SimulatorThread) -> None:
    """Over the cap, 429/1302 comes back without the latency a real answer takes."""
    server.configure(latency_s=1.0, concurrency_cap=1)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(post(session, server.url, body("first")))
        await until(lambda: server.stats()["max_in_flight"] >= 1)  # the first request is being answered
        status, _, text = await post(session, server.url, body("second"))
        refused_while_the_first_is_answered = not slow.done()
        assert (await slow)[0] == 200
    assert status == 429 and json.loads(text)["error"]["type"] == "1302"
    assert refused_while_the_first_is_answered  # not after a latency of its own


async def test_a_200_html_fault_is_a_gateway_page_labelled_json_and_is_not_billed(server: SimulatorThread) -> None:
    """A proxy's 502 page comes back as 200 with content-type application/json; nothing was generated."""
    server.configure(faults=("200_html",), fault_rate=1.0)
    async with aiohttp.ClientSession() as session:
        status, content_type, text = await post(session, server.url, body())
    assert (status, content_type, text) == (200, "application/json", "<html><body>502 Bad Gateway</body></html>")
    stats = server.stats()
    assert stats["outcomes"] == {"200_html": 1}
    assert stats["billed"] == {"online": 0, "batch": 0} and stats["ok"] == 0


async def test_a_partial_json_fault_truncates_a_real_answer_which_is_billed(server: SimulatorThread) -> None:
    """The body is the first half of the real message: not parseable, yet the server generated it and
    bills it (the client that retries pays twice for that prompt)."""
    server.configure(faults=("partial_json",), fault_attempts=1)
    async with aiohttp.ClientSession() as session:
        status, content_type, text = await post(session, server.url, body())
        again = await post(session, server.url, body())
    assert (status, content_type) == (200, "application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert text.startswith('{"id": "msg_') and answer_for(prompt_text(body()))[:6] in text + "answer"
    assert json.loads(again[2])["content"][0]["text"] == answer_for(prompt_text(body()))
    stats = server.stats()
    assert stats["billed"]["online"] == 2 and stats["prompts_billed_twice"] == 1
    assert stats["ok"] == 1 and stats["prompts_answered_twice"] == 0  # delivered once, billed twice


async def test_a_hang_never_answers_but_the_server_finishes_and_bills_the_generation(server: SimulatorThread) -> None:
    """The client gives up (its timeout); the server still completes the answer after slow_s and bills
    it, though nothing was delivered."""
    server.configure(faults=("hang",), fault_rate=1.0, slow_s=0.4)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await post(session, server.url, body())
    assert server.stats()["billed"]["online"] == 0  # still generating
    await until(lambda: server.stats()["billed"]["online"] == 1)
    stats = server.stats()
    assert stats["billed"]["online"] == 1 and stats["billed_tokens"]["online"]["output"] > 0
    assert stats["ok"] == 0 and stats["outcomes"] == {"hang": 1}


async def test_a_client_that_times_out_on_a_slow_answer_is_billed_for_it(server: SimulatorThread) -> None:
    """Any generation the server completes is billed, even when its client hung up mid-way."""
    server.configure(latency_s=0.3)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await post(session, server.url, body())
    await until(lambda: server.stats()["billed"]["online"] == 1)
    assert server.stats()["ok"] == 0


async def test_faults_that_fail_before_generating_are_not_billed(server: SimulatorThread) -> None:
    """429s, 5xx, error bodies and mid-stream errors cost nothing."""
    async with aiohttp.ClientSession() as session:
        for fault in ("429_1302", "500", "529", "200_error"):
            server.configure(faults=(fault,), fault_rate=1.0)
            await post(session, server.url, body(fault))
        server.configure(faults=("stream_error",), fault_rate=1.0)
        await post(session, server.url, body("stream", stream=True))
    assert server.stats()["billed"] == {"online": 0, "batch": 0}


def test_the_default_mix_holds_every_transient_fault_that_costs_no_timeout() -> None:
    """RETRYABLE_FAULTS is what `fault_rate` draws from when no faults are named: the new gateway
    faults are in it; slow and hang (a whole client timeout each) and account-level refusals are not."""
    assert {"200_html", "partial_json"} <= set(RETRYABLE_FAULTS)
    assert not {"hang", "slow", "429_1113", "429_1308", "400_1261", "401", "413"} & set(RETRYABLE_FAULTS)
    assert set(RETRYABLE_FAULTS) <= set(FAULTS)
    with pytest.raises(ValueError, match="unknown simulator faults"):
        SimConfig(faults=("nonsense",))
