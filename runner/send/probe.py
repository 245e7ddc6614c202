"""The probes behind `glm-batch doctor`: one-token Messages requests that find out what an account and
its route really do (key, balance, model, tool choice, stop words, error shape, concurrency) and what
they cost. Errors are read by runner.send.client.classify; the concurrency ramp's 1302 is the measurement."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.job.catalog import ModelInfo
    from runner.job.resolve import Job
    from runner.money.pricing import PriceTable

CONTROL_MODEL = "glm-4-flash"  # on Zhipu's Batch API list, and its batches are free: the control
NO_SUCH_MODEL = "glm-doctor-no-such-model"  # refused before any token is billed: shows the error shape
RAMP = (1, 2, 3, 4, 6, 8, 12, 16)  # concurrency levels tried, each a burst of one-token requests
PROBE_INPUT_TOKENS = 200  # an upper bound on any probe's input, tool schema included (GLM counts ~1.5x ours)
PROMPT = "Reply with the word OK."
STOPS = ["\n\nEND", "STOP"]
TOOL = {
    "name": "answer",
    "description": "Give the answer.",
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
}
ACCOUNT_CODES = {  # what an account-level refusal is called in the table
    **dict.fromkeys(("1000", "1001", "1002", "1003", "1004", "401", "authentication_error"), "key"),
    **dict.fromkeys(("1113", "1110", "1111", "1112", "1121", "billing_error"), "balance"),
    **dict.fromkeys(("1308", "1309", "1310"), "plan"),
    **dict.fromkeys(("1211", "1220", "1221", "1222", "404"), "model"),
}


@dataclass(frozen=True)
class Target:
    """What doctor probes: one endpoint and one model."""

    endpoint: str  # the endpoint's name, or its URL
    base_url: str | None  # None: the in-process simulator
    native_url: str | None  # Zhipu's native API (Batch API); None: beside the base URL
    currency: str
    key_env: tuple[str, ...]
    model: str
    info: ModelInfo | None  # None: not in the catalogue (the endpoint is still asked)
    job: Job | None = None


@dataclass
class Check:
    """One line of the table: what was checked, whether it works (None: unknown), what was seen."""

    name: str
    ok: bool | None
    result: str
    detail: str = ""


@dataclass
class Report:
    """What doctor found, and what it cost."""

    target: Target
    url: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what is recorded for the target
    control: dict[str, Any] = field(default_factory=dict)  # what is recorded for the control model
    batches: list[dict[str, Any]] = field(default_factory=list)
    worst_case: float | None = None
    spent: float = 0.0
    requests: int = 0
    aborted: str | None = None  # the account-level refusal that stopped the probes

    def add(self, name: str, ok: bool | None, result: str, detail: str = "") -> None:
        self.checks.append(Check(name, ok, result, detail))


@dataclass(frozen=True)
class Refusal:
    """An error answer (or a fault with none): status, business code, message, the body's shape, and
    how runner.send.client.classify (the one rule) reads it."""

    status: int
    code: str | None
    message: str
    shape: str | None  # "anthropic" ({"type":"error","error":{"type":..}}), "native" ({"error":{"code":..}})
    verdict: str  # "retry", "fail" or "abort"
    overload: str | None  # "concurrency" (this account's limit) or "platform" (Zhipu's traffic)


def refusal_of(exc: Exception) -> Refusal:
    """What an SDK error says, classified by the runner's own rule."""
    import anthropic

    from runner.send.client import classify
    from runner.send.retries import BadResponse, error_parts

    fault = classify(exc)
    if isinstance(exc, BadResponse) and exc.code is not None:  # an error object answered with 200
        return Refusal(200, exc.code, fault.message[:300], None, fault.verdict.name.lower(), fault.overload)
    if not isinstance(exc, anthropic.APIStatusError):
        return Refusal(0, None, fault.message[:300], None, fault.verdict.name.lower(), fault.overload)
    code, message, _ = error_parts(exc.body)
    error = exc.body.get("error") if isinstance(exc.body, dict) else None
    shape = None
    if isinstance(error, dict):
        shape = "native" if error.get("code") not in (None, "") else "anthropic" if "type" in error else None
    text = (message or str(exc))[:300]
    return Refusal(exc.status_code, code, text, shape, fault.verdict.name.lower(), fault.overload)


def account_problem(refusal: Refusal) -> str | None:
    """Which account-level check an abort fails (key, balance, plan, model), if it is one."""
    if refusal.verdict != "abort":
        return None
    return ACCOUNT_CODES.get(refusal.code or "", "key")


class Prober:
    """Sends one-token Messages requests and keeps count of what they cost."""

    def __init__(self, url: str, key: str, model: str, table: PriceTable | None, report: Report) -> None:
        from runner.send.client import Client

        # The runner's own client: an answer is what a run would take as one (a 200 carrying an error
        # object, in any of Zhipu's shapes, is that error, not a working key), read by the one reader.
        self._client = Client(url, key, timeout_s=60.0, stream=False)
        self.model = model
        self._table = table
        self._report = report

    async def ask(self, model: str | None = None, **extra: Any) -> tuple[Any, Refusal | None]:
        """One request with max_tokens 1, a transient fault (5xx, 1305, a dropped connection) tried
        again up to 3 times: (the message, None) or (None, what refused it)."""
        from runner.send.client import classify
        from runner.send.retries import retrying, wait_backoff

        try:
            async for attempt in retrying(3, classify=classify, wait=wait_backoff(0.2, 2.0, classify)):
                with attempt:
                    return await self.once(model, **extra)
        except Exception as exc:  # an error answer is what is being probed: read, never raised
            return None, refusal_of(exc)
        raise AssertionError("unreachable: retrying either returns or raises")

    async def once(self, model: str | None = None, **extra: Any) -> tuple[Any, None]:
        """One request with max_tokens 1, no retry: the message, or the SDK's error raised."""
        params: dict[str, Any] = {
            "model": model or self.model,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": PROMPT}],
            **extra,
        }
        self._report.requests += 1
        answer = await self._client.send(params)
        if self._table is not None:
            self._report.spent += self._table.cost(
                input_tokens=answer.input_tokens,
                output_tokens=answer.output_tokens,
                cache_read_tokens=answer.cache_read_input_tokens or 0,
            )
        return answer, None

    async def burst(self, n: int) -> list[Refusal | None]:
        """n requests at once, none retried (a 1302 is the answer sought): what refused each."""

        async def one() -> Refusal | None:
            try:
                await self.once()
            except Exception as exc:  # the refusal is the measurement
                return refusal_of(exc)
            return None

        return list(await asyncio.gather(*(one() for _ in range(n))))

    async def aclose(self) -> None:
        await self._client.aclose()


