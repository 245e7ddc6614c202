"""The one retry layer: tenacity, driven by a transport's classifier of faults. A `Fault` is RETRY,
FAIL or ABORT; what no classifier recognises is RETRY (docs/decisions.md, "Limits and retries")."""

from __future__ import annotations

import asyncio
import enum
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from runner.errors import EndpointAborted

METHOD_UNSUPPORTED = "1212"  # "this method is not supported": at a batch create, for the file's model

# Business codes that mean "this account cannot be served at all" (no balance, plan exhausted or expired,
# account inactive/locked, bad or expired token, the API offline or missing, the method not supported:
# every row is sent alike), each with what it means and what to do, for the one line a stopped run prints.
ABORT_MEANINGS: dict[str, str] = {
    **dict.fromkeys(
        ("1000", "1001", "1002", "1003", "1004", "401", "authentication_error"),
        "the API key is missing, wrong or expired; check ZHIPUAI_API_KEY",
    ),
    **dict.fromkeys(
        ("1110", "1111", "1112", "1121", "1220", "permission_error"),
        "the account is inactive, locked or not allowed this model; check it in Zhipu's console",
    ),
    **dict.fromkeys(("1113", "billing_error"), "the account is out of balance; top up"),
    **dict.fromkeys(("1308", "1309", "1310"), "the plan's usage limit is reached or the plan expired; wait or renew"),
    "1304": "the account's daily call limit is reached; run again tomorrow (answers so far are kept)",
    "1211": "the endpoint does not know this model; check model.name",
    "1212": "the endpoint does not support this method (every row is sent the same way): check model.endpoint "
    "and model.name; in batch mode the Batch API may not take this model (run.mode: online)",
    **dict.fromkeys(
        ("1221", "1222"),
        "the endpoint says this API is offline or does not exist; check model.endpoint, or try again later",
    ),
}
ABORT_CODES = frozenset(ABORT_MEANINGS)
# HTTP statuses that stop a run, for the same line.
_STATUS_MEANINGS: dict[str, str] = {
    "404": "the endpoint does not know this model or path; check model.name and model.endpoint",
    **{
        str(status): "the endpoint redirects elsewhere, which is not followed (the key would go along); "
        "set model.endpoint to the address it should be"
        for status in (300, 301, 302, 303, 307, 308)
    },
    "434": "the account may not use Zhipu's file API, which the Batch API needs (no permission); run with "
    "run.mode: online, or ask Zhipu for access",
}


def abort_meaning(code: str) -> str:
    """What an abort code means and what to do, or a generic line for a code we do not know."""
    meaning = ABORT_MEANINGS.get(code) or _STATUS_MEANINGS.get(code)
    return meaning or "the endpoint refused the account; check the key and the account"


