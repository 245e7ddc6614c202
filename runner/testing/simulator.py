"""A faithful local stand-in for Zhipu's Anthropic-compatible endpoint: a real HTTP server on loopback.

It speaks `POST /v1/messages` the way open.bigmodel.cn does (see wire.md): JSON or SSE with named events,
usage zeros in `message_start` and the real counts in `message_delta`, both auth headers, Zhipu-shaped
error bodies with the business code in `error.type`, and 400/1261 for a prompt over the model's context.
It adds what tests and benchmarks need:

- latency (fixed plus jitter) and a concurrency cap per model that answers 429/1302 above it;
- injected faults at a given rate: 429 1302/1305/1113, 500, 529, dropped connections, slow answers,
  a mid-stream error event, a 200 whose body is an error;
- deterministic answers derived from the prompt (`answer_for`), so a test can prove each row got its own;
  with `sample_disagreement`, a prompt asked at a temperature above 0 sometimes gets another structured
  answer, the way a sampling model does, and more often where the lexicon finds no sentiment word (a
  model wavers most where it is unsure); deterministic per repeat of a prompt, so tests can count;
- a ledger of what it answered: `stats()` counts successful answers per prompt, so a test can prove no
  prompt was paid for twice.

    with SimulatorThread(SimConfig(latency_s=0.01)) as sim:   # in a background thread
        sim.url, sim.stats(), sim.configure(concurrency_cap=6)

`glm-batch simulate --port P` runs it standalone; `endpoint: simulator` starts one in-process for a run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import random
import re
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from runner.job import catalog

FAULTS = (
    "429_1302", "429_1305", "429_1113", "429_1308", "500", "529", "drop", "slow", "stream_error", "200_error",
    "400_1261", "400_1211", "401", "413",
)  # fmt: skip
# The mix used when a rate is given without naming faults: every retryable kind, none that abort a run.
RETRYABLE_FAULTS = ("429_1302", "429_1305", "500", "529", "drop", "stream_error", "200_error")

_ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "429_1302": (
        429,
        {"type": "error", "error": {"type": "1302", "message": "您的账户已达到速率限制，请您控制请求频率"}},
    ),
    "429_1305": (429, {"error": {"type": "1305", "message": "该模型当前访问量过大，请您稍后再试"}, "type": "error"}),
    "429_1113": (429, {"type": "error", "error": {"type": "1113", "message": "余额不足或无可用资源包,请充值。"}}),
    "500": (500, {"type": "error", "error": {"type": "500", "message": "Internal Error"}}),
    "529": (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "401": (401, {"error": {"message": "token expired or incorrect", "type": "401"}}),
    "1001": (401, {"error": {"message": "Authentication parameter not received in Header", "type": "1001"}}),
    "1211": (
        400,
        {"type": "error", "error": {"type": "1211", "message": "Unknown Model, please check the model code."}},
    ),
    "429_1308": (429, {"type": "error", "error": {"type": "1308", "message": "Usage limit reached for 5 hour."}}),
    "400_1211": (
        400,
        {"type": "error", "error": {"type": "1211", "message": "Unknown Model, please check the model code."}},
    ),
    "400_1261": (400, {"type": "error", "error": {"type": "1261", "message": "Prompt too long"}}),
    "413": (413, {"type": "error", "error": {"type": "request_too_large", "message": "Request too large"}}),
}

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


@dataclass
class SimConfig:
    """How the simulator behaves; every field can be changed while it runs (`configure`)."""

    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    concurrency_cap: int | None = None  # per model; above it: 429 with code 1302
    fault_rate: float = 0.0
    faults: tuple[str, ...] = RETRYABLE_FAULTS
    # Deterministic faults: each prompt's first `fault_attempts` requests get faults[0], later ones succeed.
    fault_attempts: int = 0
    fault_match: str | None = None  # when set, only prompts containing this text are ever faulted
    # Structured answers: this share of prompts gets a schema-invalid answer on its first
    # `invalid_turns` turns (a repair turn then gets a valid one, unless invalid_turns is larger).
    invalid_rate: float = 0.0
    invalid_turns: int = 1
    # Sampling: this share of the times a prompt is asked (temperature not 0) gets a different structured
    # answer (another label, other values); twice the share, up to half, for prompts it is unsure of.
    sample_disagreement: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown simulator faults {sorted(unknown)}; known: {', '.join(FAULTS)}")

    slow_s: float = 30.0  # how long a "slow" fault holds the answer
    retry_after_s: float | None = None  # sent with 429s when set
    api_keys: tuple[str, ...] | None = None  # None: any non-empty key is valid
    token_scale: float = 1.0  # multiplies every token count (a tokenizer unlike the estimator's)
    seed: int = 0


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


def structured_answer(schema: dict[str, Any], prompt: str, invalid: bool = False, variant: int = 0) -> Any:
    """A value for a JSON Schema, derived from the prompt. An enum of labels is chosen by a tiny word
    lexicon (so a sentiment job gets a plausible, imperfect accuracy); everything else from the
    prompt's hash. With `invalid`, the value breaks the schema (an unknown label, a missing field).
    A `variant` above 0 is another valid answer to the same prompt (another label, other values)."""
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
    parts = [_text_of(body.get("system"))]
    parts += [_text_of(m.get("content")) for m in body.get("messages", [])]
    return "\n".join(parts)


def count_tokens(text: str, scale: float = 1.0) -> int:
    """The simulator's tokenizer: about 4 Latin characters a token, 0.7 tokens per CJK character."""
    # ASCII holds no wide character (and every request is counted, some twice: skip the scan for it).
    cjk = 0 if text.isascii() else sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    latin = len(text) - cjk
    return max(1, round((latin / 4 + cjk * 0.7) * scale))


