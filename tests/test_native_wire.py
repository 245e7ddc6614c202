"""The native (chat-completions) wire: requests out, answers and result lines back, as tables of cases."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.job.structured import TOOL_NAME, AnswerShape
from runner.money.tokens import estimate_text
from runner.records import Answer, Answers
from runner.send.batch.native_answer import BadResultLine, answer_from_chat
from runner.send.batch.native_request import UnsupportedParams, chat_body
from runner.send.batch.native_results import ResultLine, classify_failure, parse_result_line, plain_result
from runner.send.retries import Verdict, bad_response_fault

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
TOOL = {"name": TOOL_NAME, "description": "Record the answer.", "input_schema": SCHEMA}
CHAT_TOOL = {
    "type": "function",
    "function": {"name": TOOL_NAME, "description": "Record the answer.", "parameters": SCHEMA},
}


def completion(message: dict[str, Any], finish: str = "stop", **usage: Any) -> dict[str, Any]:
    """A chat completion as Zhipu returns it, with usage overridable."""
    return {
        "id": "chatcmpl-1",
        "request_id": "req-body",
        "model": "glm-4.6",
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **message}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, **usage},
    }


# ---- chat_body ---------------------------------------------------------------------------------------

BASE = {"model": "glm-4.6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

CHAT_BODY_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "plain",
        BASE,
        {"model": "glm-4.6", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "system first, from text blocks",
        {**BASE, "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {
            "model": "glm-4.6",
            "max_tokens": 64,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        },
    ),
    (
        "sampling kept, top_k dropped, stop and thinking mapped",
        {
            **BASE,
            "extra_body": {"temperature": 0.0, "top_p": 0.9, "top_k": 40},
            "stop_sequences": ["END"],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        },
        {
            "model": "glm-4.6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.0,
            "top_p": 0.9,
            "stop": ["END"],
            "thinking": {"type": "enabled"},
        },
    ),
    (
        "thinking disabled",
        {**BASE, "thinking": {"type": "disabled"}},
        {**BASE, "thinking": {"type": "disabled"}},
    ),
    (
        "forced tool becomes auto (the only value the native API takes)",
        {**BASE, "tools": [TOOL], "tool_choice": {"type": "tool", "name": TOOL_NAME}},
        {**BASE, "tools": [CHAT_TOOL], "tool_choice": "auto"},
    ),
    (
        "tool_choice none sends no tools",
        {**BASE, "tools": [TOOL], "tool_choice": {"type": "none"}},
        BASE,
    ),
    (
        "user text blocks joined",
        {
            **BASE,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        },
        {**BASE, "messages": [{"role": "user", "content": "ab"}]},
    ),
    (
        "image block becomes an image_url part",
        {
            **BASE,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAA"}},
                    ],
                }
            ],
        },
        {
            **BASE,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAA"}},
                    ],
                }
            ],
        },
    ),
    (
        "transport options are not part of the body",
        {**BASE, "timeout": 30, "metadata": {"user_id": "x"}},
        BASE,
    ),
]


@pytest.mark.parametrize(("params", "expected"), [c[1:] for c in CHAT_BODY_CASES], ids=[c[0] for c in CHAT_BODY_CASES])
def test_chat_body(params: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each Messages-API request becomes the chat-completions body that asks the same thing. A request
    that does not ask for thinking says `disabled`: the native API's default is enabled."""
    assert chat_body(params) == {"thinking": {"type": "disabled"}, **expected}


def test_chat_body_is_json_and_leaves_params_alone() -> None:
    """The body serializes as JSON (it goes into a JSONL line) and the caller's params are not mutated."""
    params = {**BASE, "tools": [TOOL], "tool_choice": {"type": "tool", "name": TOOL_NAME}, "extra_body": {"top_k": 3}}
    before = json.dumps(params, sort_keys=True)
    json.dumps(chat_body(params))
    assert json.dumps(params, sort_keys=True) == before


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({**BASE, "service_tier": "auto"}, "service_tier"),
        ({"model": "glm-4.6"}, "messages"),
        ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({**BASE, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
        ({**BASE, "messages": [{"role": "user", "content": 3}]}, "content"),
        ({**BASE, "thinking": {"type": "sometimes"}}, "thinking"),
        ({**BASE, "system": [{"type": "image"}]}, "system"),
        ({**BASE, "tools": [{"description": "nameless"}]}, "name"),
    ],
)
def test_chat_body_refuses_what_it_cannot_translate(params: dict[str, Any], fragment: str) -> None:
    """A field or block with no faithful translation is refused by name, never silently dropped."""
    with pytest.raises(UnsupportedParams, match=fragment):
        chat_body(params)


