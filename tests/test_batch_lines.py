"""Batch input lines made once per request shape are the very bytes the row path makes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from runner.records import Request
from runner.send.batch.files import CHAT_URL, BatchFileWriter, _json_line, _kept, _Shapes
from runner.send.batch.native_request import UnsupportedParams, chat_body

TEXTS = st.sampled_from(
    ["Summarise: fine", "", 'quotes " and \\ back\nnew line\ttab \x00 \x7f', "ünïcödé — 日本語 🎉", "\ud800 lone",
     "\u0000glm-batch text\u0000", "\u0000glm-batch key\u0000", "\u2028 separators \u2029"]
) | st.text(max_size=30)  # fmt: skip
KEYS = st.sampled_from(["0f3a9c" * 5, 'say "hi"', "back\\slash", "评论-7", "\ud800", "\u0000glm-batch key\u0000"])
EXTRAS: list[dict[str, Any]] = [
    {},
    {"max_tokens": 64},
    {"system": "Be brief."},
    {"system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
    {"system": "\u0000glm-batch text\u0000"},
    {"stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 1024}},
    {"extra_body": {"temperature": 0.3, "top_p": 1e-05, "top_k": 3}},
    {"extra_body": {"seed": 2**70}},  # orjson refuses it; json writes it
    {"temperature": 0.5},  # no chat form: chat_body refuses it
    {
        "tools": [{"name": "record", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "record"},
    },
]


def row_path(request: Request) -> tuple[str, bytes, bytes]:
    """What write_round makes of a request without shapes: its model, batch line and kept body line."""
    body = chat_body(request.params)
    return (
        body["model"],
        _json_line({"custom_id": request.key, "method": "POST", "url": CHAT_URL, "body": body}),
        _kept(request.key, request.params),
    )


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(KEYS, TEXTS, st.booleans()), min_size=1, max_size=4),
    extra=st.sampled_from(EXTRAS),
    model=st.sampled_from(["glm-4-air-250414", "glm-4.6"]),
)
def test_a_shapes_lines_are_the_row_paths_bytes(
    rows: list[tuple[str, str, bool]], extra: dict[str, Any], model: str
) -> None:
    shapes = _Shapes(CHAT_URL)  # one for all the rows, as in a round
    for key, text, role_first in rows:
        turn = {"role": "user", "content": text} if role_first else {"content": text, "role": "user"}
        request = Request(key, {"model": model, **extra, "messages": [turn]})
        made = shapes.lines(request)
        try:
            expected = row_path(request)
        except (UnsupportedParams, UnicodeEncodeError):  # a lone surrogate: no UTF-8 line can hold it
            assert made is None  # the row path says what is wrong
            continue
        assert made is None or made == expected
        plain = (
            "\ud800" not in key + text and "seed" not in extra.get("extra_body", {}) and "glm-batch" not in repr(extra)
        )
        if plain and "temperature" not in extra:  # a template over rows: made once, filled in per row
            assert made is not None


def test_requests_of_another_form_go_the_row_path() -> None:
    shapes = _Shapes(CHAT_URL)
    two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    for messages in (two_turns, blocks, [{"role": "user", "content": "a", "extra": 1}]):
        assert shapes.lines(Request("k", {"model": "glm-4.6", "messages": messages})) is None


def test_a_custom_id_given_twice_in_two_files_is_refused_when_the_files_close(tmp_path: Any) -> None:
    body = {"model": "glm-4.6", "messages": [{"role": "user", "content": "hi"}]}
    writer = BatchFileWriter(tmp_path, max_requests=2)
    for key in ("a", "b", "c", "a"):
        writer.add(key, body)
    try:
        writer.close()
    except ValueError as exc:
        assert "request a: custom_id given twice" in str(exc)
    else:
        raise AssertionError("a custom_id given twice was not refused")
