"""The native wire: a Messages-API request as a Zhipu `/v4/chat/completions` body, and back.

    body = chat_body(request.params)                      # one Batch API input line's `body`
    line = parse_result_line(raw)                         # one output- or error-file line
    if line.ok:
        answer = answer_from_chat(line.body, line.request_id)
    else:
        verdict = classify_failure(line)                  # RETRY | FAIL | ABORT

Zhipu's Batch API lives on its native, OpenAI-style API, not on the Anthropic-compatible endpoint the
online path uses, so the same Request has to be spoken in a second dialect. Everything here is a pure
function over dicts: no I/O, no clock, so the executor can call it from any thread.

Differences the translation handles (see shared/reference/batch.md, wire.md):
- the system prompt is a `{"role": "system"}` message; tool calls and tool results are OpenAI-shaped;
- usage is `prompt_tokens` (which *includes* cached tokens) / `completion_tokens`; an Answer's
  `input_tokens` excludes the cached ones, as Anthropic reports it and as pricing expects;
- `tool_choice`: the native API accepts only `"auto"` (see `chat_body`);
- `top_k` does not exist on the native API and is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.money.tokens import estimate_text
from runner.records import Answer
from runner.send.retries import ABORT_CODES, BadResponse, Verdict

__all__ = [
    "BadResultLine",
    "ResultLine",
    "UnsupportedParams",
    "answer_from_chat",
    "chat_body",
    "classify_failure",
    "parse_result_line",
]

# The Messages-API parameters `chat_body` understands. Anything else is refused rather than dropped:
# a request that silently lost a field would be a different request under the same key.
_KNOWN_PARAMS = frozenset(
    {"model", "max_tokens", "system", "messages", "stop_sequences", "thinking", "tools", "tool_choice", "extra_body"}
)
# Transport options of the SDK call, not part of what the model sees.
_TRANSPORT_PARAMS = frozenset({"timeout", "metadata", "stream"})

# finish_reason -> Anthropic stop_reason. `sensitive` is Zhipu's content-filter stop (API code 1301's
# streaming form); Anthropic's nearest is `refusal`. Unknown reasons (`network_error`, ...) are kept
# as they come so nothing is hidden.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "sensitive": "refusal"}

# Business codes that mean "try again later": rate, concurrency and overload limits, and Zhipu's own
# internal or network errors.
_TRANSIENT_CODES = frozenset({"500", "1230", "1234", "1302", "1303", "1304", "1305"})
# What the batch machinery writes for a request it never ran: it was not the request's fault.
_NOT_PROCESSED = re.compile(r"expire|cancel|timeout|timed_out|not_processed|not processed", re.I)

_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"([^"\\]{1,256})"')


class UnsupportedParams(ValueError):
    """A Messages-API request that has no faithful chat-completions form (an unknown field or block)."""


class BadResultLine(BadResponse):
    """A result whose body is not a chat completion (an error object, HTML, a torn line...).

    A BadResponse, so `runner.send.retries.bad_response_fault` already knows what to do with it: abort on a
    billing or auth code, retry otherwise.
    """


# --------------------------------------------------------------------------------------------------
# Request: Messages-API params -> chat-completions body


def chat_body(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `/v4/chat/completions` body that asks the same thing as these `messages.create` params.

    Conversions: the system prompt becomes the first message; text blocks are joined; an assistant
    turn's `tool_use` blocks become `tool_calls` (arguments as a JSON string); a user turn's
    `tool_result` blocks become `{"role": "tool"}` messages; thinking blocks are dropped from history
    (the native API takes no reasoning back); images become `image_url` parts.

    `tool_choice`: the native API accepts only `"auto"`: zai-sdk types the parameter as a plain `str`,
    and Z.AI answers a named function or `"required"` with `400 "Tool choice must be auto"`
    (vectorize-io/hindsight#4246, xorbitsai/xagent#1960, github/copilot-cli#4646). So a forced tool
    (`{"type": "tool", "name": X}`) or `{"type": "any"}` is sent as `"auto"` with the tool list as
    given; the structured-answer path validates every answer and repairs one that did not call the
    tool (runner.job.structured). `{"type": "none"}` sends no tools at all, since there is no native
    way to forbid calling them. No `response_format` is added: the Messages params have no such field,
    and whether batch honours `json_object` is unconfirmed; validation covers both.

    Raises UnsupportedParams for a field or block this translation does not know.
    """
    unknown = set(params) - _KNOWN_PARAMS - _TRANSPORT_PARAMS
    if unknown:
        raise UnsupportedParams(f"no chat-completions form for request field(s): {', '.join(sorted(unknown))}")
    if "model" not in params or "messages" not in params:
        raise UnsupportedParams("a request needs `model` and `messages`")

    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if system:
        messages.append({"role": "system", "content": _joined_text(system, "system")})
    for index, message in enumerate(params["messages"]):
        messages.extend(_chat_messages(message, index))

    body: dict[str, Any] = {"model": params["model"], "messages": messages}
    if "max_tokens" in params:
        body["max_tokens"] = params["max_tokens"]
    if params.get("stop_sequences"):
        body["stop"] = list(params["stop_sequences"])
    thinking = params.get("thinking")
    if thinking:
        kind = thinking.get("type") if isinstance(thinking, Mapping) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            raise UnsupportedParams(f"thinking: unknown type {kind!r}")
        # The native API has an on/off switch only (no budget); adaptive thinking is "on, the model
        # decides how much", which is what `enabled` does there.
        body["thinking"] = {"type": "disabled" if kind == "disabled" else "enabled"}
    for name, value in (params.get("extra_body") or {}).items():
        if name == "top_k":
            continue  # the native chat API has no top_k; the request is sent without it
        # temperature, top_p, and any raw body field a caller put here: extra_body *is* body fields.
        body[name] = value

    tools = params.get("tools")
    choice = params.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, Mapping) else None
    if tools and choice_type != "none":
        body["tools"] = [_chat_tool(tool) for tool in tools]
        body["tool_choice"] = "auto"  # the only value the native API accepts: see the docstring
    return body


