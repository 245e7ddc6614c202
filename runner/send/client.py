"""The wire: one Messages API call through the official SDK (`max_retries=0`: retries are tenacity's;
the aiohttp transport), turned into an Answer. The key goes out as `Authorization: Bearer` and as
`x-api-key` (what Zhipu documents)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
import httpx2
import orjson
from anthropic._response import AsyncAPIResponse
from anthropic.types import Message

from runner.money.tokens import estimate_answer, estimate_request, estimate_text, token_count
from runner.records import Answer
from runner.send.base import MAX_ANSWER_BYTES
from runner.send.retries import (
    BadResponse,
    Fault,
    Verdict,
    bad_response_fault,
    error_parts,
    retry_after_seconds,
    status_fault,
    unclassified,
)

# The SDK refuses non-streaming calls it expects to run past 10 minutes (max_tokens >= 21334) unless
# a timeout is given; we always give one, and stream from this size up when the spec says "auto".
STREAM_FROM_MAX_TOKENS = 21334


class StalledStream(Exception):
    """A streamed answer sent no event for `stall_s` seconds: the connection is taken for hung."""

    def __init__(self, stall_s: float) -> None:
        super().__init__(f"no event for {stall_s:g} s while streaming")


class SlowAnswer(Exception):
    """A whole (non-streamed) answer did not arrive within `run.timeout_s`, however it trickled in."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no whole answer within {timeout_s:g} s")


class AnswerTooLarge(Exception):
    """A body over the bound: read no further. Generated (and billed) if it was an answer, and as large
    again if asked again, so its row fails."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        said = f"says it is {declared:,} bytes" if declared is not None else "went on"
        super().__init__(f"the answer {said}, past the {limit:,} bytes one answer may take; it was not read further")


TAIL_BYTES = 8192  # the end of a body kept: where a stream's last event (an error the SDK skips) is
BODY = "glm_batch.body"  # a response's extension holding its BoundedStream


class BoundedStream(httpx2.AsyncByteStream):
    """A response body that raises AnswerTooLarge once more than `limit` bytes came; `tail` is its last
    TAIL_BYTES bytes so far (what `stream_error` reads)."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.tail = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise AnswerTooLarge(self._limit)
            self.tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self.tail + chunk)[-TAIL_BYTES:]
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(httpx2.AsyncBaseTransport):
    """The SDK's transport with every response body bounded (answers, streams, error bodies, which the
    SDK reads whole): one place where the whole class of oversized bodies stops."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit:
            await response.aclose()
            raise AnswerTooLarge(self._limit, int(declared))
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        bounded = BoundedStream(stream, self._limit)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=bounded,
            request=request,
            extensions={**response.extensions, BODY: bounded},  # the client wraps `stream`: found here
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def bounded_http_client(limit: int) -> Any:
    """The SDK's aiohttp client, every body it reads bounded by `limit` bytes (proxied routes too),
    following no redirect: one would carry our `x-api-key` to whoever it points at (a 3xx stops the run)."""
    client = anthropic.DefaultAioHttpClient(follow_redirects=False)
    client._transport = BoundedTransport(client._transport, limit)
    client._mounts = {url: BoundedTransport(t, limit) if t else t for url, t in client._mounts.items()}
    return client


class StoppedAnswer(Exception):
    """An answer that ended with one of Zhipu's own finish reasons: `network_error` (the inference broke
    off, leaving a partial answer: sent again) or `sensitive` (the content was blocked: the row fails)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# finish reasons that are not an answer: network_error is retried, the others fail as content_filter:
# Zhipu's `sensitive` as its Anthropic route passes it on, and Anthropic's own `refusal` (what the batch
# wire maps `sensitive` to: a blocked answer means the same on both wires).
_STOPPED = frozenset({"network_error", "sensitive", "refusal"})


