"""What the wire sends, fuzzed: a batch result body and a stream's last bytes, whatever they hold, are
read into an Answer that can be priced (never a count of 0 for what was said, every estimate named) or
refused by the one exception the callers handle; never KeyError, TypeError or a crash."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from runner.send.batch.native_answer import BadResultLine, UsageMissing, answer_from_chat
from runner.send.client import stream_error
from tests.test_fuzz import FUZZ

PROMPT = {"system": "Be brief.", "messages": [{"role": "user", "content": "Summarise: a fine product"}]}

counts = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=1 << 40),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.booleans(),
)
usages = st.one_of(
    st.none(),
    st.just("absent"),
    st.text(max_size=5),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": counts,
            "completion_tokens": counts,
            "prompt_tokens_details": st.one_of(st.none(), st.fixed_dictionaries({"cached_tokens": counts})),
        },
    ),
)
texts = st.one_of(st.none(), st.text(max_size=40), st.integers())
calls = st.lists(
    st.fixed_dictionaries(
        {"function": st.fixed_dictionaries({"name": texts, "arguments": st.one_of(texts, st.just('{"a": 1}'))})},
        optional={"id": texts},
    ),
    max_size=2,
)
messages = st.fixed_dictionaries({}, optional={"content": texts, "reasoning_content": texts, "tool_calls": calls})


@FUZZ
@given(
    message=messages,
    usage=usages,
    finish=st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", "sensitive", "network_error"])),
    with_prompt=st.booleans(),
)
def test_fuzzed_batch_bodies_are_priced_with_named_estimates_or_refused(
    message: dict[str, Any], usage: Any, finish: str | None, with_prompt: bool
) -> None:
    body: dict[str, Any] = {"choices": [{"message": message, "finish_reason": finish}], "model": "glm-4-air-250414"}
    if usage != "absent":
        body["usage"] = usage
    try:
        answer = answer_from_chat(body, None, PROMPT if with_prompt else None)
    except UsageMissing:
        assert not with_prompt
        return
    except BadResultLine:
        return
    estimated = answer.usage_estimated or ""
    assert answer.input_tokens >= 0 and answer.output_tokens >= 0
    assert 0 <= answer.thinking_tokens <= answer.output_tokens
    if answer.content:  # it said something: never billed as nothing
        assert answer.output_tokens >= 1
    said = usage if isinstance(usage, dict) else {}
    if said.get("prompt_tokens") is None:
        assert "input_tokens" in estimated and answer.input_tokens >= 1
    if said.get("completion_tokens") is None:
        assert "output_tokens" in estimated and answer.output_tokens >= 1


@FUZZ
@given(
    head=st.binary(max_size=200),
    last=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                {"error": {"code": "1113", "message": "arrears"}},
                {"type": "error", "error": {"type": "1302", "message": "busy"}},
                {"type": "message_stop"},
                {"error": "text"},
                [1, 2],
            ]
        ).map(lambda data: b"data: " + json.dumps(data).encode() + b"\n\n"),
    ),
    crlf=st.booleans(),
)
def test_fuzzed_stream_tails_give_a_code_only_for_an_error_object(head: bytes, last: bytes, crlf: bool) -> None:
    tail = head + b"\n\n" + last
    if crlf:
        tail = tail.replace(b"\n", b"\r\n")
    said = stream_error(tail)
    if said is not None:
        code, message = said
        assert code and message
    if last.startswith(b'data: {"error": {"code": "1113"'):
        assert said == ("1113", "arrears")
    if last.startswith(b'data: {"type": "message_stop"}'):
        assert said is None