# ---- answer_from_chat --------------------------------------------------------------------------------

ANSWER_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "text",
        completion({"content": "positive"}),
        {
            "text": "positive",
            "thinking": None,
            "stop_reason": "end_turn",
            "input_tokens": 100,
            "output_tokens": 20,
            "cache_read_input_tokens": None,
            "request_id": "req-line",
            "model": "glm-4.6",
            "thinking_tokens": 0,
            "content": ({"type": "text", "text": "positive"},),
        },
    ),
    (
        "reasoning with reported tokens, cache reads taken out of input",
        completion(
            {"content": "ok", "reasoning_content": "Let me think."},
            prompt_tokens_details={"cached_tokens": 60},
            completion_tokens_details={"reasoning_tokens": 7},
        ),
        {
            "text": "ok",
            "thinking": "Let me think.",
            "input_tokens": 40,
            "cache_read_input_tokens": 60,
            "thinking_tokens": 7,
            "content": (
                {"type": "thinking", "thinking": "Let me think.", "signature": ""},
                {"type": "text", "text": "ok"},
            ),
        },
    ),
    (
        "reasoning without reported tokens is estimated",
        completion({"content": "ok", "reasoning_content": "x" * 40}),
        {"thinking_tokens": round(estimate_text("x" * 40))},
    ),
    (
        "length and sensitive stops",
        completion({"content": "cut"}, finish="length"),
        {"stop_reason": "max_tokens"},
    ),
    ("sensitive", completion({"content": ""}, finish="sensitive"), {"stop_reason": "refusal", "content": ()}),
    ("unknown finish kept", completion({"content": "x"}, finish="network_error"), {"stop_reason": "network_error"}),
    (
        "tool call, null content",
        completion(
            {
                "content": None,
                "tool_calls": [
                    {"id": "call_7", "type": "function", "function": {"name": TOOL_NAME, "arguments": '{"label":"a"}'}}
                ],
            },
            finish="tool_calls",
        ),
        {
            "text": "",
            "stop_reason": "tool_use",
            "tool_input": {"label": "a"},
            "tool_use_id": "call_7",
            "content": ({"type": "tool_use", "id": "call_7", "name": TOOL_NAME, "input": {"label": "a"}},),
        },
    ),
    (
        "unparseable arguments kept as text, missing id invented",
        completion({"tool_calls": [{"type": "function", "function": {"name": TOOL_NAME, "arguments": '{"label":'}}]}),
        {"tool_input": '{"label":', "tool_use_id": "call_0"},
    ),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in ANSWER_CASES], ids=[c[0] for c in ANSWER_CASES])
def test_answer_from_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    """A chat completion reads as the same Answer the online wire would give."""
    answer = answer_from_chat(body, "req-line")
    assert {name: getattr(answer, name) for name in expected} == expected


def test_answer_request_id_falls_back_to_the_body() -> None:
    """Without the line's request id, the body's own id identifies the answer."""
    assert answer_from_chat(completion({"content": "x"}), None).request_id == "req-body"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("<html>502</html>", None),
        ([1, 2], None),
        ({"error": {"code": "1113", "message": "余额不足"}}, "1113"),
        ({"error": {"type": "1302", "message": "rate"}}, "1302"),
        ({"choices": []}, None),
        ({"choices": [None]}, None),
        ({"choices": [{"message": "text"}]}, None),
        ({"choices": [{"message": {"content": "x"}}]}, None),  # no usage, and no request to estimate it from
        ({"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "7", "completion_tokens": 1}}, None),
        ({"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": True, "completion_tokens": 1}}, None),
    ],
)
def test_answer_from_chat_refuses_non_completions(body: Any, code: str | None) -> None:
    """Anything that is not a chat completion raises BadResultLine with Zhipu's code, never KeyError."""
    with pytest.raises(BadResultLine) as caught:
        answer_from_chat(body, None)
    assert caught.value.code == code


