"""The simulator's `POST /v1/messages`: Zhipu's Anthropic-compatible endpoint, faults included (JSON or
SSE, usage zeros at `message_start`, Zhipu-shaped errors, 400/1261 over the context, 429/1302 over the
per-model concurrency cap)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from runner.job import catalog
from runner.simulator.answers import anthropic_message, ask_from_messages, count_tokens, prompt_key, prompt_text
from runner.simulator.batch_input import TOOL_CHOICE_MESSAGE
from runner.simulator.config import BILLED_FAULTS, ERRORS, HTML_502
from runner.simulator.host import Host

__all__ = ["MESSAGES_PATH", "MessagesAPI"]

MESSAGES_PATH = "/v1/messages"


class MessagesAPI:
    """The /v1/messages route of one Simulator."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def add_routes(self, app: web.Application) -> None:
        """Register the Messages route on the simulator's app."""
        app.router.add_post(MESSAGES_PATH, self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        cfg = self.host.config
        with self.host.lock:
            self.host.served.requests += 1

        key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not key:
            return self._error("1001", "auth_missing")
        if cfg.api_keys is not None and key not in cfg.api_keys:
            return self._error("401", "auth_bad")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._zhipu_400("1210", "Invalid JSON body")
        model = body.get("model")
        if model not in catalog.models():
            return self._error("400_1211", "unknown_model")
        if not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            return self._zhipu_400("1214", "max_tokens and messages are required")
        if count_tokens(prompt_text(body), cfg.token_scale) > catalog.models()[model].context:
            return self._zhipu_400("1261", "Prompt too long")  # the model's context window, as Zhipu does
        choice = body.get("tool_choice")
        if cfg.forced_tool_choice == "refuse" and isinstance(choice, dict) and choice.get("type") in ("tool", "any"):
            return self._zhipu_400("1214", TOOL_CHOICE_MESSAGE)  # what the native backend says
        stops = body.get("stop_sequences")
        limit = cfg.anthropic_max_stop_sequences
        if limit is not None and isinstance(stops, list) and len(stops) > limit:
            return self._zhipu_400("1214", f"stop_sequences: at most {limit} allowed, got {len(stops)}")

        with self.host.lock:
            busy = self.host.served.in_flight[model]
            over_cap = cfg.concurrency_cap is not None and busy >= cfg.concurrency_cap
            if over_cap:
                self.host.served.by_outcome["429_1302_cap"] += 1
            else:
                self.host.served.in_flight[model] += 1
                self.host.served.max_in_flight = max(self.host.served.max_in_flight, busy + 1)
            fault = self.host.rng.choice(cfg.faults) if cfg.faults and self.host.rng.random() < cfg.fault_rate else None
            if cfg.fault_match is not None and cfg.fault_match not in prompt_text(body):
                fault = None
            elif cfg.fault_attempts:
                attempt_key = prompt_key(prompt_text(body))
                self.host.served.attempts[attempt_key] += 1
                if self.host.served.attempts[attempt_key] <= cfg.fault_attempts:
                    fault = cfg.faults[0]
        if over_cap:
            return self._error("429_1302", None)  # refused at once: no latency
        try:
            return await self._answer(request, body, model, fault)
        finally:
            with self.host.lock:
                self.host.served.in_flight[model] -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], model: str, fault: str | None
    ) -> web.StreamResponse:
        cfg = self.host.config
        delay = cfg.slow_s if fault in ("slow", "hang") else self.host.delay()
        if fault is not None and fault not in BILLED_FAULTS and fault != "stream_error":
            # The server failed before generating anything: nothing is billed.
            if delay > 0:
                await asyncio.sleep(delay)
            return self._fault_response(request, fault)

        ask = ask_from_messages(body, model_default=cfg.anthropic_thinking == "model")
        reply = self.host.reply(ask)
        message = anthropic_message(reply, model, self.host.new_id("msg_"))
        key = prompt_key(ask.prompt)
        if fault == "hang":
            self.host.count("hang")  # counted on arrival: its handler is cancelled when the client gives up
        if fault == "stream_error":  # the generation breaks off mid-stream: not billed
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await self.host.generate(delay, "online", key, reply)
        if fault == "hang":
            # Generated and billed, but never answered: the client waits until it gives up.
            await asyncio.Event().wait()
        if fault in ("finish_network_error", "finish_sensitive"):
            self.host.count(fault)
            reason = fault.removeprefix("finish_")
            kept = [b for b in message["content"] if b["type"] == "text"][:1] if reason == "network_error" else []
            for block in kept:
                block["text"] = block["text"][: len(block["text"]) // 2]  # a partial answer
            message = {**message, "content": kept, "stop_reason": reason}
        if fault == "partial_json":
            self.host.count("partial_json")
            text = json.dumps(message, ensure_ascii=False)
            return web.Response(text=text[: len(text) // 2], content_type="application/json")
        if body.get("stream"):
            return await self._stream(request, message, key, fail_midway=fault == "stream_error")
        response = web.json_response(message, headers={"x-request-id": message["id"]})
        self._delivered(key, message)
        return response

    def _fault_response(self, request: web.Request, fault: str) -> web.Response:
        """The answer to a fault the server raises instead of generating."""
        if fault in ERRORS:
            return self._error(fault, fault)
        self.host.count(fault)
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client: the socket is gone
        if fault == "200_html":  # a gateway's error page, mislabelled as JSON
            return web.Response(text=HTML_502, content_type="application/json")
        assert fault == "200_error", fault
        return web.json_response(
            self._shaped({"error": {"type": "1234", "message": "Network error, please try again"}})
        )

    async def _stream(
        self, request: web.Request, message: dict[str, Any], key: str, *, fail_midway: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": message["id"]})
        await resp.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

        # Zhipu puts zeros in message_start and the real usage in message_delta (wire.md, quirk D1).
        start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        await send("message_start", {"type": "message_start", "message": start})
        await send("ping", {"type": "ping"})
        if fail_midway:
            self.host.count("stream_error")
            await send("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            await resp.write_eof()
            return resp
        for i, block in enumerate(message["content"]):
            kind = block["type"]
            if kind == "tool_use":
                empty = {**block, "input": {}}
                value, delta_kind, field_name = json.dumps(block["input"]), "input_json_delta", "partial_json"
            else:
                empty = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
                value, delta_kind, field_name = block[kind], f"{kind}_delta", kind
            await send("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty})
            for j in range(0, len(value), 24):
                delta = {"type": delta_kind, field_name: value[j : j + 24]}
                await send("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
            await send("content_block_stop", {"type": "content_block_stop", "index": i})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": message["usage"],
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        self._delivered(key, message)
        return resp

    def _delivered(self, key: str, message: dict[str, Any]) -> None:
        """Count an answer that reached the client (the bill is kept apart, by `bill`)."""
        with self.host.lock:
            self.host.served.ok += 1
            self.host.served.by_outcome["ok"] += 1
            self.host.served.answered[key] += 1
            self.host.served.input_tokens += message["usage"]["input_tokens"]
            self.host.served.output_tokens += message["usage"]["output_tokens"]

    def _error(self, code: str, outcome: str | None) -> web.Response:
        status, payload = ERRORS[code]
        self.host.count(outcome or code)
        headers = {}
        if status == 429 and self.host.config.retry_after_s is not None:
            headers["retry-after"] = str(self.host.config.retry_after_s)
        return web.json_response(self._shaped(payload), status=status, headers=headers)

    def _zhipu_400(self, code: str, message: str) -> web.Response:
        self.host.count(f"400_{code}")
        body = {"type": "error", "error": {"type": code, "message": message}}
        return web.json_response(self._shaped(body), status=400)

    def _shaped(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An Anthropic-shaped error body in the shape `error_shape` asks for: as it is, or native
        (`{"error": {"code", "message"}}`, no `type`, as api.z.ai has been seen answering)."""
        if self.host.config.error_shape == "anthropic":
            return {**payload, "request_id": self.host.new_id("")}
        error = payload.get("error") or {}
        return {"error": {"code": str(error.get("type")), "message": error.get("message", "")}}
