"""The Batch API client's errors, each carrying what the API said (never a header), and what each means
for the call that raised it (`classify_api_error`)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from runner.send.retries import ABORT_CODES, TRANSIENT_CODES, Fault, Verdict, error_parts, retry_after_seconds

NO_FILE_API = 434  # the file APIs' "no permission" (closed to the account): every later call gets it too
# "API offline / missing" (1221, 1222) answered with 404 by the Batch or file API: read as the object not being
# there (yet), as any 404 there is; on the Messages API they stop the run (runner.send.retries.ABORT_CODES).
NOT_THERE_CODES = frozenset({"1221", "1222"})
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


def classify_api_error(exc: BaseException) -> Fault:
    """A Batch API call's fault: RETRY transient ones, ABORT account-wide ones, FAIL the rest (the call
    itself is wrong, or an exception that is not the API's: a bug here is not retried)."""
    if isinstance(exc, BatchStatusError):
        name = f"{exc.status}/{exc.code}" if exc.code else str(exc.status)
        if isinstance(exc, BatchAbort):
            verdict = Verdict.ABORT
        elif exc.code in TRANSIENT_CODES or exc.status in (408, 409, 429) or exc.status >= 500:
            verdict = Verdict.RETRY
        else:
            verdict = Verdict.FAIL
        return Fault(verdict, name, exc.message, retry_after=exc.retry_after)
    if isinstance(exc, BatchTimeout):
        return Fault(Verdict.RETRY, "timeout", str(exc))
    if isinstance(exc, BatchTransportError):
        return Fault(Verdict.RETRY, "connection", str(exc))
    if isinstance(exc, BatchProtocolError):
        return Fault(Verdict.RETRY, "bad_response", str(exc))
    return Fault(Verdict.FAIL, type(exc).__name__, str(exc) or type(exc).__name__)


def status_error(status: int, raw: bytes, headers: Mapping[str, str], where: str) -> BatchStatusError:
    """The exception for an error answer, its code and message read by the one reader (`error_parts`)."""
    try:
        data = json.loads(raw) if raw and len(raw) <= MAX_ERROR_BODY else None
    except ValueError:
        data = None
    code, message, request_id = error_parts(data)
    message = message or raw[:200].decode("utf-8", "replace").strip() or "no body"
    request_id = request_id or headers.get("x-request-id") or headers.get("request-id")
    retry_after = retry_after_seconds(headers)
    cls: type[BatchStatusError]
    if status == 404 and code in NOT_THERE_CODES:
        cls = BatchNotFound  # an object not there (yet): a result file can appear polls late
    elif code in ABORT_CODES or status in (401, 403, NO_FILE_API):
        cls = BatchAbort
    elif status == 404:
        cls = BatchNotFound
    else:
        cls = BatchStatusError
    return cls(status, code, message, request_id=request_id, retry_after=retry_after, where=where)
