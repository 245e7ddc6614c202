"""The Batch API client's errors: what each failure is, whether to retry it, and how long to wait.

One hierarchy; every error carries what the API said, never a header:

    BatchAPIError
    ├── BatchTransportError       the connection failed or broke: retried
    │   └── BatchTimeout          no answer within the call's timeout: retried
    ├── BatchProtocolError        a success status whose body is not what the API promises: retried
    └── BatchStatusError          an error answer: .status, .code (Zhipu's business code), .message
        ├── BatchAbort            no balance (1113), plan exhausted, bad key, 401/403: stop everything
        └── BatchNotFound         404: unknown id, or a result file not ready yet (download waits)

`classify_api_error` sorts them into RETRY, ABORT or FAIL; `status_error` reads an error answer into
the right class; `wait_with_retry_after` is the client's backoff, honouring the server's retry-after.
Used by runner.send.batch_api (which re-exports the public names).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tenacity import RetryCallState

from runner.send.retries import ABORT_CODES, Verdict, wait_backoff

__all__ = [
    "MAX_ERROR_BODY",
    "BatchAPIError",
    "BatchAbort",
    "BatchNotFound",
    "BatchProtocolError",
    "BatchStatusError",
    "BatchTimeout",
    "BatchTransportError",
    "classify_api_error",
    "status_error",
    "wait_with_retry_after",
]

# Zhipu's limit and overload codes, and its own internal/network errors: worth another try.
_TRANSIENT_CODES = frozenset({"500", "1230", "1234", "1302", "1303", "1304", "1305"})
MAX_ERROR_BODY = 1 << 16  # an error body longer than this is not an API error object; don't hold it


class BatchAPIError(Exception):
    """Anything the Batch API client raises."""


class BatchTransportError(BatchAPIError):
    """The connection could not be made, or broke before a whole answer arrived."""


class BatchTimeout(BatchTransportError):
    """No (whole) answer within the call's timeout."""


class BatchProtocolError(BatchAPIError):
    """A success status whose body is not the JSON the API promises (an HTML page from a gateway...)."""


class BatchStatusError(BatchAPIError):
    """The API answered with an error: HTTP status, Zhipu's business code and message."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
        where: str = "",
    ) -> None:
        label = f"{status}/{code}" if code else str(status)
        super().__init__(f"{where}: {label}: {message}" if where else f"{label}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


class BatchAbort(BatchStatusError):
    """An error that every later call would get too (no balance, exhausted plan, bad key): stop the run."""


class BatchNotFound(BatchStatusError):
    """404: no such batch or file, or a result file that is not downloadable yet."""


def classify_api_error(exc: BaseException) -> Verdict:
    """RETRY transient faults, ABORT account-wide ones, FAIL the rest (the call itself is wrong)."""
    if isinstance(exc, BatchAbort):
        return Verdict.ABORT
    if isinstance(exc, (BatchTransportError, BatchProtocolError)):
        return Verdict.RETRY
    if isinstance(exc, BatchStatusError):
        if exc.code in _TRANSIENT_CODES:
            return Verdict.RETRY
        if exc.status in (408, 409, 429) or exc.status >= 500:
            return Verdict.RETRY
        return Verdict.FAIL
    return Verdict.FAIL


def status_error(status: int, raw: bytes, headers: Mapping[str, str], where: str) -> BatchStatusError:
    """The exception for an error answer, read from Zhipu's `{"error": {"code"|"type", "message"}}`."""
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    try:
        data = json.loads(raw) if raw and len(raw) <= MAX_ERROR_BODY else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        source = error if isinstance(error, dict) else data  # older APIs: {"code", "msg"} at the top
        raw_code = source.get("code")
        if raw_code in (None, ""):
            raw_code = source.get("type")
        code = str(raw_code) if raw_code not in (None, "") else None
        text = source.get("message") or source.get("msg")
        message = str(text) if text else None
        rid = data.get("request_id") or (error.get("request_id") if isinstance(error, dict) else None)
        request_id = str(rid) if rid else None
    if message is None:
        message = raw[:200].decode("utf-8", "replace").strip() or "no body"
    request_id = request_id or headers.get("x-request-id") or headers.get("request-id")
    retry_after = _retry_after(headers)
    cls: type[BatchStatusError]
    if code in ABORT_CODES or status in (401, 403):
        cls = BatchAbort
    elif status == 404:
        cls = BatchNotFound
    else:
        cls = BatchStatusError
    return cls(status, code, message, request_id=request_id, retry_after=retry_after, where=where)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue  # an HTTP date: rare; our own backoff applies
            if seconds > 0:
                return seconds
    return None


class wait_with_retry_after:  # lowercase, like tenacity's own wait strategies
    """wait_backoff's full jitter, or the server's retry-after when that is longer (capped)."""

    def __init__(self, maximum: float = 30.0) -> None:
        self._own = wait_backoff(maximum=maximum)
        self._max = maximum

    def __call__(self, state: RetryCallState) -> float:
        own = self._own(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = exc.retry_after if isinstance(exc, BatchStatusError) else None
        return max(own, min(asked, self._max)) if asked else own
