"""Zhipu answers errors in two shapes (real-wire.md): Anthropic's `{"type": "error", "error": {"type":
"1113", ...}, "request_id"}` and the native `{"error": {"code": "1113", ...}}`, seen on the Anthropic
route of api.z.ai too. Both are classified alike, on the online route (through the real SDK against
the simulator) and in batch result lines: no balance and plan limits abort, rate limits are retried."""

from __future__ import annotations

import asyncio
import json

import anthropic
import pytest

from runner.send.batch.errors import classify_api_error, status_error
from runner.send.batch.native_answer import BadResultLine, answer_from_chat
from runner.send.batch.native_results import classify_failure, parse_result_line
from runner.send.client import Client
from runner.send.retries import Fault, Verdict, error_parts, refusal, status_fault
from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, cli, sample_rows

FAMILY = [
    ("429_1113", "1113", Verdict.ABORT, None),
    ("429_1308", "1308", Verdict.ABORT, None),
    ("429_1304", "1304", Verdict.ABORT, None),  # the day's call limit: retrying cannot help until tomorrow
    ("429_1302", "1302", Verdict.RETRY, "concurrency"),
    ("429_1305", "1305", Verdict.RETRY, "platform"),
]


def online_fault(fault: str, shape: str) -> Fault:
    """The classified fault of one Messages call the simulator answers with `fault` in `shape`."""
    config = SimConfig(faults=(fault,), fault_rate=1.0, error_shape=shape)  # type: ignore[arg-type]

    async def go(url: str) -> Fault:
        client = Client(url, API_KEY, timeout_s=5, stream=False)
        try:
            await client.send({"model": "glm-4.6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
        except anthropic.APIStatusError as exc:
            return client.classify(exc)
        finally:
            await client.aclose()
        raise AssertionError("the simulator answered")

    with SimulatorThread(config) as sim:
        return asyncio.run(go(sim.url))


@pytest.mark.parametrize("shape", ["anthropic", "native"])
@pytest.mark.parametrize(("fault", "code", "verdict", "overload"), FAMILY, ids=[f[1] for f in FAMILY])
def test_the_online_route_classifies_both_shapes_alike(
    shape: str, fault: str, code: str, verdict: Verdict, overload: str | None
) -> None:
    classified = online_fault(fault, shape)
    assert (classified.verdict, classified.type, classified.overload) == (verdict, f"429/{code}", overload)
    assert classified.message  # the endpoint's own words, for the log and the abort line
    if shape == "anthropic":  # the request id travels in the body in this shape
        assert classified.request_id


@pytest.mark.parametrize("shape", ["code", "type"])
@pytest.mark.parametrize(("fault", "code", "verdict", "overload"), FAMILY, ids=[f[1] for f in FAMILY])
def test_batch_result_lines_classify_both_shapes_alike(
    shape: str, fault: str, code: str, verdict: Verdict, overload: str | None
) -> None:
    body = {"error": {shape: code, "message": "refused"}}
    line = json.dumps({"custom_id": "r1", "response": {"status_code": 429, "body": body}})
    assert classify_failure(parse_result_line(line)) is verdict


@pytest.mark.parametrize("shape", ["anthropic", "native"])
def test_no_balance_in_either_shape_stops_the_run_within_one_round_never_retried(make_job, sim, shape) -> None:
    sim.configure(faults=("429_1113",), fault_rate=1.0, error_shape=shape)
    job = make_job(sample_rows(200), run={"concurrency": 4})

    result = cli("run", str(job.spec))

    assert result.exit_code == 3, result.stderr[-2000:]
    assert "1113" in result.stderr and "top up" in result.stderr
    # One round: at most one request per worker went out, and none of them was sent again.
    assert sim.stats()["requests"] <= 4 * 2  # the workers' first requests (and the queue they held)
    assert sim.stats()["outcomes"].get("429_1113", 0) == sim.stats()["requests"]


def test_an_endpoint_url_carrying_user_info_is_refused_at_load_without_printing_the_secret(make_job) -> None:
    job = make_job(model={"endpoint": "https://me:sk-0123456789abcdefghij@open.bigmodel.cn/api/anthropic"})

    result = cli("validate", str(job.spec))

    assert result.exit_code == 2
    assert "user-info" in result.stderr and "ZHIPUAI_API_KEY" in result.stderr
    assert "sk-0123456789abcdefghij" not in result.stderr + result.stdout


README_RULE = [
    # transient: retried
    (408, None, Verdict.RETRY, None),
    (409, None, Verdict.RETRY, None),
    (429, "1302", Verdict.RETRY, "concurrency"),
    (429, "1305", Verdict.RETRY, "platform"),
    (500, "500", Verdict.RETRY, None),
    (502, None, Verdict.RETRY, None),
    (529, "overloaded_error", Verdict.RETRY, "platform"),
    (200, "1234", Verdict.RETRY, None),  # an error object in a 200
    # 1302/1303 (concurrency, frequency) and 1305 (traffic) are rate limits whatever the HTTP status
    (400, "1302", Verdict.RETRY, "concurrency"),
    (400, "1303", Verdict.RETRY, "concurrency"),
    (500, "1305", Verdict.RETRY, "platform"),
    # the request is wrong: its row fails at once
    (400, "1210", Verdict.FAIL, None),
    (413, "request_too_large", Verdict.FAIL, None),
    # the account or the model: the run stops
    (429, "1113", Verdict.ABORT, None),
    (429, "1304", Verdict.ABORT, None),
    (429, "1308", Verdict.ABORT, None),
    (429, "1309", Verdict.ABORT, None),
    (429, "1310", Verdict.ABORT, None),
    (401, None, Verdict.ABORT, None),
    (400, "1211", Verdict.ABORT, None),
]


@pytest.mark.parametrize(("status", "code", "verdict", "overload"), README_RULE, ids=lambda v: str(v))
def test_the_one_rule_decides_each_error_the_readme_names(
    status: int, code: str | None, verdict: Verdict, overload: str | None
) -> None:
    """README (Errors and retries): which answers are retried, which fail their row, which stop the run."""
    fault = status_fault(status, code, "the endpoint's words")
    assert (fault.verdict, fault.overload) == (verdict, overload)


ERROR_BODIES = {
    "anthropic": {"type": "error", "error": {"type": "1113", "message": "arrears"}, "request_id": "r-1"},
    "native": {"error": {"code": "1113", "message": "arrears"}},
    "native, msg": {"error": {"code": 1113, "msg": "arrears"}},
    "top-level": {"code": 1113, "msg": "arrears", "success": False},
}


@pytest.mark.parametrize("body", ERROR_BODIES.values(), ids=list(ERROR_BODIES))
def test_one_reader_gives_the_same_code_and_message_on_every_wire(body: dict[str, object]) -> None:
    """The Messages API, the Batch API and a batch result line read an error body the same way."""
    code, message, _ = error_parts(body)
    assert (code, message) == ("1113", "arrears")
    answered = status_error(429, json.dumps(body).encode(), {}, "GET /batches")
    assert (answered.code, answered.message) == (code, message)
    if "error" in body:  # a result line carries an error object, beside its response or in its body
        line = parse_result_line(json.dumps({"custom_id": "k", "response": None, "error": body["error"]}))
        assert (line.error_code, line.error_message) == (code, message)
        with pytest.raises(BadResultLine) as caught:
            answer_from_chat(body, None)
        assert caught.value.code == code and message in str(caught.value)


# README (Errors and retries): what stops a whole run, and words its one line must carry for each.
STOPS_THE_RUN = [
    *((400, code, "ZHIPUAI_API_KEY") for code in ("1000", "1001", "1002", "1003", "1004")),
    (401, None, "ZHIPUAI_API_KEY"),
    *((400, code, "console") for code in ("1110", "1111", "1112", "1121", "1220")),
    (429, "1113", "top up"),
    *((429, code, "plan") for code in ("1308", "1309", "1310")),
    (429, "1304", "tomorrow"),
    (400, "1211", "model.name"),
    (400, "1212", "does not support this method"),
    *((400, code, "offline or does not exist") for code in ("1221", "1222")),
    (404, None, "model or path"),
    *((status, None, "redirects elsewhere") for status in (300, 301, 302, 303, 307, 308)),
]


@pytest.mark.parametrize(("status", "code", "words"), STOPS_THE_RUN, ids=lambda v: str(v))
def test_each_refusal_of_the_account_stops_the_run_with_its_own_line(status: int, code: str | None, words: str) -> None:
    """Every code and status the README says stops the run stops it, and the line says what it means and
    what to do (its own line, not the generic one for a code nobody described)."""
    fault = status_fault(status, code, "the endpoint's words")
    assert fault.verdict is Verdict.ABORT
    line = str(refusal(fault))
    assert words in line and "check the key and the account" not in line, line


def test_a_file_api_closed_to_the_account_stops_a_batch_run_with_its_own_line() -> None:
    """434 from the file API (closed beta, real-wire.md): every later call would get it too."""
    answered = status_error(434, json.dumps({"error": {"code": "434", "message": "no permission"}}).encode(), {}, "")
    fault = classify_api_error(answered)
    assert fault.verdict is Verdict.ABORT
    assert "file API" in str(refusal(fault)) and "run.mode: online" in str(refusal(fault))