def _joined_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts: list[str] = []
        for block in content:
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise UnsupportedParams(f"{where}: only text blocks are allowed here, got {_block_type(block)}")
            parts.append(str(block.get("text", "")))
        return "".join(parts)
    raise UnsupportedParams(f"{where}: content must be a string or a list of blocks")


def _block_type(block: Any) -> str:
    return repr(block.get("type")) if isinstance(block, Mapping) else type(block).__name__


def _chat_messages(message: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    """One Messages-API turn as one or more chat messages (a turn of tool results becomes several)."""
    where = f"messages[{index}]"
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise UnsupportedParams(f"{where}: role must be user or assistant, got {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, (list, tuple)):  # an Answer's content is a tuple
        raise UnsupportedParams(f"{where}: content must be a string or a list of blocks")
    return _assistant_turn(content, where) if role == "assistant" else _user_turn(content, where)


def _assistant_turn(blocks: Sequence[Any], where: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the native API takes no reasoning back in history
        elif kind == "tool_use":
            raw = block.get("input")
            # An unparseable call came back as its raw text (see answer_from_chat): send it back as it was.
            arguments = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        else:
            raise UnsupportedParams(f"{where}: no chat-completions form for an assistant {_block_type(block)} block")
    out: dict[str, Any] = {"role": "assistant"}
    if texts or not calls:
        out["content"] = "".join(texts)
    if calls:
        out["tool_calls"] = calls
    return [out]


def _user_turn(blocks: Sequence[Any], where: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), where)}})
        elif kind == "tool_result":
            # The native tool message has no is_error flag; the text itself says what went wrong.
            content = block.get("content", "")
            text = content if isinstance(content, str) else _joined_text(content, f"{where} tool_result")
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            raise UnsupportedParams(f"{where}: no chat-completions form for a user {_block_type(block)} block")
    out = list(results)  # tool results answer the previous assistant turn, so they come first
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    elif not results:
        out.append({"role": "user", "content": ""})
    return out


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, Mapping):
        if source.get("type") == "url" and source.get("url"):
            return str(source["url"])
        if source.get("type") == "base64" and source.get("data"):
            return f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    raise UnsupportedParams(f"{where}: an image block needs a url or base64 source")