def test_bad_result_line_classifies_like_a_bad_response() -> None:
    """The one retry layer already knows BadResultLine: billing codes abort, anything else retries."""
    assert bad_response_fault(BadResultLine("1113", "no balance")).verdict is Verdict.ABORT
    assert bad_response_fault(BadResultLine(None, "html")).verdict is Verdict.RETRY


def test_repair_conversation_round_trip() -> None:
    """A tool answer that fails validation is repaired through structured.repair and re-sent natively.

    The repair turn (assistant tool_use + user tool_result) must come out as an assistant message with
    tool_calls followed by a tool message naming the same call, and thinking must not be sent back.
    """
    shape = AnswerShape(SCHEMA, "tool", max_repairs=1, label_field=None)
    params = shape.ask({**BASE, "system": "Label it."})
    first = answer_from_chat(
        completion(
            {
                "content": "Here.",
                "reasoning_content": "hmm",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": TOOL_NAME, "arguments": "{}"}}
                ],
            },
            finish="tool_calls",
        ),
        None,
    )
    with pytest.raises(Exception, match="label"):
        shape.check(first)
    repaired = shape.repair(params, first, "(top level): 'label' is a required property")
    body = chat_body(repaired)
    assert body["tool_choice"] == "auto"
    assert body["messages"][:2] == [{"role": "system", "content": "Label it."}, {"role": "user", "content": "hi"}]
    assistant, tool = body["messages"][2:]
    assert assistant == {
        "role": "assistant",
        "content": "Here.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": TOOL_NAME, "arguments": "{}"}}],
    }
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_1"
    assert "label" in tool["content"]

    # The unparseable-arguments answer goes back exactly as the model wrote it.
    torn = answer_from_chat(
        completion({"tool_calls": [{"id": "c", "function": {"name": TOOL_NAME, "arguments": "{oops"}}]}), None
    )
    again = chat_body(shape.repair(params, torn, "not an object"))
    assert again["messages"][2]["tool_calls"][0]["function"]["arguments"] == "{oops"
    assert "content" not in again["messages"][2]  # a pure tool call: no empty text sent

    # A text-mode repair turn (no tool call) is a plain user message.
    text_answer = Answer(
        "no json", None, "end_turn", 1, 1, None, None, None, None, content=({"type": "text", "text": "no json"},)
    )
    text_body = chat_body(AnswerShape(SCHEMA, "text", 1, None).repair(BASE, text_answer, "no JSON"))
    assert [m["role"] for m in text_body["messages"]] == ["user", "assistant", "user"]


# ---- result lines ------------------------------------------------------------------------------------

OK_LINE = {
    "id": "batch_req_1",
    "custom_id": "a" * 32,
    "response": {"status_code": 200, "request_id": "req-9", "body": completion({"content": "yes"})},
}

LINE_CASES: list[tuple[str, bytes | str, dict[str, Any]]] = [
    (
        "success",
        json.dumps(OK_LINE).encode() + b"\n",
        {"custom_id": "a" * 32, "status_code": 200, "request_id": "req-9", "line_id": "batch_req_1", "ok": True},
    ),
    (
        "success as str, body given as a JSON string",
        json.dumps(
            {"custom_id": "k", "response": {"status_code": 200, "body": json.dumps(completion({"content": "y"}))}}
        ),
        {"custom_id": "k", "ok": True, "request_id": "req-body"},
    ),
    (
        "error status with an error body (native shape)",
        json.dumps(
            {"custom_id": "k", "response": {"status_code": 400, "body": {"error": {"code": "1214", "message": "bad"}}}}
        ),
        {"custom_id": "k", "status_code": 400, "error_code": "1214", "error_message": "bad", "ok": False},
    ),
    (
        "error with numeric code at top level (OpenAI shape)",
        json.dumps({"custom_id": "k", "response": None, "error": {"code": 1113, "message": "余额不足"}}),
        {"custom_id": "k", "error_code": "1113", "ok": False, "problem": None},
    ),
    (
        "error as a bare string",
        json.dumps({"custom_id": "k", "error": "batch expired"}),
        {"error_code": None, "error_message": "batch expired", "ok": False},
    ),
    ("html", b"<html><body>502 Bad Gateway</body></html>", {"custom_id": None, "ok": False}),
    (
        "truncated JSON keeps its custom_id",
        json.dumps(OK_LINE).encode()[:80],
        {"custom_id": "a" * 32, "ok": False},
    ),
    ("empty", b"  \n", {"custom_id": None, "problem": "empty line"}),
    ("not an object", b"[1, 2]", {"custom_id": None, "ok": False}),
    ("invalid utf-8", b'{"custom_id": "\xff\xfe"}', {"ok": False}),
    ("no custom_id", json.dumps({"response": OK_LINE["response"]}), {"problem": "no custom_id", "ok": False}),
    ("nothing in it", json.dumps({"custom_id": "k"}), {"problem": "neither a response nor an error", "ok": False}),
    ("response not an object", json.dumps({"custom_id": "k", "response": "oops"}), {"custom_id": "k", "ok": False}),
    (
        "missing choices stays ok here and is refused by answer_from_chat",
        json.dumps({"custom_id": "k", "response": {"status_code": 200, "body": {"usage": {}}}}),
        {"ok": True},
    ),
]


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES])
def test_parse_result_line(line: bytes | str, expected: dict[str, Any]) -> None:
    """Every line parses to a ResultLine, whatever it holds; unreadable ones say why."""
    parsed = parse_result_line(line)
    assert {name: getattr(parsed, name) for name in expected} == expected
    if not parsed.ok and parsed.error_code is None and parsed.error_message is None:
        assert parsed.problem