class Client:
    """An AsyncAnthropic pointed at one endpoint, sending one request at a time per call."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        stream: bool,
        stall_s: float = 120.0,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout_s,
            default_headers={"x-api-key": api_key},
            http_client=bounded_http_client(max_answer_bytes),
        )
        self._timeout = timeout_s
        self._stream = stream
        self._stall = stall_s

    async def send(self, params: dict[str, Any]) -> Answer:
        """Send one request; raise the SDK's error, or BadResponse for a 200 that is not a whole message.
        A stream may take as long as it needs, but no event for `stall_s` ends it; one cut off before
        `message_stop` is never kept."""
        if len(params["messages"]) > 1:  # a conversation: a repair turn, or few-shot examples
            params = {**params, "messages": [_taken_back(turn) for turn in params["messages"]]}
        if self._stream:
            return await self._streamed(params)
        try:
            # The SDK's timeout bounds each read, so an answer trickled a byte at a time never ends; this
            # bounds the whole answer, as run.timeout_s promises.
            async with asyncio.timeout(self._timeout):
                raw = await self._sdk.messages.with_raw_response.create(**params, timeout=self._timeout)
                body = await _body(raw)
        except TimeoutError:
            raise SlowAnswer(self._timeout) from None
        return answer_from_message(body, _request_id(raw.headers), prompt=params)

    async def _streamed(self, params: dict[str, Any]) -> Answer:
        """A streamed answer, put together from its events here rather than by the SDK's accumulator,
        which takes usage from message_start and then message_delta as Anthropic sends them, and fails
        (or counts 0) when either leaves it out or sends null: usage is read from both (`_take_usage`)."""
        message: dict[str, Any] | None = None
        blocks: dict[int, dict[str, Any]] = {}
        pieces: _Pieces = {}  # (block, field) -> the text its deltas brought, joined at the end
        usage: dict[str, Any] = {}
        finished = False
        try:
            async with asyncio.timeout(self._stall) as quiet:
                stream = await self._sdk.messages.create(**params, stream=True, timeout=None)
                request_id = _request_id(stream.response.headers)
                async with stream:
                    async for event in stream:
                        quiet.reschedule(asyncio.get_running_loop().time() + self._stall)
                        kind = getattr(event, "type", None)
                        if kind == "content_block_delta":
                            _add_delta(blocks, pieces, getattr(event, "index", None), getattr(event, "delta", None))
                        elif kind == "message_start":
                            start = getattr(event, "message", None)
                            message = {"id": getattr(start, "id", None), "model": getattr(start, "model", None)}
                            _take_usage(usage, getattr(start, "usage", None), final=False)
                        elif kind == "content_block_start":
                            block = getattr(event, "content_block", None)
                            index = getattr(event, "index", None)
                            if isinstance(index, int) and block is not None:
                                blocks[index] = block.to_dict(warnings=False)
                        elif kind == "message_delta":
                            delta = getattr(event, "delta", None)
                            if message is not None:
                                message["stop_reason"] = getattr(delta, "stop_reason", None)
                                message["stop_sequence"] = getattr(delta, "stop_sequence", None)
                            _take_usage(usage, getattr(event, "usage", None), final=True)
                        elif kind == "message_stop":
                            finished = True
        except TimeoutError:
            raise StalledStream(self._stall) from None
        if message is None or not finished:  # an error event the SDK skipped (one with no `event:` line)?
            body = stream.response.extensions.get(BODY)
            said = stream_error(body.tail) if isinstance(body, BoundedStream) else None
            if said is not None:
                raise BadResponse(
                    said[0], f"the stream ended with an error: {said[1]}", maybe_billed=message is not None
                )
        if message is None:  # no message_start: an HTML page, a cut-off stream
            raise BadResponse(None, "the stream ended without a complete message", maybe_billed=True)
        if not finished:
            raise BadResponse(None, "the stream ended before message_stop: the answer was cut off", maybe_billed=True)
        body = {**message, "type": "message", "content": _joined(blocks, pieces), "usage": usage}
        return answer_from_message(body, request_id, prompt=params)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._sdk.close()

    @staticmethod
    def classify(exc: BaseException) -> Fault:
        """This wire's faults (see `classify`)."""
        return classify(exc)


