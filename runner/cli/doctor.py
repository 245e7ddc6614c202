"""`glm-batch doctor [JOB] [--endpoint E --model M] [--batch]`: the first-real-run probe.

With the fewest and smallest requests (one output token each; the worst case is printed before, the
cost after) it finds out what the account and the route really do: whether the key works, the balance
and plan (1113 / 1308 named), whether the model exists, whether a forced tool choice and two stop
sequences are accepted, which error shape comes back (a free request for a model that does not
exist), the concurrency the account allows (a short ramp, stopped at the first 1302 / 429), and with
`--batch` whether a 2-line batch on the model passes the Batch API's validation, beside the same on
glm-4-flash (documented eligible, free) as the control, printing the batch object's shape.

What it learns is stored with runner.job.facts.record_facts (per endpoint and model, with the date),
where runs read it: the concurrency default, batch eligibility, the tool-choice fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import JsonOpt, _console, _guarded
from runner.errors import UsageError

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


# ---- what the endpoint said ------------------------------------------------------------------------


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
    from runner.send.retries import error_parts

    fault = classify(exc)
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


# ---- the probes ------------------------------------------------------------------------------------


class Prober:
    """Sends one-token Messages requests and keeps count of what they cost."""

    def __init__(self, url: str, key: str, model: str, table: PriceTable | None, report: Report) -> None:
        import anthropic

        self._sdk = anthropic.AsyncAnthropic(
            api_key=key, base_url=url, max_retries=0, timeout=60.0, default_headers={"x-api-key": key}
        )
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
        message = await self._sdk.messages.create(**params)
        usage = getattr(message, "usage", None)
        if usage is not None and self._table is not None:
            self._report.spent += self._table.cost(
                input_tokens=usage.input_tokens or 0,
                output_tokens=usage.output_tokens or 0,
                cache_read_tokens=getattr(usage, "cache_read_input_tokens", None) or 0,
            )
        return message, None

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
        await self._sdk.close()


def _cut(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


async def probe_online(prober: Prober, report: Report, ramp_max: int) -> None:
    """The Messages route: key, balance, model, tool choice, stop sequences, error shape, concurrency."""
    learned = report.facts
    _, refusal = await prober.ask()
    if refusal is not None and account_problem(refusal):
        problem = account_problem(refusal)
        report.aborted = f"{refusal.status}/{refusal.code}: {refusal.message}"
        for name in ("key", "balance", "model"):
            if name == problem:
                report.add(name, False, f"refused ({refusal.status}/{refusal.code})", _cut(refusal.message))
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
        report.add("model", None, seen, _cut(refusal.message))
    else:
        for name in ("key", "balance", "model"):
            report.add(
                name, None, "not known", f"{refusal.status}/{refusal.code} three times: {_cut(refusal.message, 50)}"
            )

    _, refused = await prober.ask(tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]})
    if _known(report, "forced tool choice", refused):
        learned["forced_tool_choice"] = refused is None
        report.add(
            "forced tool choice",
            refused is None,
            "accepted" if refused is None else f"refused ({refused.status}/{refused.code})",
            "runs force the tool"
            if refused is None
            else f"runs use tool_choice auto and validate; {_cut(refused.message, 60)}",
        )
    _, refused = await prober.ask(stop_sequences=STOPS)
    if _known(report, "two stop sequences", refused):
        learned["stop_sequences_max"] = len(STOPS) if refused is None else 1
        report.add(
            "two stop sequences",
            refused is None,
            "accepted" if refused is None else f"refused ({refused.status}/{refused.code})",
            "" if refused is None else _cut(refused.message, 70),
        )
    _, refused = await prober.ask(model=NO_SUCH_MODEL)
    _shape(report, refused)
    await _ramp(prober, report, ramp_max)


def _known(report: Report, name: str, refused: Refusal | None) -> bool:
    """Whether an answer settles a check: a 200 or a refusal of the request itself (a 4xx), not a
    fault that persisted through the retries (then the check is reported unknown, nothing stored)."""
    if refused is None or refused.verdict == "fail":
        return True
    report.add(name, None, "not known", f"{refused.status}/{refused.code} three times: {_cut(refused.message, 50)}")
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
                f"ramp stopped at {level}: {first.status}/{first.code} {_cut(first.message, 40)}",
            )
            return
        allowed = level
    report.facts["concurrency"] = allowed
    report.add("concurrency", True, f"{allowed} or more", f"no 1302 up to {allowed} at once (--ramp-max)")


# ---- the Batch API ---------------------------------------------------------------------------------


async def probe_batch(native_url: str, key: str, model: str, wait_s: float, label: str) -> dict[str, Any]:
    """A 2-line batch on `model`: upload, create, wait (with a visible timer) up to `wait_s`; what came
    back, the batch object's shape, and whether it passed validation (None: not known in time)."""
    from runner.send.batch_api import BatchAPI, BatchAPIError, BatchStatusError
    from runner.send.batch_api_errors import classify_api_error
    from runner.send.retries import Verdict

    lines = [
        {
            "custom_id": f"doctor-{i}",
            "method": "POST",
            "url": "/v4/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1},
        }
        for i in (1, 2)
    ]
    out: dict[str, Any] = {"model": model, "label": label, "eligible": None}
    with tempfile.TemporaryDirectory(prefix="glm-batch-doctor-") as tmp:
        path = Path(tmp) / "doctor.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        async with BatchAPI(native_url, key, max_attempts=2, not_ready_attempts=2, not_ready_wait_s=0.5) as api:
            try:
                uploaded = await api.upload(path)
            except BatchAPIError as exc:
                out.update(result=f"upload refused: {_cut(str(exc), 120)}")
                return out
            try:
                batch = await api.create(uploaded.id, metadata={"glm_batch_doctor": model})
            except BatchAPIError as exc:
                # The request refused (a 4xx that is not the account's or a full queue): not eligible.
                refused = isinstance(exc, BatchStatusError) and classify_api_error(exc).verdict is Verdict.FAIL
                out.update(eligible=False if refused else None, result=f"refused at create: {_cut(str(exc), 120)}")
                with contextlib.suppress(BatchAPIError):
                    await api.delete_file(uploaded.id)  # an account holds at most 1,000 files
                return out
            started = time.monotonic()
            timer = _Timer(label)
            delay = 0.2
            while not batch.done and time.monotonic() - started < wait_s:
                timer.show(batch.status, time.monotonic() - started, wait_s)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                batch = await api.retrieve(batch.id)
            timer.close()
            out["shape"] = batch_shape(batch.raw)
            out["status"] = batch.status
            out["seconds"] = round(time.monotonic() - started, 1)
            if batch.status == "failed":
                errors = [f"{e.code} line {e.line}: {e.message}" for e in batch.errors[:3]]
                out.update(eligible=False, result=f"failed validation: {'; '.join(errors) or 'no errors given'}")
            elif batch.status in ("in_progress", "finalizing", "completed"):
                out.update(eligible=True, result=f"passed validation ({batch.status} after {out['seconds']} s)")
            else:
                out.update(result=f"{batch.status} after {out['seconds']} s (validation not known)")
            if not batch.done:
                with contextlib.suppress(BatchAPIError):
                    await api.cancel(batch.id)
                out["result"] += "; cancelled"
            elif batch.output_file_id:
                out["usage"] = await _usage(api, batch.output_file_id, Path(tmp) / "out.jsonl")
            for file_id in (batch.output_file_id, batch.error_file_id):  # at most 1,000 files an account
                if file_id and batch.done:
                    with contextlib.suppress(BatchAPIError):
                        await api.delete_file(file_id)
    return out


