"""The one retry layer: which errors are worth another attempt, which end the row, which end the run.

    async for attempt in retrying(max_attempts=6):
        with attempt:
            answer = await client.send(params)

Zhipu reuses HTTP 429 for billing: 1113 (no balance) and 1308-1310 (plan exhausted) come back as 429s
with the code in `error.type`. Retrying them burns hours and fails every row, so they, bad keys and
unknown models ABORT the run. Connection faults, timeouts, 408/409, 429 rate codes, 5xx and 529 RETRY
with full-jitter exponential backoff (workers compete for one limit, so jitter matters), honouring
retry-after(-ms). Every other 4xx FAILs the row at once.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Literal

import anthropic
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

# Business codes that mean "this account cannot be served at all": no balance, plan exhausted or
# expired, account inactive/locked, bad or expired token.
ABORT_CODES = frozenset(
    {
        "1000",
        "1001",
        "1002",
        "1003",
        "1004",
        "1110",
        "1111",
        "1112",
        "1113",
        "1121",
        "1220",
        "1308",
        "1309",
        "1310",
        "1211",
        "401",
        "authentication_error",
        "permission_error",
        "billing_error",
    }
)


class BadResponse(Exception):
    """A 200 answer whose body is not a message (Zhipu sometimes sends an error object with status 200)."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class Verdict(enum.Enum):
    """What to do after an error."""

    RETRY = "retry"  # transient: try the same request again after a backoff
    FAIL = "fail"  # this row's request is wrong: record the error, go on with the others
    ABORT = "abort"  # every row would fail: stop the run


def classify(exc: BaseException) -> Verdict:
    """Decide the fate of a request that raised `exc`."""
    if isinstance(exc, BadResponse):
        return Verdict.ABORT if exc.code in ABORT_CODES else Verdict.RETRY
    if isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
        return Verdict.RETRY
    if isinstance(exc, anthropic.APIStatusError):
        code = str(exc.type) if exc.type is not None else None
        status = exc.status_code
        if code in ABORT_CODES or status in (401, 402, 403, 404):
            return Verdict.ABORT
        if status == 200:  # an error event in the middle of a stream (e.g. overloaded)
            return Verdict.RETRY
        if status in (408, 409, 429) or status >= 500:
            return Verdict.RETRY
        return Verdict.FAIL
    return Verdict.FAIL


def error_type(exc: BaseException) -> str:
    """A short, stable name for the error, for the `error_type` column: `429/1302`, `timeout`, `500`..."""
    if isinstance(exc, BadResponse):
        return f"200/{exc.code}" if exc.code else "bad_response"
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout"
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection"
    if isinstance(exc, anthropic.APIStatusError):
        return f"{exc.status_code}/{exc.type}" if exc.type else str(exc.status_code)
    return type(exc).__name__


def error_message(exc: BaseException) -> str:
    """The endpoint's own message when it sent one, else the exception's text (never any header)."""
    if isinstance(exc, anthropic.APIStatusError) and exc.api_message:
        return exc.api_message
    return str(exc) or type(exc).__name__


def overload(exc: BaseException) -> tuple[Literal["concurrency", "platform"] | None, float | None]:
    """Was this attempt refused for overload, and of which kind? With the endpoint's retry-after.

    1302 (and a plain rate_limit_error) means our account has too many requests in flight; 1305, 529
    and an overloaded error event mean the platform as a whole is overloaded.
    """
    if not isinstance(exc, anthropic.APIStatusError):
        return None, None
    code = str(exc.type) if exc.type is not None else ""
    if code in ("1305", "overloaded_error") or exc.status_code in (503, 529):
        return "platform", retry_after(exc)
    if exc.status_code == 429 and code not in ABORT_CODES:
        return "concurrency", retry_after(exc)
    return None, None


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the endpoint asked us to wait (retry-after-ms, then retry-after), if it said."""
    if not isinstance(exc, anthropic.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue  # an HTTP date: rare enough to fall back to our own backoff
            if seconds > 0:
                return seconds
    return None


class wait_backoff:
    """Full-jitter exponential backoff, or the endpoint's retry-after when it is longer (capped)."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self._jitter = wait_random_exponential(multiplier=initial, max=maximum)
        self._max = maximum

    def __call__(self, state: RetryCallState) -> float:
        own = self._jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after(exc)
        return max(own, min(asked, self._max)) if asked else own


def retrying(
    max_attempts: int,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    wait: Callable[[RetryCallState], float] | None = None,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
) -> AsyncRetrying:
    """The retry policy for one request; `sleep` is injectable so tests never wait on real time."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait or wait_backoff(),
        retry=retry_if_exception(lambda e: classify(e) is Verdict.RETRY),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
