"""What the simulator answers, whichever API a request came through: both routes reduce a request to an
`Ask` and compose one `Reply`, so a job gives the same labels, text and tokens online and in a batch."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.job.thinking import thinks

TEXT_SCHEMA_MARKER = "matches this JSON Schema:"  # what runner.job.structured's text mode says
POSITIVE = frozenset(
    [
        "good",
        "great",
        "excellent",
        "love",
        "loved",
        "best",
        "nice",
        "amazing",
        "perfect",
        "happy",
        "recommend",
        "fantastic",
    ]
)
NEGATIVE = frozenset(
    ["bad", "poor", "terrible", "worst", "hate", "broke", "broken", "disappointed", "awful", "waste", "not", "never"]
)

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


def structured_answer(schema: dict[str, Any], prompt: str, invalid: bool = False, variant: int = 0) -> Any:
    """A value for a JSON Schema, derived from the prompt: a label by a tiny word lexicon (a plausible,
    imperfect accuracy), the rest from the prompt's hash. `invalid` breaks the schema; a `variant` above
    0 is another valid answer."""
    kind = schema.get("type")
    if "enum" in schema:
        options = list(schema["enum"])
        if invalid:
            return "not-a-label"
        score = lexicon_score(prompt)
        wanted = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        digest = hashlib.sha256(prompt.encode()).digest()
        index = options.index(wanted) if wanted in options else digest[0] % len(options)
        if variant and len(options) > 1:
            index = (index + 1 + (variant - 1) % (len(options) - 1)) % len(options)
        return options[index]
    if variant and kind not in ("object", "array"):
        prompt = f"{prompt}#{variant}"
    digest = hashlib.sha256(prompt.encode()).digest()
    if kind == "object":
        props = schema.get("properties", {})
        value = {k: structured_answer(v, prompt + k, variant=variant) for k, v in props.items()}
        if invalid and props:
            first = next(iter(props))
            if "enum" in props[first]:
                value[first] = "not-a-label"
            else:
                value.pop(first)
        return value
    if kind == "array":
        return [structured_answer(schema.get("items", {}), prompt, invalid, variant)]
    if kind == "integer":
        return digest[1] % 100
    if kind == "number":
        if "minimum" in schema and "maximum" in schema:  # within the bounds asked for
            return round(schema["minimum"] + (schema["maximum"] - schema["minimum"]) * digest[2] / 255, 2)
        return round(digest[2] / 7, 2)
    if kind == "boolean":
        return digest[3] % 2 == 0
    return f"text-{digest.hex()[:8]}"


def lexicon_score(prompt: str) -> int:
    """The simulator's sentiment: positive words minus negative words; 0 means it is unsure."""
    words = set(re.findall(r"[a-z']+", prompt.lower()))
    return len(words & POSITIVE) - len(words & NEGATIVE)


def answer_for(prompt: str) -> str:
    """The answer the simulator gives to a prompt: a tag of the prompt's hash, then 4 to 24 words."""
    digest = hashlib.sha256(prompt.encode()).digest()
    words = [_WORDS[b % len(_WORDS)] for b in digest[1 : 1 + 4 + digest[0] % 21]]
    return f"answer-{digest.hex()[:12]} " + " ".join(words)


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt a request carries, as `answer_for` sees it: the system prompt and every message's text."""
    parts = [text_of(body.get("system"))]
    parts += [text_of(m.get("content")) for m in body.get("messages", [])]
    return "\n".join(parts)


def prompt_key(prompt: str) -> str:
    """The ledger's key for a prompt (its SHA-256): how the simulator counts answers and bills."""
    return hashlib.sha256(prompt.encode()).hexdigest()


def count_tokens(text: str, scale: float = 1.0) -> int:
    """The simulator's tokenizer: about 4 Latin characters a token, 0.7 tokens per CJK character."""
    # ASCII holds no wide character (and every request is counted, some twice: skip the scan for it).
    cjk = 0 if text.isascii() else sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    latin = len(text) - cjk
    return max(1, round((latin / 4 + cjk * 0.7) * scale))