def classify(exc: BaseException) -> Fault:
    """Decide the fate of a Messages API call that raised `exc`: connection faults and timeouts RETRY,
    an error answer goes to runner.send.retries.status_fault, anything else is unclassified (retried)."""
    if isinstance(exc, BadResponse):
        return bad_response_fault(exc)
    too_large = _caused_by(exc, AnswerTooLarge)
    if too_large is not None:  # raised inside the transport: the SDK wraps it as a connection error
        return Fault(Verdict.FAIL, "answer_too_large", str(too_large), maybe_billed=True)
    if isinstance(exc, StoppedAnswer):
        if exc.reason == "network_error":  # generated in part, so billed in part
            return Fault(
                Verdict.RETRY,
                "network_error",
                "the inference broke off (finish_reason network_error)",
                maybe_billed=True,
            )
        field = "finish_reason" if exc.reason == "sensitive" else "stop_reason"  # Zhipu's word, as it came
        return Fault(
            Verdict.FAIL,
            "content_filter",
            f"the endpoint blocked this content ({field} {exc.reason}); "
            "no answer for this row: change its input or the prompt",
        )
    # The request was sent and may still be answered, and billed, after we gave up on it.
    if isinstance(exc, anthropic.APITimeoutError | SlowAnswer):
        return Fault(Verdict.RETRY, "timeout", str(exc) or "timed out", maybe_billed=True)
    if isinstance(exc, StalledStream):
        return Fault(Verdict.RETRY, "stalled", str(exc), maybe_billed=True)
    if isinstance(exc, anthropic.APIConnectionError):
        return Fault(Verdict.RETRY, "connection", str(exc) or "connection failed")
    if isinstance(exc, anthropic.APIStatusError):
        # Read from the body, not the SDK's `type` alone: the route also answers in the native shape
        # ({"error": {"code": ...}}, no type), and a 1113 there must abort as surely as here.
        code, message, request_id = error_parts(exc.body)
        code = code or (str(exc.type) if exc.type is not None else None)
        status = exc.status_code
        text = message or exc.api_message or str(exc) or (f"{status}/{code}" if code else str(status))
        headers = exc.response.headers
        return status_fault(
            status,
            code,
            text,
            retry_after=retry_after_seconds(headers),
            request_id=request_id or exc.request_id or _request_id(headers),
        )
    return unclassified(exc)