def _chat_tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or not tool.get("name"):
        raise UnsupportedParams("tools: each tool needs a name")
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


# --------------------------------------------------------------------------------------------------
# Response: chat completion -> Answer


def answer_from_chat(body: Any, request_id: str | None) -> Answer:
    """The Answer in a chat-completion object, in the same form the online wire gives it.

    `content` holds the answer's blocks in Messages-API request form (thinking, text, tool_use), so
    runner.job.structured.repair can continue the conversation and chat_body can send it back.
    A tool call whose arguments are not JSON keeps the raw text as `tool_input`, so validation
    reports what is wrong instead of the answer vanishing.

    Raises BadResultLine (with Zhipu's code when the body is an error object) for anything that is not
    a chat completion with usage; never KeyError or TypeError.
    """
    if not isinstance(body, Mapping):
        raise BadResultLine(None, f"result body is not a JSON object but {type(body).__name__}")
    error = body.get("error")
    if isinstance(error, Mapping):
        code, message = _error_fields(error)
        raise BadResultLine(code, f"result body is an error: {message or code or 'no message'}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise BadResultLine(None, "result body has no choices: not a chat completion")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise BadResultLine(None, "result body's first choice has no message")
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        raise BadResultLine(None, "result body has no usage: it cannot be billed or trusted")
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    if prompt_tokens is None or completion_tokens is None:
        raise BadResultLine(None, "result body's usage lacks prompt_tokens or completion_tokens")
    cached = _count(_get(usage, "prompt_tokens_details", "cached_tokens"))
    reasoning_reported = _count(_get(usage, "completion_tokens_details", "reasoning_tokens"))

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
        thinking_tokens=thinking_tokens,
        tool_input=tool_input,
        tool_use_id=tool_use_id,
        content=tuple(blocks),
    )


def _count(value: Any) -> int | None:
    # bool is an int subclass; a true/false token count is garbage, not 1/0.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _get(mapping: Mapping[str, Any], *path: str) -> Any:
    value: Any = mapping
    for name in path:
        if not isinstance(value, Mapping):
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