def test_success_line_reads_as_an_answer() -> None:
    """The success line's body and request id make the Answer."""
    parsed = parse_result_line(json.dumps(OK_LINE))
    assert parsed.body is not None
    answer = answer_from_chat(parsed.body, parsed.request_id)
    assert (answer.text, answer.request_id) == ("yes", "req-9")


def test_null_content_line_reads_as_empty_text() -> None:
    """A completion with null content and no tool call is an empty answer, not a crash."""
    parsed = parse_result_line(
        json.dumps({"custom_id": "k", "response": {"status_code": 200, "body": completion({"content": None})}})
    )
    assert parsed.body is not None
    assert answer_from_chat(parsed.body, None).text == ""


FAILURE_CASES: list[tuple[str, ResultLine, Verdict]] = [
    ("no balance", ResultLine("k", 429, error_code="1113"), Verdict.ABORT),
    ("plan exhausted", ResultLine("k", None, error_code="1308"), Verdict.ABORT),
    ("bad key", ResultLine("k", 401), Verdict.ABORT),
    ("concurrency", ResultLine("k", 429, error_code="1302"), Verdict.RETRY),
    ("overload in a 200", ResultLine("k", 200, error_code="1305"), Verdict.RETRY),
    ("server error", ResultLine("k", 500), Verdict.RETRY),
    ("gateway", ResultLine("k", 504, error_code="x"), Verdict.RETRY),
    ("request timeout", ResultLine("k", 408), Verdict.RETRY),
    ("expired", ResultLine("k", None, error_code="batch_expired", error_message="not run"), Verdict.RETRY),
    ("cancelled by message", ResultLine("k", None, error_message="request cancelled"), Verdict.RETRY),
    ("unreadable", ResultLine(None, problem="not JSON"), Verdict.RETRY),
    ("bad params", ResultLine("k", 400, error_code="1214"), Verdict.FAIL),
    ("prompt too long", ResultLine("k", 400, error_code="1261"), Verdict.FAIL),
    ("sensitive", ResultLine("k", None, error_code="1301"), Verdict.FAIL),
    ("unknown code", ResultLine("k", None, error_code="invalid_request"), Verdict.FAIL),
]


@pytest.mark.parametrize(("line", "verdict"), [c[1:] for c in FAILURE_CASES], ids=[c[0] for c in FAILURE_CASES])
def test_classify_failure(line: ResultLine, verdict: Verdict) -> None:
    """Failed lines split into retry later, fail the row, and abort the run."""
    assert classify_failure(line) is verdict


# ---- the plain-answer fast path ----------------------------------------------------------------------