def stream_error(tail: bytes) -> tuple[str, str] | None:
    """Zhipu's code and message when a stream's last event is an error object in either shape, sent as
    `data:` alone (no `event: error` line, as OpenAI-style streams send errors), or the body is one as
    plain JSON: the SDK skips an event with no name and finds none in JSON, so the stream would only
    look cut off, and a 1113 be asked again on every row."""
    blocks = [b for b in tail.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    if not blocks:
        return None
    lines = blocks[-1].split(b"\n")
    data = b"\n".join(line.removeprefix(b"data:").removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    if not data:  # no event at all: an error object answered as plain JSON to a streamed request
        data = blocks[-1]
    try:
        body = json.loads(data)
    except ValueError:
        return None
    code, message, _ = error_parts(body)
    return (code, message or code) if code is not None else None


_Pieces = dict[tuple[int, str], list[str]]
_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _take_usage(seen: dict[str, Any], usage: Any, *, final: bool) -> None:
    """Take one stream event's usage (a model, a dict, or None) into `seen`: the largest count seen of
    each, output only from a message_delta (`final`)."""
    if usage is None:
        return
    for name in _COUNTS:
        if name == "output_tokens" and not final:
            continue
        value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
        if value is None:
            continue
        known = seen.get(name)
        counted, before = token_count(value), token_count(known)
        if counted is None:
            seen[name] = value  # not a count: the reader refuses it, as in a whole answer
        elif known is None or (before is not None and counted > before):
            seen[name] = counted


def _add_delta(blocks: dict[int, dict[str, Any]], pieces: _Pieces, index: Any, delta: Any) -> None:
    """One content_block_delta kept for the block it names (a delta for no block is dropped); the pieces
    are joined once at the end (`_joined`): adding each to the text so far copies it every time."""
    if delta is None or not isinstance(index, int) or index not in blocks:
        return
    kind = getattr(delta, "type", None)
    if kind == "text_delta":
        pieces.setdefault((index, "text"), []).append(_text(getattr(delta, "text", "")))
    elif kind == "thinking_delta":
        pieces.setdefault((index, "thinking"), []).append(_text(getattr(delta, "thinking", "")))
    elif kind == "signature_delta":
        blocks[index]["signature"] = _text(getattr(delta, "signature", ""))
    elif kind == "input_json_delta":
        pieces.setdefault((index, "input"), []).append(_text(getattr(delta, "partial_json", "")))


def _joined(blocks: dict[int, dict[str, Any]], pieces: _Pieces) -> list[dict[str, Any]]:
    """The blocks in order, each with the pieces its deltas brought."""
    for (index, name), parts in pieces.items():
        block = blocks[index]
        if name == "input":
            _set_tool_input(block, "".join(parts))
        else:
            block[name] = _text(block.get(name)) + "".join(parts)
    return [blocks[index] for index in sorted(blocks)]


def _set_tool_input(block: dict[str, Any], text: str) -> None:
    """A tool call's input from the JSON its deltas carried; text that is not JSON is kept as text (a
    structured answer then fails its check and is repaired, as a call with bad arguments is)."""
    if not text:
        return
    try:
        block["input"] = orjson.loads(text)
    except orjson.JSONDecodeError:
        block["input"] = text


def _caused_by(exc: BaseException, kind: type[Exception]) -> BaseException | None:
    """`exc` or the first exception of type `kind` in its chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _request_id(headers: Any) -> str | None:
    value = headers.get("request-id") or headers.get("x-request-id")
    return str(value) if value else None


async def _body(raw: AsyncAPIResponse[Message]) -> Any:
    """A 200 answer's body as JSON: UTF-8 (the norm, with or without a BOM), UTF-16 or UTF-32, or the
    charset its content-type names. BadResponse when it is none of these (a gateway's HTML page; torn
    JSON, which may be a generated answer cut in transit, so maybe billed)."""
    content = await raw.read()
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(content)  # a BOM, UTF-16 or UTF-32
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        return json.loads(await raw.text())  # the charset the answer declares
    except (ValueError, UnicodeDecodeError, LookupError):
        snippet = content[:120].decode("utf-8", "replace")
        torn = content.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")
        raise BadResponse(None, f"200 answer is not JSON: {snippet!r}", maybe_billed=torn) from None


def answer_from_message(data: Any, request_id: str | None, *, prompt: Mapping[str, Any] | None = None) -> Answer:
    """The Answer in a Messages API answer body (a dict as the wire gave it), read strictly; never
    TypeError or KeyError. An error object with 200 raises BadResponse with its code; unusable usage or
    content raises BadResponse marked maybe billed. A count left out (absent, null, or an input of 0
    with nothing cached) is estimated (input from `prompt`) and named in `usage_estimated`."""
    if not isinstance(data, Mapping):
        raise BadResponse(None, f"200 answer is not a JSON object but {type(data).__name__}")
    if data.get("type") != "message":
        code, text, _ = error_parts(data)
        raise BadResponse(code, f"200 answer is not a message: {text or code or 'no body'}")
    if data.get("stop_reason") in _STOPPED:
        raise StoppedAnswer(str(data["stop_reason"]))
    usage = data.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    counts = {name: usage.get(name) for name in ("input_tokens", "output_tokens")}
    garbage = [name for name, value in counts.items() if value is not None and token_count(value) is None]
    if garbage:
        raise BadResponse(
            None,
            f"200 message without usable usage ({_short(usage)}): it cannot be priced or kept",
            maybe_billed=True,
        )
    content = data.get("content")
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise BadResponse(
            None, f"200 message whose content is not a list of blocks: {_short(content)}", maybe_billed=True
        )
    texts: list[str] = []
    thoughts: list[str] = []
    blocks: list[dict[str, Any]] = []
    tool_input: Any = None
    tool_use_id: str | None = None
    for index, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            text = _text(block.get("text"))
            texts.append(text)
            blocks.append({"type": "text", "text": text})
        elif kind == "thinking":
            thought = _text(block.get("thinking"))
            thoughts.append(thought)
            blocks.append({"type": "thinking", "thinking": thought, "signature": _text(block.get("signature"))})
        elif kind == "tool_use":
            block_id = _text(block.get("id")) or f"toolu_{index}"  # a repair's tool_result must name it
            if tool_use_id is None:
                tool_input, tool_use_id = block.get("input"), block_id
            blocks.append(
                {"type": "tool_use", "id": block_id, "name": _text(block.get("name")), "input": block.get("input")}
            )
    input_tokens, output_tokens = token_count(counts["input_tokens"]), token_count(counts["output_tokens"])
    estimated: list[str] = []
    cached = (token_count(usage.get("cache_read_input_tokens")) or 0) + (
        token_count(usage.get("cache_creation_input_tokens")) or 0
    )
    # Absent or null; or 0 with nothing cached either (a prompt read whole from the cache has input 0).
    if prompt is not None and (input_tokens is None or (input_tokens == 0 and not cached)):
        input_tokens = max(estimate_request(dict(prompt)) - cached, 0)
        estimated.append("input_tokens")
    said = any(texts) or any(thoughts) or tool_use_id is not None
    if output_tokens is None or (output_tokens == 0 and said):
        output_tokens = estimate_answer(blocks)
        estimated.append("output_tokens")
    if input_tokens is None:  # no prompt to estimate from: nothing of it can be priced
        raise BadResponse(
            None, f"200 message without usable usage ({_short(usage) if usage else 'none'})", maybe_billed=True
        )
    details = usage.get("output_tokens_details")
    reported = token_count(details.get("thinking_tokens")) if isinstance(details, Mapping) else None
    thinking_tokens = reported if reported is not None else round(sum(estimate_text(t) for t in thoughts))
    stop_reason = data.get("stop_reason")
    model = data.get("model")
    message_id = data.get("id")
    return Answer(
        text="".join(texts),
        thinking="".join(thoughts) if thoughts else None,
        stop_reason=str(stop_reason) if stop_reason is not None else None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=token_count(usage.get("cache_read_input_tokens")),
        cache_creation_input_tokens=token_count(usage.get("cache_creation_input_tokens")),
        request_id=request_id or (str(message_id) if message_id else None),
        model=str(model) if model else None,
        thinking_tokens=min(thinking_tokens, output_tokens),  # an estimate never above what was billed
        tool_input=tool_input,
        tool_use_id=tool_use_id,
        content=tuple(blocks),
        usage_estimated=", ".join(estimated) or None,
    )


def _taken_back(turn: dict[str, Any]) -> dict[str, Any]:
    """An earlier answer's blocks as an assistant turn the Messages API takes back: a tool call's input
    an object (`{}` when it was not JSON), no empty texts, an empty turn saying so. Other turns as they are."""
    content = turn.get("content")
    if turn.get("role") != "assistant" or not isinstance(content, list | tuple):
        return turn
    blocks: list[dict[str, Any]] = []
    for block in content:
        if block.get("type") == "tool_use" and not isinstance(block.get("input"), dict):
            block = {**block, "input": {}}
        elif block.get("type") == "text" and not block.get("text"):
            continue
        blocks.append(block)
    return {**turn, "content": blocks or [{"type": "text", "text": "(no answer)"}]}


def _text(value: Any) -> str:
    # A text field that is null (seen from gateways) is an empty text, not a crash.
    return value if isinstance(value, str) else "" if value is None else str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
