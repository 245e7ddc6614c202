"""A faithful local stand-in for Zhipu's endpoints: a real HTTP server on loopback, in a thread
(`SimulatorThread`), standalone (`glm-batch simulate`) or in-process for `endpoint: simulator`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import threading
from collections import Counter
from typing import Any

from aiohttp import web

from runner.simulator.answers import Ask, Reply, compose, lexicon_score, prompt_key, share
from runner.simulator.config import SimConfig
from runner.simulator.host import APIS, Served
from runner.simulator.messages import MessagesAPI
from runner.simulator.native import NATIVE_PATH, NativeAPI
from runner.simulator.skill import skill_variant, stated_confidence


class Simulator:
    """The server itself; runs on the event loop that calls `start`."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.served = Served()  # the counts and the bill; the routes update them under `lock`
        # Stats and batches are read from other threads; reentrant because a batch line is answered
        # (which counts samples under the lock) while its batch is advanced under it.
        self.lock = threading.RLock()
        self.rng = random.Random(self.config.seed)  # ids, latency and fault draws, from one seed
        self._runner: web.AppRunner | None = None
        self._generating: set[asyncio.Task[None]] = set()  # generations outliving their client
        self.messages = MessagesAPI(self)
        self.native = NativeAPI(self)
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL to give the SDK (it appends /v1/messages); the native API is at url + /api/paas/v4."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:port (0 picks a free port)."""
        # Room for a 100 MB batch file upload (Zhipu's limit) plus its multipart framing.
        app = web.Application(client_max_size=128 * 1024 * 1024)
        self.messages.add_routes(app)
        self.native.add_routes(app)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_post("/_sim/config", self._post_config)
        # handler_cancellation: a client that hangs up cancels its handler, so an abandoned request is
        # never counted as a delivered answer (it may still be billed: see `_generate`). A short
        # shutdown_timeout: a hung request must not hold `stop` for aiohttp's default 60 s.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every connection; abandon generations and late creates still running."""
        for task in [*self._generating, *self.native.landing]:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def configure(self, **changes: Any) -> None:
        """Change behaviour while running, e.g. `configure(concurrency_cap=6)`."""
        with self.lock:
            self.config = dataclasses.replace(self.config, **changes)

    def stats(self) -> dict[str, Any]:
        """Counts so far: answers delivered on /v1/messages, the bill over both APIs (what the account
        is charged for, per API and per prompt), and the batches by status."""
        self.native.advance_all()
        with self.lock:
            s = self.served
            per_prompt = self._billed_per_prompt()
            return {
                "requests": s.requests,
                "ok": s.ok,
                "outcomes": dict(s.by_outcome),
                "distinct_prompts_answered": len(s.answered),
                "prompts_answered_twice": sum(1 for n in s.answered.values() if n > 1),
                "max_in_flight": s.max_in_flight,
                "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens,
                "billed": {api: sum(n for (a, _), n in s.billed.items() if a == api) for api in APIS},
                "billed_tokens": {api: dict(s.billed_tokens[api]) for api in APIS},
                "distinct_prompts_billed": len(per_prompt),
                "prompts_billed_twice": sum(1 for c in per_prompt.values() if sum(c.values()) > 1),
                "prompts_billed_on_both_apis": sum(1 for c in per_prompt.values() if len(c) > 1),
                **self.native.stats_locked(),
            }

    def billed_prompts(self) -> dict[str, dict[str, int]]:
        """The bill per prompt (keyed by `prompt_key` of its text): how often each API billed it."""
        self.native.advance_all()
        with self.lock:
            return {k: dict(c) for k, c in self._billed_per_prompt().items()}

    def _billed_per_prompt(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for (api, key), n in self.served.billed.items():
            out.setdefault(key, Counter())[api] += n
        return out

    def reset_stats(self) -> None:
        """Forget what was answered and billed (between test cases sharing one simulator)."""
        with self.lock:
            self.served = Served()

    @property
    def native_url(self) -> str:
        """The base of Zhipu's native API on this simulator (tokenizer, chat completions, Batch API)."""
        return self.url + NATIVE_PATH

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _post_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        if "faults" in changes:
            changes["faults"] = tuple(changes["faults"])
        self.configure(**changes)
        return web.json_response(dataclasses.asdict(self.config))

    # ---- shared by every route -------------------------------------------------------------------

    def reply(self, ask: Ask) -> Reply:
        """The answer to an ask, the same on every route (see `runner.simulator.answers.compose`)."""
        return compose(
            ask, self.config.token_scale, self._invalid, self._variant, self.config.reasoning_tokens, self._stated
        )

    def bill(self, api: str, key: str, reply: Reply) -> None:
        """Record a generation the server completed: what the account is charged for."""
        with self.lock:
            self.served.billed[(api, key)] += 1
            self.served.billed_tokens[api]["input"] += reply.input_tokens
            self.served.billed_tokens[api]["output"] += reply.output_tokens

    def new_id(self, prefix: str) -> str:
        """An id shaped like Zhipu's: prefix, yyyyMMddHHmmss, 16 hex digits."""
        return f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}{self.rng.getrandbits(64):016x}"

    def count(self, outcome: str) -> None:
        """Count one outcome in stats()["outcomes"]."""
        with self.lock:
            self.served.by_outcome[outcome] += 1

    def delay(self) -> float:
        """How long this answer takes: Gaussian around latency_s (sd latency_jitter_s), never below 0."""
        cfg = self.config
        if not cfg.latency_jitter_s:
            return cfg.latency_s
        return max(0.0, self.rng.gauss(cfg.latency_s, cfg.latency_jitter_s))

    async def generate(self, delay: float, api: str, key: str, reply: Reply) -> None:
        """Spend `delay` generating, then bill. The generation runs on when the client hangs up (its
        handler is cancelled), as on a real server, so an abandoned request is still billed."""
        if delay <= 0:
            self.bill(api, key, reply)
            return

        async def run() -> None:
            await asyncio.sleep(delay)
            self.bill(api, key, reply)

        task = asyncio.ensure_future(run())
        self._generating.add(task)
        task.add_done_callback(self._generating.discard)
        await asyncio.shield(task)

    # ---- how `reply` varies an answer ------------------------------------------------------------

    def _variant(self, ask: Ask, prompt: str, turn: int) -> int:
        """Which answer a sampled request gets: 0, the usual one, or (for some of the times a prompt is
        asked at a temperature above 0) another. Asks are counted on first turns, as they arrive."""
        cfg = self.config
        if ask.model in cfg.model_error:  # a model of given skill (runner.simulator.skill)
            return self._skill_variant(ask, prompt, turn)
        if not cfg.sample_disagreement or ask.temperature == 0 or turn != 1:
            return 0
        key = prompt_key(prompt)
        with self.lock:
            repeat = self.served.asked[key]
            self.served.asked[key] += 1
        chance = share(f"sample{repeat}{prompt}")
        rate = cfg.sample_disagreement if lexicon_score(prompt) else min(0.5, 2 * cfg.sample_disagreement)
        return repeat + 1 if chance < rate else 0

    def _skill_variant(self, ask: Ask, prompt: str, turn: int) -> int:
        """The answer of a model with an error share: each sample numbered among this model's asks of
        the prompt (a repair turn answers as its first turn did, as near as the count can tell)."""
        cfg = self.config
        repeat = None
        if ask.temperature != 0:
            key = f"{ask.model}|{prompt_key(prompt)}"
            with self.lock:
                repeat = self.served.asked[key] - (turn != 1)
                self.served.asked[key] += turn == 1
        flat = cfg.confidence == "flat"
        return skill_variant(
            ask.model, prompt, cfg.model_error[ask.model], flat, cfg.sample_disagreement, repeat, cfg.seed
        )

    def _stated(self, ask: Ask, prompt: str) -> float | None:
        """The confidence a model of given skill states in its answer (None: any other model's is the
        usual made-up number)."""
        cfg = self.config
        if ask.model not in cfg.model_error:
            return None
        return stated_confidence(ask.model, prompt, cfg.model_error[ask.model], cfg.confidence == "flat", cfg.seed)

    def _invalid(self, prompt: str, turn: int) -> bool:
        cfg = self.config
        return share(f"invalid{prompt}") < cfg.invalid_rate and turn <= cfg.invalid_turns


class SimulatorThread(Simulator):
    """A Simulator on its own event loop in a daemon thread: for tests and `endpoint: simulator`."""

    def __init__(self, config: SimConfig | None = None, port: int = 0) -> None:
        super().__init__(config)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="glm-batch-simulator", daemon=True)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(self._port), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def serve_forever(port: int, config: SimConfig) -> None:
    """Run a simulator in the foreground until cancelled (`glm-batch simulate`)."""
    sim = Simulator(config)
    await sim.start(port)
    print(f"simulator listening on {sim.url} (POST /v1/messages, /api/paas/v4/..., GET /_sim/stats)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