def _share(text: str) -> float:
    """A number in [0, 1] fixed by `text`: how the simulator picks which prompts a rate applies to."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


@dataclass
class _Stats:
    requests: int = 0
    ok: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # prompt hash -> successful answers
    attempts: Counter[str] = field(default_factory=Counter)  # prompt hash -> requests seen
    asked: Counter[str] = field(default_factory=Counter)  # prompt hash -> first turns answered (sampling)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class Simulator:
    """The server itself; runs on the event loop that calls `start`."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._stats = _Stats()
        self._lock = threading.Lock()  # stats are read from other threads
        self._rng = random.Random(self.config.seed)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL to give the SDK (it appends /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:port (0 picks a free port)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/api/paas/v4/tokenizer", self._tokenizer)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_post("/_sim/config", self._post_config)
        # handler_cancellation: a client that hangs up cancels its handler, so an abandoned request is
        # never counted as a delivered answer.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every connection."""
        if self._runner is not None:
            await self._runner.cleanup()

    def configure(self, **changes: Any) -> None:
        """Change behaviour while running, e.g. `configure(concurrency_cap=6)`."""
        with self._lock:
            self.config = dataclasses.replace(self.config, **changes)

    def stats(self) -> dict[str, Any]:
        """Counts so far: requests, ok answers, outcomes, prompts answered more than once, peak in flight."""
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "ok": s.ok,
                "outcomes": dict(s.by_outcome),
                "distinct_prompts_answered": len(s.answered),
                "prompts_answered_twice": sum(1 for n in s.answered.values() if n > 1),
                "max_in_flight": s.max_in_flight,
                "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens,
            }

    def reset_stats(self) -> None:
        """Forget what was answered (between test cases sharing one simulator)."""
        with self._lock:
            self._stats = _Stats()

    async def _tokenizer(self, request: web.Request) -> web.Response:
        """Zhipu's native token counter: the same count /v1/messages would report, and no answer."""
        if not request.headers.get("authorization", "").removeprefix("Bearer "):
            return self._error("1001", "auth_missing")
        body = await request.json()
        messages = body.get("messages", [])
        system = "".join(_text_of(m.get("content")) for m in messages if m.get("role") == "system")
        rest = [m for m in messages if m.get("role") != "system"]
        tokens = count_tokens(prompt_text({"system": system, "messages": rest}), self.config.token_scale)
        self._count("tokenizer")
        return web.json_response({"id": "tok", "created": 0, "request_id": "tok", "usage": {"prompt_tokens": tokens}})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _post_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        if "faults" in changes:
            changes["faults"] = tuple(changes["faults"])
        self.configure(**changes)
        return web.json_response(dataclasses.asdict(self.config))

    # ---- the Messages endpoint -------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        with self._lock:
            self._stats.requests += 1

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
            return self._error("1211", "unknown_model")
        if not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            return self._zhipu_400("1214", "max_tokens and messages are required")
        if count_tokens(prompt_text(body), cfg.token_scale) > catalog.models()[model].context:
            return self._zhipu_400("1261", "Prompt too long")  # the model's context window, as Zhipu does

        with self._lock:
            busy = self._stats.in_flight[model]
            if cfg.concurrency_cap is not None and busy >= cfg.concurrency_cap:
                self._stats.by_outcome["429_1302_cap"] += 1
                over_cap = True
            else:
                over_cap = False
                self._stats.in_flight[model] += 1
                self._stats.max_in_flight = max(self._stats.max_in_flight, busy + 1)
            fault = self._rng.choice(cfg.faults) if cfg.faults and self._rng.random() < cfg.fault_rate else None
            if cfg.fault_match is not None and cfg.fault_match not in prompt_text(body):
                fault = None
            elif cfg.fault_attempts:
                prompt_key = hashlib.sha256(prompt_text(body).encode()).hexdigest()
                self._stats.attempts[prompt_key] += 1
                if self._stats.attempts[prompt_key] <= cfg.fault_attempts:
                    fault = cfg.faults[0]
        if over_cap:
            return self._error("429_1302", None)
        try:
            return await self._answer(request, body, model, fault)
        finally:
            with self._lock:
                self._stats.in_flight[model] -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], model: str, fault: str | None
    ) -> web.StreamResponse:
        cfg = self.config
        delay = cfg.latency_s + (self._rng.random() * cfg.latency_jitter_s if cfg.latency_jitter_s else 0.0)
        if fault == "slow":
            delay = cfg.slow_s
        if delay > 0:
            await asyncio.sleep(delay)
        if fault in _ERRORS:
            return self._error(fault, fault)
        if fault == "drop":
            self._count("drop")
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client: the socket is gone
        if fault == "200_error":
            self._count("200_error")
            return web.json_response({"error": {"type": "1234", "message": "Network error, please try again"}})

        message = self._message(body, model) if not body.get("tools") else self._tool_message(body, model)
        prompt_key = hashlib.sha256(prompt_text(body).encode()).hexdigest()
        if body.get("stream"):
            return await self._stream(request, message, prompt_key, fail_midway=fault == "stream_error")
        response = web.json_response(message, headers={"x-request-id": message["id"]})
        self._delivered(prompt_key, message)
        return response

    def _message(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        scale = self.config.token_scale
        prompt = prompt_text(body)
        text = answer_for(prompt)
        system = _text_of(body.get("system"))
        if TEXT_SCHEMA_MARKER in system:  # text mode: JSON in a fenced block, made from the schema asked for
            schema = json.loads(system.split(TEXT_SCHEMA_MARKER, 1)[1].strip().splitlines()[0])
            first = prompt_text({"system": system, "messages": body["messages"][:1]})
            turn = sum(1 for m in body["messages"] if m.get("role") == "user")
            value = structured_answer(schema, first, self._invalid(first, turn), self._variant(body, first, turn))
            text = f"Here you are:\n```json\n{json.dumps(value, ensure_ascii=False)}\n```"
        blocks: list[dict[str, Any]] = []
        thinking = body.get("thinking") or {}
        if thinking.get("type") == "enabled":
            blocks.append({"type": "thinking", "thinking": f"Considering {text.split()[0]}.", "signature": ""})
        out_tokens = sum(count_tokens(b["thinking"], scale) for b in blocks)
        max_tokens = body["max_tokens"]
        stop_reason = "end_turn"
        # Truncate honestly when max_tokens is too small, as a real model does.
        if out_tokens + count_tokens(text, scale) > max_tokens:
            words = text.split()
            while words and out_tokens + count_tokens(" ".join(words), scale) > max_tokens:
                words.pop()
            text = " ".join(words)
            stop_reason = "max_tokens"
        if text:
            out_tokens += count_tokens(text, scale)
            blocks.append({"type": "text", "text": text})
        now = dt.datetime.now(dt.UTC)
        return {
            "id": f"msg_{now:%Y%m%d%H%M%S}{self._rng.getrandbits(64):016x}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": count_tokens(prompt, scale),
                "output_tokens": out_tokens,
                "cache_read_input_tokens": 0,
                "server_tool_use": {"web_search_requests": 0},
                "service_tier": "standard",
            },
        }

    def _tool_message(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """Answer a forced tool call with an input made from the tool's schema (see `structured_answer`)."""
        message = self._message({**body, "tools": None}, model)
        tool = body["tools"][0]
        prompt = prompt_text({"system": body.get("system"), "messages": body["messages"][:1]})
        turn = sum(1 for m in body["messages"] if m.get("role") == "user")
        value = structured_answer(
            tool["input_schema"], prompt, self._invalid(prompt, turn), self._variant(body, prompt, turn)
        )
        block = {
            "type": "tool_use",
            "id": f"toolu_{hashlib.sha256(prompt.encode()).hexdigest()[:20]}",
            "name": tool["name"],
            "input": value,
        }
        out = count_tokens(json.dumps(value), self.config.token_scale)
        return {
            **message,
            "content": [block],
            "stop_reason": "tool_use",
            "usage": {**message["usage"], "output_tokens": out},
        }

    def _variant(self, body: dict[str, Any], prompt: str, turn: int) -> int:
        """Which answer a sampled request gets: 0, the usual one, or (for some of the times a prompt is
        asked at a temperature above 0) another. Asks are counted on first turns, as they arrive."""
        cfg = self.config
        if not cfg.sample_disagreement or body.get("temperature") == 0 or turn != 1:
            return 0
        key = hashlib.sha256(prompt.encode()).hexdigest()
        with self._lock:
            repeat = self._stats.asked[key]
            self._stats.asked[key] += 1
        share = _share(f"sample{repeat}{prompt}")
        rate = cfg.sample_disagreement if lexicon_score(prompt) else min(0.5, 2 * cfg.sample_disagreement)
        return repeat + 1 if share < rate else 0

    def _invalid(self, prompt: str, turn: int) -> bool:
        cfg = self.config
        return _share(f"invalid{prompt}") < cfg.invalid_rate and turn <= cfg.invalid_turns

    async def _stream(
        self, request: web.Request, message: dict[str, Any], prompt_key: str, *, fail_midway: bool
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
            self._count("stream_error")
            await send("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            await resp.write_eof()
            return resp
        for i, block in enumerate(message["content"]):
            kind = block["type"]
            empty = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
            await send("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty})
            value = block[kind]
            for j in range(0, len(value), 24):
                delta = {"type": f"{kind}_delta", kind: value[j : j + 24]}
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
        self._delivered(prompt_key, message)
        return resp

    def _delivered(self, prompt_key: str, message: dict[str, Any]) -> None:
        """Count an answer that reached the client: the simulator's bill."""
        with self._lock:
            self._stats.ok += 1
            self._stats.by_outcome["ok"] += 1
            self._stats.answered[prompt_key] += 1
            self._stats.input_tokens += message["usage"]["input_tokens"]
            self._stats.output_tokens += message["usage"]["output_tokens"]

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._stats.by_outcome[outcome] += 1

    def _error(self, code: str, outcome: str | None) -> web.Response:
        status, payload = _ERRORS[code]
        self._count(outcome or code)
        headers = {}
        if status == 429 and self.config.retry_after_s is not None:
            headers["retry-after"] = str(self.config.retry_after_s)
        return web.json_response(payload, status=status, headers=headers)

    def _zhipu_400(self, code: str, message: str) -> web.Response:
        self._count(f"400_{code}")
        return web.json_response({"type": "error", "error": {"type": code, "message": message}}, status=400)


class SimulatorThread:
    """Runs a Simulator on its own event loop in a daemon thread: for tests and `endpoint: simulator`."""

    def __init__(self, config: SimConfig | None = None, port: int = 0) -> None:
        self.sim = Simulator(config)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="glm-batch-simulator", daemon=True)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(self._port), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        """The base URL to give the SDK."""
        return self.sim.url

    def stats(self) -> dict[str, Any]:
        """See Simulator.stats."""
        return self.sim.stats()

    def configure(self, **changes: Any) -> None:
        """See Simulator.configure."""
        self.sim.configure(**changes)

    def reset_stats(self) -> None:
        """See Simulator.reset_stats."""
        self.sim.reset_stats()


async def serve_forever(port: int, config: SimConfig) -> None:
    """Run a simulator in the foreground until cancelled (`glm-batch simulate`)."""
    sim = Simulator(config)
    await sim.start(port)
    print(f"simulator listening on {sim.url} (POST /v1/messages, GET /_sim/stats)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
