"""What the online wire keeps of a 200 answer, whatever shape it comes in.

A scripted endpoint (a real aiohttp server on loopback, spoken to by the real SDK) answers in shapes the
simulator does not produce: a stream cut before `message_stop`, usage that is not token counts, content
that is not blocks, an account error in Zhipu's older top-level shape, a body in another charset. The
rule: an answer is kept only when it is whole and can be priced (a count left out is estimated, and the
row says so: test_world_classes.py); one that cannot be kept is never a
crash, is asked again, and is counted as maybe billed; an account error aborts whatever its shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pytest
from aiohttp import web

from runner.send.batch.native_answer import answer_from_chat
from runner.send.client import answer_from_message
from runner.send.retries import BadResponse
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, messages_endpoint, sample_rows


def message(**changes: Any) -> dict[str, Any]:
    """A well-formed Messages API answer, with `changes` applied."""
    body: dict[str, Any] = {
        "id": "msg_20261205000000abc",
        "type": "message",
        "role": "assistant",
        "model": "glm-4.6",
        "content": [{"type": "text", "text": "fine"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }
    body.update(changes)
    return body


def sse(*events: dict[str, Any]) -> bytes:
    """Server-sent events with named `event:` lines, as Zhipu sends them."""
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


START = {
    "type": "message_start",
    "message": message(content=[], stop_reason=None, usage={"input_tokens": 0, "output_tokens": 0}),
}
TEXT = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fine"}},
    {"type": "content_block_stop", "index": 0},
]
DELTA = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    "usage": {"input_tokens": 12, "output_tokens": 3},
}


@dataclass
class Scripted:
    """A Messages endpoint that answers every request with `status`, `headers` and `body`."""

    url: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    body: bytes = b""
    requests: int = 0
    # When set, answers each request itself: its JSON body in, (status, body) out.
    respond: Callable[[dict[str, Any]], tuple[int, bytes]] | None = None
    trickle_s: float = 0.0  # when set, the body goes out a byte at a time, this long apart


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """A scripted endpoint on loopback, its answer set by the test."""
    world = Scripted()

    async def handler(request: web.Request) -> web.StreamResponse:
        sent = await request.read()
        world.requests += 1
        status, body = world.respond(json.loads(sent)) if world.respond else (world.status, world.body)
        response = web.StreamResponse(status=status, headers=world.headers)
        await response.prepare(request)
        if world.trickle_s:
            for byte in body:
                await response.write(bytes([byte]))
                await asyncio.sleep(world.trickle_s)
        else:
            await response.write(body)
        return response  # the connection ends here: a stream without message_stop is cut

    with messages_endpoint(handler) as url:
        world.url = url
        yield world


def summary(files: JobFiles) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files.summary.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([START, *TEXT], id="cut-after-the-text"),
        pytest.param([START, *TEXT, DELTA], id="cut-before-message-stop"),
    ],
)
def test_a_stream_cut_before_message_stop_is_never_kept_and_is_asked_again(
    make_job: Callable[..., JobFiles],
    scripted: Scripted,
    sim: SimulatorThread,
    events: list[dict[str, Any]],
) -> None:
    scripted.headers = {"content-type": "text/event-stream"}
    scripted.body = sse(*events)
    files = make_job(rows=sample_rows(3), model={"endpoint": scripted.url, "stream": True}, run={"max_attempts": 2})
    first = cli("run", str(files.spec))
    assert first.exit_code == 1, first.stderr
    out = pl.read_parquet(files.output)
    assert out.get_column("status").to_list() == ["error"] * 3  # never an "ok" row holding a part of an answer
    assert summary(files)["cost"]["maybe_billed_twice"]["requests"] == 6  # generated in part: maybe billed
    again = make_job(rows=sample_rows(3), model={"endpoint": sim.url, "stream": True})
    assert cli("run", str(again.spec)).exit_code == 0  # and the next run asks for them again
    assert sim.stats()["requests"] == 3


def test_a_whole_stream_is_kept_with_the_usage_of_its_message_delta(
    make_job: Callable[..., JobFiles], scripted: Scripted
) -> None:
    scripted.headers = {"content-type": "text/event-stream"}
    scripted.body = sse(START, *TEXT, DELTA, {"type": "message_stop"})
    files = make_job(rows=sample_rows(2), model={"endpoint": scripted.url, "stream": True})
    assert cli("run", str(files.spec)).exit_code == 0
    out = pl.read_parquet(files.output)
    assert out.get_column("response_text").to_list() == ["fine", "fine"]
    assert out.get_column("input_tokens").to_list() == [12, 12]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(message(usage={"input_tokens": -5, "output_tokens": 3}), id="negative-count"),
        pytest.param(message(usage={"input_tokens": 1e300, "output_tokens": 3}), id="absurd-count"),
        pytest.param(message(usage={"input_tokens": "12", "output_tokens": 3}), id="count-as-text"),
        pytest.param(message(content="fine"), id="content-not-blocks"),
    ],
)
def test_a_message_that_cannot_be_priced_or_read_is_never_kept_nor_a_crash(
    make_job: Callable[..., JobFiles], scripted: Scripted, body: dict[str, Any]
) -> None:
    scripted.body = json.dumps(body).encode()
    files = make_job(rows=sample_rows(2), model={"endpoint": scripted.url}, run={"max_attempts": 2})
    result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr  # rows failed, retryable; not exit 70
    out = pl.read_parquet(files.output)
    assert out.get_column("status").to_list() == ["error", "error"]
    assert (out.get_column("cost") == 0).all()  # no negative or made-up cost
    assert summary(files)["cost"]["maybe_billed_twice"]["requests"] == 4  # each attempt may have been billed


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"code": 1113, "msg": "余额不足", "success": False}, id="top-level-code"),
        pytest.param({"error": {"code": "1113", "message": "余额不足"}}, id="native"),
        pytest.param({"type": "error", "error": {"type": "1113", "message": "余额不足"}}, id="anthropic"),
    ],
)
def test_an_account_error_answered_with_200_aborts_the_run_in_any_shape(
    make_job: Callable[..., JobFiles], scripted: Scripted, body: dict[str, Any]
) -> None:
    scripted.body = json.dumps(body).encode()
    files = make_job(rows=sample_rows(20), model={"endpoint": scripted.url}, run={"concurrency": 1})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr
    assert "out of balance" in result.stderr
    assert scripted.requests == 1


@pytest.mark.parametrize(
    ("content_type", "raw", "text"),
    [
        ("application/json", b"\xef\xbb\xbf" + json.dumps(message()).encode(), "fine"),
        (
            "application/json; charset=latin-1",
            json.dumps(message(content=[{"type": "text", "text": "café"}]), ensure_ascii=False).encode("latin-1"),
            "café",
        ),
        ("application/json", json.dumps(message(content=[{"type": "text", "text": "été"}])).encode("utf-16"), "été"),
        ("application/json", json.dumps(message(content=[{"type": "text", "text": None}])).encode(), ""),
        (
            "application/json",
            json.dumps(message(content=[{"type": "odd"}, {"type": "text", "text": "fine"}])).encode(),
            "fine",
        ),
    ],
    ids=["utf-8-bom", "declared-latin-1", "utf-16", "null-text", "unknown-block"],
)
def test_a_whole_message_is_kept_whatever_its_encoding_or_odd_blocks(
    make_job: Callable[..., JobFiles], scripted: Scripted, content_type: str, raw: bytes, text: str
) -> None:
    scripted.headers = {"content-type": content_type}
    scripted.body = raw
    files = make_job(rows=sample_rows(2), model={"endpoint": scripted.url})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    assert scripted.requests == 2  # each paid once
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == [text, text]


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("text/event-stream", sse(START, {"type": "error", "error": {"type": "1301", "message": "unsafe content"}})),
        ("application/json", json.dumps({"error": {"code": "1301", "message": "unsafe content"}}).encode()),
    ],
    ids=["error-event-mid-stream", "error-object-with-200"],
)
def test_blocked_content_fails_its_row_at_once_whatever_status_it_came_with(
    make_job: Callable[..., JobFiles], scripted: Scripted, content_type: str, raw: bytes
) -> None:
    scripted.headers = {"content-type": content_type}
    scripted.body = raw
    files = make_job(
        rows=sample_rows(2), model={"endpoint": scripted.url, "stream": content_type != "application/json"}
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr
    assert scripted.requests == 2  # asked once each: asked again, it is blocked again
    out = pl.read_parquet(files.output)
    assert all("unsafe content" in message for message in out.get_column("error_message"))


@pytest.mark.parametrize("count", [-1, 1e300, 2**70, "12", None, True, float("nan")])
def test_both_wires_refuse_a_usage_count_that_is_no_token_count(count: object) -> None:
    """A batch result line and an online answer are priced from the same kind of count: a garbage one
    is refused alike (a batch line with 1e300 prompt tokens ended the run with exit 70)."""
    chat = {
        "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": count, "completion_tokens": 3},
    }
    with pytest.raises(BadResponse):
        answer_from_chat(chat, None)
    with pytest.raises(BadResponse):
        answer_from_message(message(usage={"input_tokens": count, "output_tokens": 3}), None)
    assert answer_from_chat({**chat, "usage": {"prompt_tokens": 12.0, "completion_tokens": 3}}, None).input_tokens == 12


def strict_turns(answer: dict[str, Any]) -> Callable[[dict[str, Any]], tuple[int, bytes]]:
    """An endpoint that answers a first ask with `answer`, and a repair turn with a valid label only if
    the turn is one the Messages API takes: every turn non-empty, every tool call's input an object and
    its id the one the tool result names, no empty text block; otherwise a 400, as Anthropic's validation
    answers."""

    def respond(body: dict[str, Any]) -> tuple[int, bytes]:
        if len(body["messages"]) == 1:
            return 200, json.dumps(answer).encode()
        called: set[str] = set()
        for turn in body["messages"]:
            blocks = (
                turn["content"] if isinstance(turn["content"], list) else [{"type": "text", "text": turn["content"]}]
            )
            called |= {b["id"] for b in blocks if b["type"] == "tool_use" and b.get("id")}
            answered = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
            if (
                not answered <= called
                or not blocks
                or any(
                    (b["type"] == "tool_use" and not isinstance(b["input"], dict))
                    or (b["type"] == "text" and not b["text"])
                    for b in blocks
                )
            ):
                error = {"type": "error", "error": {"type": "1214", "message": "messages: invalid content"}}
                return 400, json.dumps(error).encode()
        call = {"type": "tool_use", "id": "toolu_2", "name": body["tools"][0]["name"], "input": {"label": "positive"}}
        return 200, json.dumps(message(content=[call], stop_reason="tool_use")).encode()

    return respond


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "tool_use", "id": "toolu_1", "name": "record_answer", "input": '{"label": "posi'}],
        [{"type": "tool_use", "name": "record_answer", "input": "not json"}],
        [],
        [{"type": "text", "text": ""}],
    ],
    ids=["tool-input-not-json", "tool-call-without-id", "no-content", "empty-text"],
)
def test_an_answer_that_needs_repair_is_sent_back_as_a_turn_the_endpoint_takes(
    make_job: Callable[..., JobFiles], scripted: Scripted, content: list[dict[str, Any]]
) -> None:
    scripted.respond = strict_turns(message(content=content, stop_reason="tool_use"))
    files = make_job(
        rows=sample_rows(2),
        model={"endpoint": scripted.url},
        run={"concurrency": 1},
        output={"labels": ["positive", "negative"], "keep_columns": []},
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(files.output)
    assert out.get_column("label").to_list() == ["positive", "positive"]
    assert out.get_column("repairs").to_list() == [1, 1]


def test_an_answer_trickled_slower_than_the_timeout_is_cut_at_run_timeout_s(
    make_job: Callable[..., JobFiles], scripted: Scripted
) -> None:
    """run.timeout_s bounds a whole non-streamed answer: a byte every 20 ms keeps each read under the
    SDK's read timeout, and the answer (about 250 bytes) would take 5 s to come in whole."""
    scripted.body = json.dumps(message()).encode()
    scripted.trickle_s = 0.02
    files = make_job(rows=sample_rows(1), model={"endpoint": scripted.url}, run={"timeout_s": 1, "max_attempts": 1})
    result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr
    out = pl.read_parquet(files.output)
    assert out.get_column("error_type").to_list() == ["timeout"]
    assert summary(files)["cost"]["maybe_billed_twice"]["requests"] == 1