class BadResponse(Exception):
    """A 200 answer whose body is not a message we can keep (an error object, a gateway's page, a cut
    or garbled answer). `maybe_billed`: it looked generated, so the endpoint may have billed it."""

    def __init__(self, code: str | None, message: str, *, maybe_billed: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.maybe_billed = maybe_billed


class Verdict(enum.Enum):
    """What to do after an error."""

    RETRY = "retry"  # transient: try the same request again after a backoff
    FAIL = "fail"  # this row's request is wrong: record the error, go on with the others
    ABORT = "abort"  # every row would fail: stop the run


Overload = Literal["concurrency", "platform"]


@dataclass(frozen=True, slots=True)
class Fault:
    """A classified failure: what to do, a short stable name for `error_type`, the endpoint's message,
    whether it was a refusal for overload (and of which kind), and how long the endpoint asked us to wait."""

    verdict: Verdict
    type: str
    message: str
    overload: Overload | None = None
    retry_after: float | None = None
    maybe_billed: bool = False  # sent, then given up on (a timeout): the server may bill it anyway
    request_id: str | None = None  # the endpoint's id for the refused request, where it gave one


def unclassified(exc: BaseException) -> Fault:
    """A fault no classifier recognised: retried, and sent again by the next run if it persists."""
    return Fault(Verdict.RETRY, type(exc).__name__, str(exc) or type(exc).__name__)


def bad_response_fault(exc: BadResponse) -> Fault:
    """A 200 that is no answer: an error object is decided by its code as any error answer is
    (`status_fault`); anything else is retried, maybe billed when it looked like a generated answer."""
    if exc.code is not None:  # an error object answered with 200: the one rule decides it, as for any status
        return status_fault(200, exc.code, str(exc))
    return Fault(Verdict.RETRY, "bad_response", str(exc), maybe_billed=exc.maybe_billed)


# Zhipu's limit and overload codes and its own internal or network errors: worth another try, on every
# transport. 1302/1303 are this account's concurrency and frequency limits, 1305 the platform's traffic;
# 1231 (duplicate request) says the same request is already being processed: asked again later it is
# answered, and the one it duplicated may be billed as well (DUPLICATE_CODES).
TRANSIENT_CODES = frozenset({"500", "1230", "1231", "1234", "1302", "1303", "1305"})
DUPLICATE_CODES = frozenset({"1231"})
# Content the endpoint blocks (1300 by policy, 1301 unsafe): asked again it is blocked again, whatever the
# status it came with (a 400, or an error event mid-stream, which the SDK reports as a 200).
BLOCKED_CODES = frozenset({"1300", "1301"})
RATE_CODES: dict[str, Overload] = {"1302": "concurrency", "1303": "concurrency", "1305": "platform"}
# The fault type of a request refused because it forces a tool (Zhipu: "Tool choice must be auto").
TOOL_CHOICE_REFUSED = "tool_choice_refused"
_TOOL_CHOICE = re.compile(r"tool[ _]?choice", re.I)


def error_parts(body: object) -> tuple[str | None, str | None, str | None]:
    """Zhipu's business code, message and request id from an error body in any shape it answers in, on
    every wire: Anthropic's `{"type": "error", "error": {"type": "1113", "message"}, "request_id"}`, the
    native `{"error": {"code": "1302", "message"}}` (seen on the Anthropic route of api.z.ai too), or an
    older API's top-level `{"code", "msg"}`. An empty message counts as none."""
    if not isinstance(body, Mapping):
        return None, None, None
    error = body.get("error")
    source: Mapping[str, object] = error if isinstance(error, Mapping) else body
    code = source.get("code")
    if code in (None, ""):
        code = source.get("type") if isinstance(error, Mapping) else None
    message = source.get("message") or source.get("msg")
    request_id = body.get("request_id") or source.get("request_id")
    return (
        str(code) if code not in (None, "") else None,
        str(message) if message else None,
        str(request_id) if request_id else None,
    )


def status_fault(
    status: int,
    code: str | None,
    message: str,
    *,
    retry_after: float | None = None,
    request_id: str | None = None,
) -> Fault:
    """The fate of an error answer, whichever transport and error shape it came in: the one rule.
    ABORT: ABORT_CODES, 401/402/403/404 and a 3xx (not followed: the key would go along). RETRY with
    an overload kind: 1302/1303, 1305, 429, 503/529. RETRY: other transient codes, 408, 409, 5xx, 200;
    1231 (duplicate) maybe billed. FAIL: blocked content (1300, 1301) and any other 4xx; a refused
    forced tool choice is named TOOL_CHOICE_REFUSED so the sender can fall back to auto."""
    name = f"{status}/{code}" if code else str(status)
    if code in ABORT_CODES or status in (401, 402, 403, 404) or 300 <= status < 400:
        return Fault(Verdict.ABORT, name, message, request_id=request_id)
    if code in BLOCKED_CODES:
        return Fault(Verdict.FAIL, name, message, request_id=request_id)
    overload: Overload | None = RATE_CODES.get(code or "")
    if overload is None and (code == "overloaded_error" or status in (503, 529)):
        overload = "platform"
    elif overload is None and status == 429:
        overload = "concurrency"
    transient = code in TRANSIENT_CODES or status == 200 or status in (408, 409) or status >= 500
    if overload is None and not transient:
        if 400 <= status < 500 and _TOOL_CHOICE.search(message):
            return Fault(Verdict.FAIL, TOOL_CHOICE_REFUSED, message, request_id=request_id)
        return Fault(Verdict.FAIL, name, message, request_id=request_id)
    duplicate = code in DUPLICATE_CODES
    return Fault(Verdict.RETRY, name, message, overload, retry_after, maybe_billed=duplicate, request_id=request_id)


Classify = Callable[[BaseException], Fault]


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the headers ask us to wait (`retry-after-ms`, else `retry-after`); None unless a positive,
    finite number. A huge wait is returned as asked: whoever waits caps it."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if seconds > 0 and math.isfinite(seconds):
                return seconds
    return None


class wait_backoff:
    """Full-jitter exponential backoff, or the endpoint's retry-after when it is longer (capped).
    `slot_paced` (`concurrency: auto`): a request's first 1302 is retried as soon as a slot is free,
    since the controller has just cut the limit and the slot is the wait."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        classify: Classify = unclassified,
        *,
        slot_paced: bool = False,
    ) -> None:
        self._jitter = wait_random_exponential(multiplier=initial, max=maximum)
        self._max = maximum
        self._classify = classify
        self._slot_paced = slot_paced

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        fault = self._classify(exc) if exc is not None else None
        asked = fault.retry_after if fault is not None else None
        first_1302 = fault is not None and fault.overload == "concurrency" and state.attempt_number == 1
        if self._slot_paced and first_1302 and not asked:
            return 0.0
        own = self._jitter(state)
        return max(own, min(asked, self._max)) if asked else own


def retrying(
    max_attempts: int,
    *,
    classify: Classify = unclassified,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    wait: Callable[[RetryCallState], float] | None = None,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
) -> AsyncRetrying:
    """The retry policy for one request; `sleep` is injectable so tests never wait on real time."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait or wait_backoff(classify=classify),
        # Only Exceptions are retried (tenacity's default): cancellation passes straight through.
        retry=retry_if_exception(lambda e: isinstance(e, Exception) and classify(e).verdict is Verdict.RETRY),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def refusal(fault: Fault) -> EndpointAborted:
    """The error that stops a run whose endpoint refused the whole job with `fault`."""
    code = fault.type.rsplit("/", 1)[-1]
    return EndpointAborted(f"the endpoint refused the job ({fault.type}: {fault.message}): {abort_meaning(code)}")