async def _usage(api: Any, file_id: str, dest: Path) -> dict[str, int]:
    """Input and output tokens of a result file (what the 2 lines cost)."""
    from runner.send.batch_api import BatchAPIError

    totals = {"input_tokens": 0, "output_tokens": 0}
    with contextlib.suppress(BatchAPIError, OSError):
        await api.download(file_id, dest)
        text = await asyncio.to_thread(dest.read_text, encoding="utf-8")  # two lines, but off the loop
        for raw in text.splitlines():
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                usage = json.loads(raw)["response"]["body"]["usage"]
                totals["input_tokens"] += int(usage.get("prompt_tokens") or 0)
                totals["output_tokens"] += int(usage.get("completion_tokens") or 0)
    return totals


def batch_shape(raw: dict[str, Any]) -> dict[str, Any]:
    """What the batch object looks like: timestamp units, empty ids, counts (docs and service differ)."""
    stamps = {k: v for k, v in raw.items() if k.endswith("_at") and isinstance(v, int | float) and v}
    unit = None
    if stamps:
        unit = "milliseconds" if max(stamps.values()) > 10**11 else "seconds"
    return {
        "id": raw.get("id"),
        "status": raw.get("status"),
        "timestamps": unit,
        "created_at": raw.get("created_at"),
        "output_file_id": raw.get("output_file_id"),
        "error_file_id": raw.get("error_file_id"),
        "request_counts": raw.get("request_counts"),
    }


