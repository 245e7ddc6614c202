"""Faults: retried when transient, recorded when the row is wrong, fatal to the run when the account is."""

from __future__ import annotations

import asyncio
import json

import polars as pl
import pytest

from runner.control import Control
from runner.records import Request, Result
from runner.send.client import Client
from runner.send.limits import Limits
from runner.send.online import OnlineExecutor
from runner.send.retries import Fault, Verdict, wait_backoff
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, cli, eventually, sample_rows

RETRYABLE = {
    "429_1302": "429/1302",  # account concurrency exceeded
    "429_1305": "429/1305",  # platform overloaded
    "500": "500/500",
    "529": "529/overloaded_error",
    "drop": "connection",  # the server closes the socket without answering
    "stream_error": "200/overloaded_error",  # an error event in the middle of a stream
    "200_error": "200/1234",  # a 200 whose body is an error object, not a message
    "slow": "timeout",  # no answer within run.timeout_s
}


@pytest.mark.parametrize("fault", sorted(RETRYABLE))
def test_each_transient_fault_is_retried_until_the_row_succeeds(make_job, sim: SimulatorThread, fault: str) -> None:
    sim.configure(faults=(fault,), fault_attempts=1, slow_s=5.0)
    stream = fault == "stream_error"
    job = make_job(sample_rows(6), model={"stream": stream}, run={"timeout_s": 0.5})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert set(out.get_column("status")) == {"ok"}
    assert out.get_column("attempts").to_list() == [2] * 6
    summary_retries = __import__("json").loads(job.summary.read_text())["retries"]
    assert summary_retries == {RETRYABLE[fault]: 6}
    assert sim.stats()["prompts_answered_twice"] == 0


@pytest.mark.parametrize(("fault", "error_type"), [("400_1261", "400/1261"), ("413", "413/request_too_large")])
def test_a_request_the_endpoint_rejects_is_not_retried(make_job, sim, fault: str, error_type: str) -> None:
    sim.configure(faults=(fault,), fault_attempts=1)
    job = make_job(sample_rows(3))

    result = cli("run", str(job.spec))

    assert result.exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.height == 3
    assert set(out.get_column("status")) == {"error"}
    assert set(out.get_column("error_type")) == {error_type}
    assert out.get_column("attempts").to_list() == [1, 1, 1]
    assert sim.stats()["requests"] == 3


def test_a_prompt_over_the_context_window_fails_alone_and_the_estimate_warned(make_job, sim) -> None:
    # glm-4.6 holds 200K tokens; 900,000 Latin characters are about 225K of the simulator's tokens.
    rows = [*sample_rows(2), {"id": "huge", "text": "word " * 180_000}]
    job = make_job(rows)

    estimate = json.loads(cli("estimate", str(job.spec), "--json").stdout)
    result = cli("run", str(job.spec))

    assert estimate["over_context"] == {"requests": 1, "context_tokens": 200_000}
    assert (estimate["requests_to_send"], estimate["requests_answerable"]) == (3, 2)
    assert result.exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["ok", "ok", "error"]
    assert out.get_column("error_type")[2] == "over_context"  # refused here: never sent
    assert out.get_column("attempts")[2] == 0
    assert sim.stats()["requests"] == 2


def test_a_prompt_the_endpoint_finds_too_long_fails_alone_without_retries(make_job, sim) -> None:
    """Our estimate can be low (GLM counts JSON at ~1.4x): what it lets through, the endpoint may refuse
    with 400/1261, unbilled; that row fails at once and the others go on."""
    sim.configure(token_scale=2.0)  # the endpoint counts twice what our estimator does
    rows = [*sample_rows(2), {"id": "long", "text": "word " * 100_000}]  # under 200K estimated, over it counted
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["ok", "ok", "error"]
    assert out.get_column("error_type")[2] == "400/1261"
    assert out.get_column("attempts")[2] == 1  # refused, not retried


def test_a_row_that_keeps_failing_is_an_output_row_with_its_error(make_job, sim) -> None:
    sim.configure(faults=("500",), fault_attempts=99)
    job = make_job(sample_rows(2), run={"max_attempts": 3})

    assert cli("run", str(job.spec)).exit_code == 1

    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["error", "error"]
    assert out.get_column("attempts").to_list() == [3, 3]
    assert out.get_column("error_message").to_list() == ["Internal Error"] * 2
    assert sim.stats()["requests"] == 6


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("429_1113", "1113"),  # out of balance, sent as a 429
        ("429_1308", "1308"),  # coding plan exhausted
        ("401", "token expired or incorrect"),
        ("400_1211", "Unknown Model"),
    ],
)
def test_an_account_level_refusal_stops_the_whole_run_early(make_job, sim, fault: str, said: str) -> None:
    sim.configure(faults=(fault,), fault_attempts=99)
    job = make_job(sample_rows(200), run={"concurrency": 4})

    result = cli("run", str(job.spec))

    assert result.exit_code == 3
    assert said in result.stderr
    assert "resume with" in result.stderr
    # Only the requests already in flight when the first refusal came back were sent, and none retried.
    assert sim.stats()["requests"] <= 4
    assert not job.output.exists()


def test_a_wrong_key_stops_the_run_and_never_retries(make_job, sim) -> None:
    sim.configure(api_keys=("the-right-key",))
    job = make_job(sample_rows(50), run={"concurrency": 2})

    result = cli("run", str(job.spec))

    assert result.exit_code == 3
    assert "401" in result.stderr
    assert sim.stats()["requests"] <= 2