# Values a field of a result line may take, JSON's usual and unusual: each path of a plain line below is
# set to one of them (or removed), and the fast path must read the line exactly as the general one does.
ODD_VALUES: list[Any] = [None, True, False, 0, 200, -1, 12.0, 12.5, 2**70, "", "200", "x", [], [1], {}, {"a": 1}]
PATHS: list[tuple[str, ...]] = [
    ("custom_id",), ("error",), ("response",), ("response", "status_code"), ("response", "request_id"),
    ("response", "body"), ("response", "body", "error"), ("response", "body", "model"),
    ("response", "body", "request_id"), ("response", "body", "id"), ("response", "body", "choices"),
    ("response", "body", "choices", 0), ("response", "body", "choices", 0, "finish_reason"),
    ("response", "body", "choices", 0, "message"), ("response", "body", "choices", 0, "message", "content"),
    ("response", "body", "choices", 0, "message", "reasoning_content"),
    ("response", "body", "choices", 0, "message", "tool_calls"), ("response", "body", "usage"),
    ("response", "body", "usage", "prompt_tokens"), ("response", "body", "usage", "completion_tokens"),
    ("response", "body", "usage", "prompt_tokens_details"),
    ("response", "body", "usage", "prompt_tokens_details", "cached_tokens"),
    ("response", "body", "usage", "completion_tokens_details", "reasoning_tokens"),
]  # fmt: skip
DROP = object()


def _has(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return isinstance(step, str) and step in container
    return isinstance(container, list) and isinstance(step, int) and step < len(container)


def _set(line: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set (or with DROP remove) the value at `path` where the line's shape still has it."""
    *head, last = path
    for step in head:
        if not _has(line, step):
            return
        line = line[step]
    if value is DROP:
        if _has(line, last):
            del line[last]
    elif isinstance(line, dict) or _has(line, last):
        line[last] = copy.deepcopy(value)  # never the shared object: no line may hold itself


def _general(raw: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """What the general reader makes of a line, when it is a plain answer: its key and Answers' fields."""
    line = parse_result_line(raw)
    if not line.ok or line.custom_id is None or line.problem is not None:
        return None
    try:
        answer = answer_from_chat(line.body, line.request_id)
    except BadResultLine:
        return None
    if answer.tool_input is not None or answer.stop_reason in ("network_error", "refusal"):
        return None
    block = Answers(dt.datetime.now(dt.UTC), "batch")
    block.add(line.custom_id, answer, 1)
    fields = (block.model, block.response_text, block.thinking, block.stop_reason, block.input_tokens,
              block.output_tokens, block.thinking_tokens, block.cache_read_input_tokens, block.request_id)  # fmt: skip
    return line.custom_id, tuple(column[0] for column in fields)


@settings(max_examples=400, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(PATHS), st.sampled_from([DROP, *ODD_VALUES, "stop", "length", "sensitive"])),
        max_size=3,
    ),
    thinking=st.sampled_from([None, "", "I think so."]),
    details=st.booleans(),
    finish=st.sampled_from(["stop", "length", "sensitive", "network_error", "tool_calls", "other", None, 7]),
)
def test_the_plain_answer_fast_path_reads_every_line_as_the_general_reader_does(
    changes: list[tuple[tuple[str, ...], Any]], thinking: str | None, details: bool, finish: Any
) -> None:
    line = copy.deepcopy(OK_LINE)
    line["response"]["body"]["choices"][0]["finish_reason"] = finish
    line["response"]["body"]["choices"][0]["message"]["reasoning_content"] = thinking
    if details:  # cache reads and reasoning tokens reported
        usage = line["response"]["body"]["usage"]
        usage.update(prompt_tokens_details={"cached_tokens": 40}, completion_tokens_details={"reasoning_tokens": 5})
    for path, value in changes:
        _set(line, path, value)
    raw = json.dumps(line).encode() + b"\n"
    fast = plain_result(raw)
    if fast is not None:  # taken at once: exactly what the general reader would have delivered
        assert fast == _general(raw)
    if not changes and finish in ("stop", "length"):  # the line a batch nearly always gives: the fast path
        assert fast is not None and fast == _general(raw)


def test_lines_only_the_general_reader_takes_are_left_to_it() -> None:
    base = json.dumps(OK_LINE)
    for raw in (
        base.replace('"status_code": 200', '"status_code": 200.0').encode(),  # json takes it; orjson too, as float
        base.replace('"yes"', "NaN").encode(),  # orjson refuses NaN; json reads it
        base.encode()[:-5],  # torn
        b'{"custom_id": "k", "custom_id": "k2", ' + base.encode()[1:],  # a repeated key
    ):
        fast = plain_result(raw)
        assert fast is None or fast == _general(raw)