class _Timer:
    """A visible wait on stderr: rewritten in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tty = sys.stderr.isatty()
        self._last = -10.0

    def show(self, status: str, elapsed: float, limit: float) -> None:
        text = f"batch {self._label}: {status}, {elapsed:.0f} s of at most {limit:.0f} s"
        if self._tty:
            print(f"\r{text}   ", end="", file=sys.stderr, flush=True)
        elif elapsed - self._last >= 10:
            print(text, file=sys.stderr, flush=True)
            self._last = elapsed

    def close(self) -> None:
        if self._tty:
            print(file=sys.stderr)


# ---- the command -----------------------------------------------------------------------------------


def resolve_target(spec: Path | None, endpoint: str | None, model: str | None) -> Target:
    """The endpoint and model from the job (if given), overridden by --endpoint / --model."""
    from runner.job import catalog

    job: Job | None = None
    if spec is not None:
        from runner.job.resolve import load_job

        # Loaded as an online job: a batch job on a model doctor is to prove would be refused at load.
        overrides = ["run.mode=online"] + ([f"model.endpoint={endpoint}"] if endpoint else [])
        overrides += [f"model.name={model}"] if model else []
        job = load_job(spec, overrides, check_templates=False, writes=False)
        return Target(
            job.endpoint_name,
            job.base_url,
            job.native_url,
            job.currency,
            job.key_env,
            job.spec.model.name,
            job.model,
            job,
        )
    if model is None:
        raise UsageError("doctor: give a job spec, or --model (and --endpoint, default zhipu)")
    name = endpoint or "zhipu"
    endpoints = catalog.endpoints()
    if name in endpoints:
        ep = endpoints[name]
        base, native, currency, keys = ep.base_url, ep.native_url, ep.currency, tuple(ep.key_env)
    elif name.startswith(("http://", "https://")):
        base = name.rstrip("/")
        native = catalog.native_url_beside(base)
        currency = "USD" if "z.ai" in base else "CNY"
        keys = tuple(endpoints["zhipu"].key_env)
    else:
        known = ", ".join(sorted(endpoints))
        raise UsageError(f"--endpoint {name!r}: unknown endpoint; use {known} or a URL")
    return Target(name, base, native, currency, keys, model, catalog.models().get(model))


def _key(target: Target) -> str:
    import os

    from runner.api import SIMULATOR_KEY

    if target.base_url is None:
        return SIMULATOR_KEY
    for name in target.key_env:
        if os.environ.get(name):
            return os.environ[name]
    raise UsageError(
        f"no API key for endpoint {target.endpoint!r}: set {' or '.join(target.key_env)} in the environment"
    )


@contextlib.contextmanager
def _url(target: Target) -> Iterator[str]:
    """The URL to probe; for the in-process simulator, one started for this probe only."""
    if target.job is not None:
        from runner.send.endpoints import endpoint_url

        with endpoint_url(target.job) as url:
            yield url
        return
    if target.base_url is not None:
        yield target.base_url
        return
    from runner.testing.simulator import SimConfig, SimulatorThread

    with SimulatorThread(SimConfig()) as server:
        yield server.url


def _table(target: Target) -> PriceTable | None:
    from runner.money.pricing import PriceTable, price_table

    if target.job is not None:
        return price_table(target.job)
    prices = target.info.prices.get(target.currency) if target.info is not None else None
    if prices is None:
        return None
    return PriceTable(target.model, target.currency, tuple(prices.tiers), prices.confirmed)


def planned_requests(ramp_max: int) -> int:
    """How many one-token Messages requests the probes send at most: four probes of up to 3 tries
    each, and every ramp burst sent at most twice. Usually far fewer go (no faults: 4 + the ramp)."""
    return 4 * 3 + 2 * sum(n for n in RAMP if n <= ramp_max)


async def diagnose(
    target: Target, url: str, key: str, *, batch: bool, batch_wait_s: float, ramp_max: int, say: Callable[[str], None]
) -> Report:
    """Run the probes against `url` and record what they found."""
    from runner.job import catalog
    from runner.job.facts import as_dict as facts_dict
    from runner.job.facts import endpoint_id, record_facts

    report = Report(target, url)
    table = _table(target)
    n = planned_requests(ramp_max)
    if table is not None:
        per = table.worst_case(input_tokens=PROBE_INPUT_TOKENS, max_tokens=1)
        share = target.info.batch.price_share if target.info is not None else 0.5
        report.worst_case = per * n + (2 * per * share if batch else 0.0)
        cost = f"worst case {report.worst_case:.6f} {target.currency}"
    else:
        cost = f"worst case unknown: no {target.currency} price for {target.model} in the catalogue"
    lines = f" and two 2-line batches ({target.model}, {CONTROL_MODEL} free)" if batch else ""
    say(
        f"doctor: {target.model} on {target.endpoint}: at most {n} one-token requests (retries included){lines}; {cost}"
    )

    prober = Prober(url, key, target.model, table, report)
    try:
        await probe_online(prober, report, ramp_max)
    finally:
        await prober.aclose()
    if batch and report.aborted is None:
        native = target.native_url or catalog.native_url_beside(url)
        for model, label in ((target.model, target.model), (CONTROL_MODEL, f"{CONTROL_MODEL} (control)")):
            found = await probe_batch(native, key, model, batch_wait_s, label)
            report.batches.append(found)
            report.add(f"batch {label}", found["eligible"], found["result"])
            usage = found.get("usage")
            if usage and model == target.model and table is not None and target.info is not None:
                report.spent += target.info.batch.price_share * table.cost(**usage)
            if found["eligible"] is not None:
                if model == target.model:
                    report.facts["batch_eligible"] = found["eligible"]
                else:
                    report.control["batch_eligible"] = found["eligible"]
    elif not batch:
        report.add("batch", None, "not checked", "add --batch (a 2-line batch, waits up to --batch-wait)")
    where = endpoint_id(target.base_url)
    if report.facts:
        report.facts = facts_dict(record_facts(where, target.model, source="doctor", **report.facts))
    if report.control:
        record_facts(where, CONTROL_MODEL, source="doctor", **report.control)
    return report


def doctor(
    spec: Annotated[
        Path | None, typer.Argument(metavar="[JOB]", help="The job spec whose endpoint and model to probe.")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", metavar="E", help="zhipu, zai, simulator or a URL (default: the job's).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", metavar="M", help="The model (default: the job's).")] = None,
    batch: Annotated[
        bool, typer.Option("--batch", help="Also send a 2-line batch on the model and on glm-4-flash (free).")
    ] = False,
    batch_wait: Annotated[
        float, typer.Option("--batch-wait", min=1, metavar="SECONDS", help="How long to wait for each batch.")
    ] = 600.0,
    ramp_max: Annotated[
        int, typer.Option("--ramp-max", min=1, max=16, metavar="N", help="The most requests at once the ramp tries.")
    ] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Probe an endpoint and model with one-token requests: key, balance, tool choice, stop words, error
    shape, concurrency, Batch API. Prints what works and stores it for later runs."""

    def go() -> int:
        target = resolve_target(spec, endpoint, model)
        key = _key(target)
        say: Callable[[str], None] = (lambda _: None) if as_json else print
        with _url(target) as url:
            report = asyncio.run(
                diagnose(target, url, key, batch=batch, batch_wait_s=batch_wait, ramp_max=ramp_max, say=say)
            )
        if as_json:
            print(json.dumps(as_dict(report), indent=2))
        else:
            _print(report)
        return 3 if report.aborted else 0

    raise typer.Exit(_guarded(go))