@pytest.mark.parametrize("code", ["1220", "1221", "1222"])
def test_an_api_the_endpoint_says_is_offline_or_missing_stops_the_run_with_rows_pending(
    make_job: Callable[..., JobFiles], scripted: Scripted, code: str
) -> None:
    """1220 (no permission), 1221 (API offline), 1222 (API missing): every row would be refused alike,
    so the run stops at the first (exit 3) instead of sending and failing each of them."""
    scripted.status = 400
    scripted.body = json.dumps({"error": {"code": code, "message": "API 已下线"}}).encode()
    files = make_job(rows=sample_rows(20), model={"endpoint": scripted.url}, run={"concurrency": 1})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr
    assert scripted.requests == 1
    assert not files.output.exists()  # nothing failed for good: a later run sends every row


@pytest.mark.parametrize("reason", ["sensitive", "refusal"])
def test_a_blocked_answer_fails_its_row_as_content_filter_on_the_online_wire_as_in_batches(
    make_job: Callable[..., JobFiles], scripted: Scripted, reason: str
) -> None:
    """Zhipu's `sensitive` and Anthropic's `refusal` end an answer the filter blocked; the batch wire
    maps `sensitive` to `refusal` and fails the row: the online wire must not keep it as an answer."""
    scripted.body = json.dumps(message(stop_reason=reason, content=[{"type": "text", "text": "I can"}])).encode()
    files = make_job(rows=sample_rows(2), model={"endpoint": scripted.url})
    assert cli("run", str(files.spec)).exit_code == 1
    out = pl.read_parquet(files.output)
    assert out.get_column("error_type").to_list() == ["content_filter", "content_filter"]
    assert scripted.requests == 2  # blocked again if asked again: never re-sent


@pytest.mark.parametrize(
    "body",
    [
        {"code": 1113, "msg": "余额不足", "success": False},
        {"type": "error", "error": {"type": "1113", "message": "余额不足"}},
    ],
    ids=["top-level-code", "anthropic"],
)
def test_doctor_reads_an_account_error_answered_with_200_as_the_refusal_it_is(
    scripted: Scripted, body: dict[str, Any]
) -> None:
    """doctor reported "key works, balance not in arrears, model answers" for every 200, whatever it held."""
    scripted.body = json.dumps(body).encode()
    result = cli("doctor", "--endpoint", scripted.url, "--model", "glm-4.6", "--json")
    assert result.exit_code == 3, result.stderr
    balance = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "balance")
    assert balance["ok"] is False
    assert scripted.requests == 1