def share(text: str) -> float:
    """A number in [0, 1] fixed by `text`: how the simulator picks which prompts a rate applies to."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the `text` of its blocks (tool blocks have none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


@dataclass(frozen=True)
class Ask:
    """A request reduced to what decides its answer, the same whichever wire it arrived on."""

    model: str
    system: str
    texts: tuple[str, ...]  # each turn's text, in order (tool calls and tool results carry none)
    user_turns: int  # how many times the user spoke: 1 on a first ask, more on a repair
    max_tokens: int
    temperature: float | None
    thinking: bool
    tool: tuple[str, dict[str, Any]] | None  # the tool to call (name, JSON Schema of its input)
    json_object: bool = False  # native response_format {"type": "json_object"}

    @property
    def prompt(self) -> str:
        """The whole conversation as `answer_for` and the token count see it."""
        return "\n".join([self.system, *self.texts])

    @property
    def first(self) -> str:
        """The system prompt and the first message: what a structured answer is derived from, so a
        repair turn answers the same question again."""
        return "\n".join([self.system, *self.texts[:1]])


@dataclass(frozen=True)
class Reply:
    """One composed answer, before it is put in a wire shape."""

    thinking: str | None
    text: str  # "" for none
    tool: tuple[str, str, Any] | None  # (call id, tool name, input value)
    stop_reason: str  # Anthropic's names: end_turn, max_tokens, tool_use
    input_tokens: int
    output_tokens: int


def ask_from_messages(body: dict[str, Any], model_default: bool = False) -> Ask:
    """An Anthropic Messages request as an `Ask`. It thinks when it enables thinking, or, with
    `model_default`, as the native API decides (runner.job.thinking: on unless disabled, or always)."""
    tools = body.get("tools")
    thinking = body.get("thinking") or {}
    requested = thinking.get("type") if isinstance(thinking, dict) else None
    return Ask(
        model=body["model"],
        system=text_of(body.get("system")),
        texts=tuple(text_of(m.get("content")) for m in body["messages"]),
        user_turns=sum(1 for m in body["messages"] if m.get("role") == "user"),
        max_tokens=body["max_tokens"],
        temperature=body.get("temperature"),
        thinking=thinks(body["model"], requested) if model_default else requested == "enabled",
        tool=(tools[0]["name"], tools[0]["input_schema"]) if tools else None,
    )


def ask_from_chat(body: dict[str, Any], default_max_tokens: int) -> Ask:
    """A native (OpenAI-style) chat completions request as an `Ask`. System messages become the system
    prompt; a run of tool results and user messages is one user turn, as it is one message on the
    Anthropic wire (tool_result blocks plus text), so a repair turn answers and counts the same."""
    system = "".join(text_of(m.get("content")) for m in body["messages"] if m.get("role") == "system")
    texts: list[str] = []
    turns = 0
    previous = None
    for m in body["messages"]:
        role = m.get("role")
        if role == "system":
            continue
        text = "" if role == "tool" else text_of(m.get("content"))
        speaks = role in ("user", "tool")
        if speaks and previous == "user":
            texts[-1] += text
        else:
            texts.append(text)
            turns += speaks
        previous = "user" if speaks else "assistant"
    thinking = body.get("thinking") or {}
    return Ask(
        model=body["model"],
        system=system,
        texts=tuple(texts),
        user_turns=turns,
        max_tokens=body.get("max_tokens") or default_max_tokens,
        temperature=body.get("temperature"),
        # On by default where the model thinks, as Zhipu's native API does.
        thinking=thinks(body["model"], thinking.get("type") if isinstance(thinking, dict) else None),
        tool=_chat_tool(body),
        json_object=(body.get("response_format") or {}).get("type") == "json_object",
    )


def _chat_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The function a native request makes the model call: the forced one, else the first (as the
    Messages route does), none when there are no tools or tool_choice is "none"."""
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.get("name") == wanted] or tools
    return tools[0]["name"], tools[0].get("parameters") or {}


