"""The wire: one Messages API call through the official SDK, turned into an Answer.

    client = Client(base_url, api_key, timeout_s=600, stream=False)
    answer = await client.send(request.params)

The SDK client is built with `max_retries=0` (retries are tenacity's alone, in runner.send.retries) and the
aiohttp transport, which costs about a third of the CPU per request of the default one. The key goes out
both as `Authorization: Bearer` (what SDK 2.x sends) and as `x-api-key` (what Zhipu documents).
"""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
from anthropic.types import Message

from runner.money.tokens import estimate_text
from runner.records import Answer
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


class StoppedAnswer(Exception):
    """An answer that ended with one of Zhipu's own finish reasons: `network_error` (the inference broke
    off, leaving a partial answer: sent again) or `sensitive` (the content was blocked: the row fails)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# finish reasons that are not an answer: network_error is retried, the others fail as content_filter.
_STOPPED = frozenset({"network_error", "sensitive"})


class Client:
    """An AsyncAnthropic pointed at one endpoint, sending one request at a time per call."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float, stream: bool, stall_s: float = 120.0) -> None:
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout_s,
            default_headers={"x-api-key": api_key},
            http_client=anthropic.DefaultAioHttpClient(),
        )
        self._timeout = timeout_s
        self._stream = stream
        self._stall = stall_s

    async def send(self, params: dict[str, Any]) -> Answer:
        """Send one request; raise the SDK's error, or BadResponse for a 200 that is not a message.

        Streaming, a long answer may take as long as it needs: what ends the attempt is `stall_s`
        without any event (a hung connection), raised as the SDK's timeout error."""
        if self._stream:
            try:
                async with asyncio.timeout(self._stall) as quiet:
                    async with self._sdk.messages.stream(**params, timeout=None) as stream:
                        async for _event in stream:
                            quiet.reschedule(asyncio.get_running_loop().time() + self._stall)
                        message = await stream.get_final_message()
                        request_id = _request_id(stream.response.headers)
            except TimeoutError:
                raise StalledStream(self._stall) from None
            except AssertionError:  # the SDK's accumulator found no message: an HTML page, a cut-off stream
                raise BadResponse(None, "the stream ended without a complete message") from None
        else:
            raw = await self._sdk.messages.with_raw_response.create(**params, timeout=self._timeout)
            message = await raw.parse()
            request_id = _request_id(raw.headers)
        return _answer(message, request_id)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._sdk.close()

    @staticmethod
    def classify(exc: BaseException) -> Fault:
        """This wire's faults (see `classify`)."""
        return classify(exc)


def classify(exc: BaseException) -> Fault:
    """Decide the fate of a Messages API call that raised `exc`.

    Connection faults and timeouts RETRY; an error answer, in either of Zhipu's error shapes, is
    decided by runner.send.retries.status_fault (the one rule for every transport). Anything else (a
    200 whose body is not JSON, a bug) is unclassified, so retried.
    """
    if isinstance(exc, BadResponse):
        return bad_response_fault(exc)
    if isinstance(exc, StoppedAnswer):
        if exc.reason == "network_error":  # generated in part, so billed in part
            return Fault(
                Verdict.RETRY,
                "network_error",
                "the inference broke off (finish_reason network_error)",
                maybe_billed=True,
            )
        return Fault(
            Verdict.FAIL,
            "content_filter",
            "the endpoint blocked this content (finish_reason sensitive); no answer for this row: change its "
            "input or the prompt",
        )
    # The request was sent and may still be answered, and billed, after we gave up on it.
    if isinstance(exc, anthropic.APITimeoutError):
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


def _request_id(headers: Any) -> str | None:
    value = headers.get("request-id") or headers.get("x-request-id")
    return str(value) if value else None


def _answer(message: Message, request_id: str | None) -> Answer:
    # The SDK turns a 200 carrying {"error": {...}} into a Message whose fields are all None.
    if getattr(message, "type", None) != "message" or message.usage is None:
        error = getattr(message, "error", None) or {}
        code = error.get("type") or error.get("code") if isinstance(error, dict) else None
        text = error.get("message") if isinstance(error, dict) else None
        raise BadResponse(str(code) if code else None, f"200 answer is not a message: {text or 'no body'}")
    if message.stop_reason in _STOPPED:  # the SDK keeps a stop reason it does not know as it came
        raise StoppedAnswer(str(message.stop_reason))
    texts: list[str] = []
    thoughts: list[str] = []
    blocks: list[dict[str, Any]] = []
    tool_input: Any = None
    tool_use_id: str | None = None
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "thinking":
            thoughts.append(block.thinking)
            blocks.append({"type": "thinking", "thinking": block.thinking, "signature": block.signature})
        elif block.type == "tool_use":
            if tool_use_id is None:
                tool_input, tool_use_id = block.input, block.id
            blocks.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
    usage = message.usage
    details = getattr(usage, "output_tokens_details", None)
    reported = getattr(details, "thinking_tokens", None) if details is not None else None
    thinking_tokens = reported if reported is not None else round(sum(estimate_text(t) for t in thoughts))
    return Answer(
        text="".join(texts),
        thinking="".join(thoughts) if thoughts else None,
        stop_reason=message.stop_reason,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        request_id=request_id or message.id,
        model=message.model,
        thinking_tokens=min(thinking_tokens, usage.output_tokens),  # an estimate never above what was billed
        tool_input=tool_input,
        tool_use_id=tool_use_id,
        content=tuple(blocks),
    )