def cut(text: str, n: int = 90) -> str:
    """`text` on one line, at most `n` characters."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


async def probe_online(prober: Prober, report: Report, ramp_max: int) -> None:
    """The Messages route: key, balance, model, tool choice, stop sequences, error shape, concurrency."""
    learned = report.facts
    _, refusal = await prober.ask()
    problem = account_problem(refusal) if refusal is not None else None
    if refusal is not None and problem:
        report.aborted = f"{refusal.status}/{refusal.code}: {refusal.message}"
        for name in ("key", "balance", "model"):
            if name == problem:
                report.add(name, False, f"refused ({refusal.status}/{refusal.code})", cut(refusal.message))
            else:
                report.add(name, None, "not checked", f"the {problem} check failed first")
        _shape(report, refusal)
        return
    if refusal is None or refusal.verdict == "fail":
        report.add("key", True, "works")
        report.add("balance", True, "not in arrears", "no 1113 / 1308 answer")
    if refusal is None:
        report.add("model", True, f"{prober.model} answers")
    elif refusal.verdict == "fail":
        seen = f"a plain request was refused ({refusal.status}/{refusal.code})"
        report.add("model", None, seen, cut(refusal.message))
    else:  # a fault that persisted through the retries
        for name in ("key", "balance", "model"):
            _known(report, name, refusal)

    _, refused = await prober.ask(tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]})
    if _known(report, "forced tool choice", refused):
        learned["forced_tool_choice"] = refused is None
        report.add(
            "forced tool choice",
            refused is None,
            "accepted" if refused is None else f"refused ({refused.status}/{refused.code})",
            "runs force the tool"
            if refused is None
            else f"runs use tool_choice auto and validate; {cut(refused.message, 60)}",
        )
    _, refused = await prober.ask(stop_sequences=STOPS)
    if _known(report, "two stop sequences", refused):
        learned["stop_sequences_max"] = len(STOPS) if refused is None else 1
        report.add(
            "two stop sequences",
            refused is None,
            "accepted" if refused is None else f"refused ({refused.status}/{refused.code})",
            "" if refused is None else cut(refused.message, 70),
        )
    _, refused = await prober.ask(model=NO_SUCH_MODEL)
    _shape(report, refused)
    await _ramp(prober, report, ramp_max)


def _known(report: Report, name: str, refused: Refusal | None) -> bool:
    """Whether an answer settles a check: a 200 or a refusal of the request itself (a 4xx), not a
    fault that persisted through the retries (then the check is reported unknown, nothing stored)."""
    if refused is None or refused.verdict == "fail":
        return True
    report.add(name, None, "not known", f"{refused.status}/{refused.code} three times: {cut(refused.message, 50)}")
    return False


def _shape(report: Report, refusal: Refusal | None) -> None:
    if refusal is None or refusal.shape is None:
        report.add("error shape", None, "unknown", "no error body to read")
        return
    report.facts["error_shape"] = refusal.shape
    example = (
        '{"type":"error","error":{"type":"CODE",...}}'
        if refusal.shape == "anthropic"
        else '{"error":{"code":"CODE",...}}'
    )
    report.add("error shape", True, refusal.shape, example.replace("CODE", refusal.code or "?"))


async def _ramp(prober: Prober, report: Report, ramp_max: int) -> None:
    """Bursts of 1, 2, 3, 4, 6... one-token requests at once, stopped at the first answer that is this
    account's limit (1302/1303, or a 429 with no code). Zhipu's own traffic (1305, 5xx) says nothing
    about the account: a burst with such faults is sent once more, and the ramp stops if they persist."""
    allowed = 0
    for level in (n for n in RAMP if n <= ramp_max):
        for _ in range(2):
            refusals = [r for r in await prober.burst(level) if r is not None]
            if not refusals or any(r.overload == "concurrency" or r.verdict != "retry" for r in refusals):
                break
        limited = [r for r in refusals if r.overload == "concurrency" and r.verdict == "retry"]
        if limited:
            first = limited[0]
            report.add(
                "concurrency",
                bool(allowed),
                f"{allowed}" if allowed else "below 1",
                f"{len(limited)} of {level} at once refused ({first.status}/{first.code})",
            )
            if allowed:
                report.facts["concurrency"] = allowed
            return
        if refusals:
            first = refusals[0]
            seen = f"{allowed} or more" if allowed else "unknown"
            report.add(
                "concurrency",
                None,
                seen,
                f"ramp stopped at {level}: {first.status}/{first.code} {cut(first.message, 40)}",
            )
            return
        allowed = level
    report.facts["concurrency"] = allowed
    report.add("concurrency", True, f"{allowed} or more", f"no 1302 up to {allowed} at once (--ramp-max)")