def as_dict(report: Report) -> dict[str, Any]:
    """The report as `doctor --json` prints it."""
    t = report.target
    return {
        "endpoint": t.endpoint,
        "url": report.url,
        "model": t.model,
        "currency": t.currency,
        "checks": [c.__dict__ for c in report.checks],
        "facts": report.facts,
        "batches": report.batches,
        "cost": {"worst_case": report.worst_case, "spent": round(report.spent, 6), "requests": report.requests},
        "aborted": report.aborted,
    }


def _print(report: Report) -> None:
    from rich.table import Table

    from runner.job.facts import facts_path

    t = report.target
    table = Table(title=f"doctor: {t.model} on {t.endpoint}", title_justify="left", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("works", no_wrap=True)
    table.add_column("what came back", overflow="fold")
    for c in report.checks:
        seen = f"{c.result}: {c.detail}" if c.detail else c.result
        table.add_row(c.name, {True: "yes", False: "NO", None: "?"}[c.ok], seen)
    console = _console()
    console.print(table)
    for found in report.batches:
        if "shape" in found:
            console.print(
                f"batch object ({found['label']}): {json.dumps(found['shape'])}", highlight=False, soft_wrap=True
            )
    worst = f" (worst case {report.worst_case:.6f})" if report.worst_case is not None else ""
    console.print(f"spent: {report.spent:.6f} {t.currency} on {report.requests} requests{worst}", highlight=False)
    if report.aborted:
        console.print(f"stopped: the endpoint refused the account ({report.aborted})", highlight=False)
    elif report.facts:
        console.print(
            f"stored in {facts_path()}: runs of {t.model} on {t.endpoint} start from it",
            highlight=False,
            soft_wrap=True,
        )