def compose(
    ask: Ask,
    scale: float,
    invalid: Callable[[str, int], bool],
    variant: Callable[[Ask, str, int], int],
    reasoning_tokens: int = 0,
    stated: Callable[[Ask, str], float | None] = lambda ask, first: None,
) -> Reply:
    """The answer to an ask. `invalid(first, turn)`: whether a structured answer breaks its schema;
    `variant(ask, first, turn)`: which sampled answer it is; `stated(ask, first)`: the confidence stated.
    A thinking ask reasons first, and ends inside its reasoning (max_tokens, no text) when max_tokens
    does not hold it."""
    prompt, first, turn = ask.prompt, ask.first, ask.user_turns
    input_tokens = count_tokens(prompt, scale)

    def answer_to(schema: dict[str, Any]) -> Any:
        value = structured_answer(schema, first, invalid(first, turn), variant(ask, first, turn))
        return _with_stated(schema, value, stated(ask, first))

    thinking: str | None = None
    think_tokens = 0
    if ask.thinking:
        subject = ask.tool[0] if ask.tool is not None else answer_for(prompt).split()[0]
        thinking = _reasoning(subject, first, reasoning_tokens, scale)
        think_tokens = count_tokens(thinking, scale)
        if think_tokens >= ask.max_tokens:  # cut off while still reasoning
            words = thinking.split()
            while len(words) > 1 and count_tokens(" ".join(words), scale) > ask.max_tokens:
                words.pop()
            thinking = " ".join(words)
            return Reply(thinking, "", None, "max_tokens", input_tokens, count_tokens(thinking, scale))
    if ask.tool is not None:
        name, schema = ask.tool
        value = answer_to(schema)
        call_id = f"toolu_{hashlib.sha256(first.encode()).hexdigest()[:20]}"
        out = think_tokens + count_tokens(json.dumps(value), scale)
        if thinking is not None and out > ask.max_tokens:
            return Reply(thinking, "", None, "max_tokens", input_tokens, ask.max_tokens)
        return Reply(thinking, "", (call_id, name, value), "tool_use", input_tokens, out)
    text = answer_for(prompt)
    if TEXT_SCHEMA_MARKER in ask.system:  # text mode: JSON made from the schema asked for
        schema = json.loads(ask.system.split(TEXT_SCHEMA_MARKER, 1)[1].strip().splitlines()[0])
        value = answer_to(schema)
        dumped = json.dumps(value, ensure_ascii=False)
        text = dumped if ask.json_object else f"Here you are:\n```json\n{dumped}\n```"
    elif ask.json_object:
        text = json.dumps({"answer": text})
    out_tokens = think_tokens
    stop_reason = "end_turn"
    # Truncate honestly when max_tokens is too small, as a real model does.
    if out_tokens + count_tokens(text, scale) > ask.max_tokens:
        words = text.split()
        while words and out_tokens + count_tokens(" ".join(words), scale) > ask.max_tokens:
            words.pop()
        text = " ".join(words)
        stop_reason = "max_tokens"
    if text:
        out_tokens += count_tokens(text, scale)
    return Reply(thinking, text, None, stop_reason, input_tokens, out_tokens)


def _with_stated(schema: dict[str, Any], value: Any, confidence: float | None) -> Any:
    """The answer with its `confidence` field set to the stated one, where the schema asks for such a
    number and the model states one (a model of given skill; runner.simulator.skill)."""
    asked = (schema.get("properties") or {}).get("confidence") or {}
    if confidence is None or not isinstance(value, dict) or "confidence" not in value or asked.get("type") != "number":
        return value
    return value | {"confidence": confidence}


def _reasoning(subject: str, prompt: str, tokens: int, scale: float) -> str:
    """A thinking model's reasoning: "Considering <subject>." and words fixed by the prompt, about
    `tokens` long."""
    text = f"Considering {subject}."
    digest = hashlib.sha256(prompt.encode()).digest()
    i = 0
    while count_tokens(text, scale) < tokens:
        text += " " + _WORDS[digest[i % len(digest)] % len(_WORDS)]
        i += 1
    return text


def anthropic_message(reply: Reply, model: str, message_id: str) -> dict[str, Any]:
    """A reply as an Anthropic Messages response, with Zhipu's usage fields."""
    blocks: list[dict[str, Any]] = []
    if reply.thinking is not None:
        blocks.append({"type": "thinking", "thinking": reply.thinking, "signature": ""})
    if reply.tool is not None:
        call_id, name, value = reply.tool
        blocks.append({"type": "tool_use", "id": call_id, "name": name, "input": value})
    elif reply.text:
        blocks.append({"type": "text", "text": reply.text})
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.input_tokens,
            "output_tokens": reply.output_tokens,
            "cache_read_input_tokens": 0,
            "server_tool_use": {"web_search_requests": 0},
            "service_tier": "standard",
        },
    }


_FINISH = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def chat_completion(reply: Reply, model: str, completion_id: str, created: int) -> dict[str, Any]:
    """A reply as a native chat completion: reasoning_content, tool_calls with JSON-string arguments,
    and usage as prompt_tokens / completion_tokens (thinking is billed as output)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text if reply.tool is None else None}
    if reply.thinking is not None:
        message["reasoning_content"] = reply.thinking
    if reply.tool is not None:
        call_id, name, value = reply.tool
        message["tool_calls"] = [
            {
                "id": call_id.replace("toolu_", "call_"),
                "type": "function",
                "index": 0,
                "function": {"name": name, "arguments": json.dumps(value, ensure_ascii=False)},
            }
        ]
    return {
        "id": completion_id,
        "request_id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "finish_reason": _FINISH[reply.stop_reason], "message": message}],
        "usage": {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
        },
    }
