"""Reading a chat completion back as the same Answer the online wire gives (OpenAI-style usage turned
into Anthropic's: `prompt_tokens` includes cached tokens, `input_tokens` does not). Pure functions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from runner.money.tokens import MAX_TOKEN_COUNT, estimate_answer, estimate_request, estimate_text, token_count
from runner.records import Answer
from runner.send.retries import BadResponse, error_parts

# finish_reason -> Anthropic stop_reason. `sensitive` is Zhipu's content-filter stop (API code 1301's
# streaming form); Anthropic's nearest is `refusal`. Unknown reasons (`network_error`, ...) are kept
# as they come so nothing is hidden.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "sensitive": "refusal"}


class BadResultLine(BadResponse):
    """A result whose body is not a chat completion; a BadResponse, so bad_response_fault aborts on a
    billing or auth code and retries otherwise."""


class UsageMissing(BadResultLine):
    """A chat completion without its prompt's token count, estimable only from the request's body: ask
    again with `prompt`. The answer was generated and billed."""


def answer_from_chat(body: Any, request_id: str | None, prompt: Mapping[str, Any] | None = None) -> Answer:
    """The Answer in a chat-completion object, `content` in Messages-API form (so a repair can continue
    the conversation); tool arguments that are not JSON are kept as text. A count the body leaves out is
    estimated as the online wire does (never 0, named in `usage_estimated`), the input from `prompt`;
    without it, UsageMissing. BadResultLine (with Zhipu's code for an error object) for anything else;
    never KeyError or TypeError."""
    # `type(x) is dict or`: what JSON gives, checked before the (slower) Mapping check; once per line.
    if not (type(body) is dict or isinstance(body, Mapping)):
        raise BadResultLine(None, f"result body is not a JSON object but {type(body).__name__}")
    if isinstance(body.get("error"), Mapping):
        code, message, _ = error_parts(body)
        raise BadResultLine(code, f"result body is an error: {message or code or 'no message'}")
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not (type(choice) is dict or isinstance(choice, Mapping)):
        raise BadResultLine(None, "result body has no choices: not a chat completion")
    message = choice.get("message")
    if not (type(message) is dict or isinstance(message, Mapping)):
        raise BadResultLine(None, "result body's first choice has no message")
    usage = body.get("usage")
    if not (type(usage) is dict or isinstance(usage, Mapping)):
        usage = {}
    said = {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens")}
    if any(value is not None and token_count(value) is None for value in said.values()):
        raise BadResultLine(None, f"result body's usage holds a count that is not one: {said}")
    prompt_tokens = token_count(said["prompt_tokens"])
    completion_tokens = token_count(said["completion_tokens"])
    cached = token_count(_get(usage, "prompt_tokens_details", "cached_tokens"))
    estimated: list[str] = []
    if prompt_tokens is None or (prompt_tokens == 0 and not cached):  # a prompt is never 0 tokens
        if prompt is None:
            raise UsageMissing(None, "result body has no prompt_tokens: estimated from the request")
        prompt_tokens = estimate_request(dict(prompt))
        estimated.append("input_tokens")
    reasoning_reported = token_count(_get(usage, "completion_tokens_details", "reasoning_tokens"))

    text = message.get("content")
    text = text if isinstance(text, str) else ""  # null content is normal alongside tool calls
    thinking = message.get("reasoning_content")
    thinking = thinking if isinstance(thinking, str) and thinking else None

    blocks: list[dict[str, Any]] = []
    if thinking is not None:
        # The native API gives no signature; the Messages form wants the field, empty is accepted.
        blocks.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text:
        blocks.append({"type": "text", "text": text})
    tool_input: Any = None
    tool_use_id: str | None = None
    calls = message.get("tool_calls")
    for index, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        raw_id = call.get("id")
        # A repair turn must name the call it answers; invent a stable id if the endpoint gave none.
        call_id = str(raw_id) if raw_id else f"call_{index}"
        arguments = _arguments(function.get("arguments"))
        blocks.append({"type": "tool_use", "id": call_id, "name": str(function.get("name") or ""), "input": arguments})
        if tool_use_id is None:
            tool_input, tool_use_id = arguments, call_id

    if completion_tokens is None or (completion_tokens == 0 and blocks):
        completion_tokens = estimate_answer(blocks)
        estimated.append("output_tokens")
    finish = choice.get("finish_reason")
    stop_reason = _STOP_REASONS.get(finish, finish) if isinstance(finish, str) else None
    thinking_tokens = (
        reasoning_reported if reasoning_reported is not None else round(estimate_text(thinking)) if thinking else 0
    )
    model = body.get("model")
    body_request_id = body.get("request_id") or body.get("id")
    return Answer(
        text=text,
        thinking=thinking,
        stop_reason=stop_reason,
        # Anthropic's input_tokens excludes cache reads (pricing adds them at the cached rate);
        # OpenAI-style prompt_tokens includes them.
        input_tokens=max(prompt_tokens - (cached or 0), 0),
        output_tokens=completion_tokens,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=None,  # the native API reports no cache writes (none are billed)
        request_id=request_id or (str(body_request_id) if body_request_id else None),
        model=str(model) if model else None,
        thinking_tokens=min(thinking_tokens, completion_tokens),  # an estimate never above what was billed
        tool_input=tool_input,
        tool_use_id=tool_use_id,
        content=tuple(blocks),
        usage_estimated=", ".join(estimated) or None,
    )


# A plain answer's fields, in Answers' column order after the key: model, text, thinking, stop_reason,
# input_tokens, output_tokens, thinking_tokens, cache_read_input_tokens, request_id.
PlainChat = tuple[str | None, str, str | None, str | None, int, int, int, int, str | None]


def plain_chat(body: dict[str, Any], request_id: str | None) -> PlainChat | None:
    """The fields answer_from_chat would give a plain text answer (free text, no tool call, not cut off or
    blocked; JSON's own types only), without making the Answer: the fast path of nearly every result
    line. None for any other body, which answer_from_chat then reads (or refuses) as always."""
    choices, usage = body.get("choices"), body.get("usage")
    if body.get("error") is not None or type(choices) is not list or not choices or type(usage) is not dict:
        return None
    choice = choices[0]
    message = choice.get("message") if type(choice) is dict else None
    if type(message) is not dict or message.get("tool_calls"):
        return None
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (type(prompt_tokens) is int and type(completion_tokens) is int):  # the usual: skip the calls
        prompt_tokens, completion_tokens = token_count(prompt_tokens), token_count(completion_tokens)
        if prompt_tokens is None or completion_tokens is None:
            return None
    elif not (0 <= prompt_tokens <= MAX_TOKEN_COUNT and 0 <= completion_tokens <= MAX_TOKEN_COUNT):
        return None
    if prompt_tokens == 0 or completion_tokens == 0:  # a count to estimate: answer_from_chat's job
        return None
    finish = choice.get("finish_reason")
    stop_reason = _STOP_REASONS.get(finish, finish) if type(finish) is str else None
    if stop_reason == "network_error" or stop_reason == "refusal":
        return None
    details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    cached = token_count(_get(usage, "prompt_tokens_details", "cached_tokens")) if details[0] is not None else None
    reasoning_reported = (
        token_count(_get(usage, "completion_tokens_details", "reasoning_tokens")) if details[1] is not None else None
    )
    text = message.get("content")
    thinking = message.get("reasoning_content")
    thinking = thinking if type(thinking) is str and thinking else None
    thinking_tokens = (
        reasoning_reported if reasoning_reported is not None else round(estimate_text(thinking)) if thinking else 0
    )
    model = body.get("model")
    body_request_id = body.get("request_id") or body.get("id")
    return (
        str(model) if model else None,
        text if type(text) is str else "",
        thinking,
        stop_reason,
        max(prompt_tokens - (cached or 0), 0),
        completion_tokens,
        min(thinking_tokens, completion_tokens),
        cached or 0,
        request_id or (str(body_request_id) if body_request_id else None),
    )


def _get(mapping: Mapping[str, Any], *path: str) -> Any:
    value: Any = mapping
    for name in path:
        if value is None or not (type(value) is dict or isinstance(value, Mapping)):
            return None
        value = value.get(name)
    return value


def _arguments(raw: Any) -> Any:
    if isinstance(raw, Mapping):  # some gateways send the object itself
        return dict(raw)
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw
