"""The native wire: a Messages-API request as a Zhipu `/v4/chat/completions` body (one Batch API line).
Pure functions over dicts; the translation's rules: docs/decisions.md, "The native wire"."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# The Messages-API parameters `chat_body` understands. Anything else is refused rather than dropped:
# a request that silently lost a field would be a different request under the same key.
_KNOWN_PARAMS = frozenset(
    {"model", "max_tokens", "system", "messages", "stop_sequences", "thinking", "tools", "tool_choice", "extra_body"}
)
# Transport options of the SDK call, not part of what the model sees.
_TRANSPORT_PARAMS = frozenset({"timeout", "metadata", "stream"})


class UnsupportedParams(ValueError):
    """A Messages-API request that has no faithful chat-completions form (an unknown field or block)."""


def chat_body(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `/v4/chat/completions` body that asks the same thing as these `messages.create` params;
    UnsupportedParams for a field or block this translation does not know. A forced tool choice is sent
    as `auto`, the only one the native API takes (docs/decisions.md, "The native wire")."""
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
    else:
        # A Messages request without `thinking` asks for no reasoning; the native API's default is
        # enabled, so the same request says so (a model that always thinks still does).
        body["thinking"] = {"type": "disabled"}
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
        body["tool_choice"] = "auto"  # the only value the native API accepts; `none` sends no tools
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