async def test_retry_after_is_honoured_and_waits_are_injected_not_slept(sim: SimulatorThread) -> None:
    sim.configure(faults=("429_1302",), fault_attempts=2, retry_after_s=7)
    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    client = Client(sim.url, API_KEY, timeout_s=5, stream=False)
    executor = OnlineExecutor(
        client,
        Limits(concurrency=1, requests_per_minute=None, tokens_per_minute=None),
        max_attempts=5,
        estimate_tokens=lambda r: 10,
        wait=wait_backoff(initial=0.5, maximum=60, classify=client.classify),
        sleep=record_sleep,
    )
    results: list[Result] = []

    async def one() -> asyncio.AsyncIterator[Request]:  # type: ignore[name-defined]
        yield Request("k", {"model": "glm-4.6", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]})

    await executor.run(one(), results.append, Control())
    await client.aclose()

    assert [r.status for r in results] == ["ok"]
    assert results[0].attempts == 3
    assert len(slept) == 2 and all(s >= 7 for s in slept)


def test_backoff_grows_with_jitter_and_respects_its_cap() -> None:
    from tenacity import RetryCallState

    wait = wait_backoff(initial=1.0, maximum=4.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        samples = [wait(state) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling / 2  # full jitter spreads over the whole range


def test_attempts_that_timed_out_after_sending_are_counted_as_maybe_billed_twice(make_job, sim) -> None:
    """The server goes on and bills a request whose client gave up: the summary says how many such
    attempts there were and what they may have cost at worst, so the spend is not understated."""
    sim.configure(faults=("hang",), fault_attempts=1, slow_s=1.5)
    job = make_job(rows=sample_rows(4), run={"timeout_s": 0.5, "concurrency": 4})
    assert cli("run", str(job.spec)).exit_code == 0
    summary = json.loads(job.summary.read_text())
    maybe = summary["cost"]["maybe_billed_twice"]
    assert maybe["requests"] == 4 and maybe["worst_case"] > 0
    # The server finishes (and bills) the abandoned attempts: what the summary warned of does happen.
    eventually(lambda: sim.stats()["prompts_billed_twice"] == 4)


def test_a_stalled_stream_is_cut_by_its_silence_not_by_the_answers_length(make_job, sim) -> None:
    """Streaming, a hung connection is detected by the time since the last event (stall_s) and
    retried, while timeout_s (a whole answer's limit) does not apply."""
    sim.configure(faults=("hang",), fault_attempts=1, slow_s=30, latency_s=0.0)
    # stall_s well above a loaded machine's pause, far below the 30 s hang; timeout_s would fail any
    # attempt if it applied. Each row's first attempt hangs, is cut as `stalled`, and the second answers.
    job = make_job(rows=sample_rows(3), model={"stream": True}, run={"stall_s": 3, "timeout_s": 0.01})
    result = cli("run", str(job.spec))
    assert result.exit_code == 0, result.stderr[-1000:]
    summary = json.loads(job.summary.read_text())
    assert summary["retries"].get("stalled") == 3
    assert summary["cost"]["maybe_billed_twice"]["requests"] == 3


@pytest.mark.parametrize(("max_tokens", "streamed"), [(21333, False), (21334, True)])
def test_answers_are_streamed_by_default_from_21334_max_tokens_and_then_timeout_s_does_not_cut_them(
    make_job, sim, max_tokens: int, streamed: bool
) -> None:
    """`model.stream` unset: a streamed answer may take longer than timeout_s (stall_s bounds its
    silence instead); an unstreamed one is cut at timeout_s."""
    sim.configure(latency_s=0.5)
    job = make_job(rows=sample_rows(2), model={"max_tokens": max_tokens},
                   run={"timeout_s": 0.1, "stall_s": 10, "max_attempts": 2})  # fmt: skip
    result = cli("run", str(job.spec))
    statuses = set(pl.read_parquet(job.output).get_column("status"))
    assert (result.exit_code, statuses) == ((0, {"ok"}) if streamed else (1, {"error"}))


def test_a_streamed_html_page_with_status_200_is_retried_as_a_bad_response(make_job, sim) -> None:
    """A gateway's HTML page (status 200) where an event stream was expected holds no message: the
    attempt is retried under the name `bad_response`, not as whatever the SDK's accumulator raised."""
    sim.configure(faults=("200_html",), fault_attempts=1, latency_s=0.0)
    job = make_job(rows=sample_rows(3), model={"stream": True})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr[-1000:]
    assert json.loads(job.summary.read_text())["retries"] == {"bad_response": 3}


def test_under_auto_a_requests_first_1302_is_retried_as_soon_as_a_slot_is_free() -> None:
    """`concurrency: auto` has just cut its limit to the cap, so the slot is the wait: a random backoff
    there only delayed the refused row (and a run's last rows). A second 1302 backs off as ever, and so
    does a fixed limit's, which nothing else paces."""
    from tenacity import RetryCallState

    refused = Fault(Verdict.RETRY, "429/1302", "too many requests in flight", "concurrency")

    def state(attempt: int) -> RetryCallState:
        call = RetryCallState(None, None, (), {})
        call.attempt_number = attempt
        call.set_exception((RuntimeError, RuntimeError("1302"), None))
        return call

    paced = wait_backoff(initial=1.0, maximum=4.0, classify=lambda e: refused, slot_paced=True)
    fixed = wait_backoff(initial=1.0, maximum=4.0, classify=lambda e: refused)

    assert [paced(state(1)) for _ in range(20)] == [0.0] * 20
    assert max(paced(state(2)) for _ in range(200)) > 1.0
    assert max(fixed(state(1)) for _ in range(200)) > 0.5