def _error_fields(error: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Zhipu's business code and message: the native API says `code`, the Anthropic one `type`."""
    code = error.get("code")
    if code is None or code == "":
        code = error.get("type")
    message = error.get("message")
    if message is None:
        message = error.get("msg")
    return (str(code) if code is not None and code != "" else None), (str(message) if message is not None else None)


# --------------------------------------------------------------------------------------------------
# Result files: one line of the output or error file


@dataclass(frozen=True, slots=True)
class ResultLine:
    """One line of a batch's output or error file, read defensively.

    `problem` is set when the line could not be read at all (then only `custom_id` may be known, fished
    out of the raw text); `error_code`/`error_message` when the line reports a failed request.
    """

    custom_id: str | None
    status_code: int | None = None
    body: dict[str, Any] | None = None  # the chat completion (or error body) the request got
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    line_id: str | None = None  # the batch's own id for the line (`batch_req_...`)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """Did the request succeed (status 200, a body, no error reported)?"""
        # A missing status with a body is read as success: the docs show no line without one, and
        # answer_from_chat still refuses a body that is not a chat completion.
        return (
            self.problem is None
            and self.status_code in (200, None)
            and self.body is not None
            and self.error_code is None
            and self.error_message is None
        )


def parse_result_line(line: bytes | str) -> ResultLine:
    """Read one output-file or error-file line; never raises.

    Accepted shapes (the docs show only the success line, so error lines are read in every shape an
    OpenAI-style batch might use):
    - `{"custom_id", "response": {"status_code", "request_id", "body": {...}}}` (success, or an error
      status with `body.error`);
    - `{"custom_id", "response": null, "error": {"code", "message"}}` (a request never run);
    - `{"custom_id", "error": {...}}` or a body given as a JSON string.
    """
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    stripped = raw.strip()
    if not stripped:
        return ResultLine(custom_id=None, problem="empty line")
    try:
        data = json.loads(stripped)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        return ResultLine(custom_id=_fish_custom_id(stripped), problem=f"not JSON ({exc}): {_snippet(stripped)}")
    if not isinstance(data, dict):
        return ResultLine(custom_id=None, problem=f"not a JSON object: {_snippet(stripped)}")

    custom_id = data.get("custom_id")
    custom_id = str(custom_id) if isinstance(custom_id, (str, int)) and custom_id != "" else None
    line_id = data.get("id") if isinstance(data.get("id"), str) else None

    response = data.get("response")
    status: int | None = None
    body: dict[str, Any] | None = None
    request_id: str | None = None
    if isinstance(response, Mapping):
        status = _status(response.get("status_code"))
        body_value = response.get("body")
        if isinstance(body_value, str):  # a body serialized twice: read it once more
            try:
                body_value = json.loads(body_value)
            except ValueError:
                body_value = None
        body = body_value if isinstance(body_value, dict) else None
        rid = response.get("request_id") or (body or {}).get("request_id")
        request_id = str(rid) if rid else None
    elif response is not None:
        return ResultLine(
            custom_id=custom_id, line_id=line_id, problem=f"`response` is not an object: {_snippet(stripped)}"
        )

    code: str | None = None
    message: str | None = None
    for error in (data.get("error"), (body or {}).get("error")):
        if isinstance(error, Mapping):
            code, message = _error_fields(error)
            break
        if isinstance(error, str) and error:
            message = error
            break
    if custom_id is None:
        problem = "no custom_id"
    elif response is None and code is None and message is None:
        problem = "neither a response nor an error"
    else:
        problem = None
    return ResultLine(
        custom_id=custom_id,
        status_code=status,
        body=body,
        request_id=request_id,
        error_code=code,
        error_message=message,
        line_id=line_id,
        problem=problem,
    )


def _status(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _fish_custom_id(raw: bytes) -> str | None:
    match = _CUSTOM_ID.search(raw)
    return match.group(1).decode("utf-8", "replace") if match else None


def _snippet(raw: bytes, limit: int = 120) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return text + ("..." if len(raw) > limit else "")


def classify_failure(line: ResultLine) -> Verdict:
    """What a failed line means for its request: RETRY (send it in a later batch), FAIL, or ABORT.

    - ABORT: billing and auth codes (runner.send.retries.ABORT_CODES: 1113 no balance, 1308-1310
      plan exhausted, bad keys, unknown model) and 401/403: every other request would fail the same.
    - RETRY: rate and overload codes (1302-1305), 408/409/429, 5xx, requests the batch never ran
      (expired, cancelled, timed out), and lines we could not read: the request itself may be fine.
    - FAIL: any other 4xx or business code (bad parameters 1210-1215, prompt too long 1261,
      sensitive content 1301): sending it again would get the same answer.
    A line with no code and no status (unreadable, or a 200 whose body was no answer) is retried: the
    executor's attempt limit bounds it. An unknown code is the request's own problem and FAILs.
    """
    code = line.error_code
    status = line.status_code
    if code in ABORT_CODES or status in (401, 403):
        return Verdict.ABORT
    if code in _TRANSIENT_CODES or (code is not None and _NOT_PROCESSED.search(code)):
        return Verdict.RETRY
    if status is not None and (status in (408, 409, 429) or status >= 500):
        return Verdict.RETRY
    if status is not None and 400 <= status < 500:
        return Verdict.FAIL
    if line.error_message and _NOT_PROCESSED.search(line.error_message):
        return Verdict.RETRY
    # A code we do not know is the request's own problem; no code at all (an unreadable line, a 200
    # whose body was no answer) says nothing against the request.
    return Verdict.FAIL if code is not None else Verdict.RETRY
