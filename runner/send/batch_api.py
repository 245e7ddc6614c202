"""An async client for Zhipu's Batch API: upload input files, create, watch and cancel batches, download results.

    async with BatchAPI("https://open.bigmodel.cn/api/paas/v4", api_key) as api:
        file = await api.upload(path)                          # multipart, purpose=batch, streamed from disk
        batch = await api.create(file.id, metadata={"job": "reviews"})
        batch = await api.retrieve(batch.id)                   # poll until batch.done
        await api.download(batch.output_file_id, dest)         # streamed to disk, fsynced, renamed
        async for b in api.iter_batches(): ...

Why aiohttp and not zai-sdk or httpx: zai-sdk is synchronous only (an `httpx.Client`), runs its own
retries (3, on top of ours), would add `httpx`, `pyjwt` and `cachetools` to the dependencies, and reads
file uploads through httpx's multipart encoder with a forced `Content-Type` header. `httpx` itself is
not installed (the anthropic SDK depends on its fork `httpx2`, an implementation detail of the SDK we
should not build on). aiohttp is already a direct dependency and the online path's transport; it
streams a multipart file part from an open file in 64 KiB reads (in the executor, off the event
loop), takes a timeout per call (`ClientTimeout`), streams a download with `iter_chunked`, and raises
one `ClientError` family for connection faults.

Errors (one hierarchy; every one carries what the API said, never a header):

    BatchAPIError
    ├── BatchTransportError       the connection failed or broke: retried
    │   └── BatchTimeout          no answer within the call's timeout: retried
    ├── BatchProtocolError        a success status whose body is not what the API promises: retried
    └── BatchStatusError          an error answer: .status, .code (Zhipu's business code), .message
        ├── BatchAbort            no balance (1113), plan exhausted, bad key, 401/403: stop everything
        └── BatchNotFound         404: unknown id, or a result file not ready yet (download waits)

Transient errors (connection, timeout, 408/409/429 with a rate code, 5xx, Zhipu's 1302-1305) are
retried here with tenacity and runner.send.retries.wait_backoff, honouring retry-after; the project has
one retry layer and this is its use for the Batch API. `sleep` is injectable so tests never wait.

`create` is not idempotent: a batch may have been made by a call whose answer was lost. Before it sends
again, it looks for a batch already made from the same input file (newest page of the list) and
returns that one, so a timeout never pays for the same requests twice.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from runner.send.retries import ABORT_CODES, Verdict, wait_backoff

__all__ = [
    "Batch",
    "BatchAPI",
    "BatchAPIError",
    "BatchAbort",
    "BatchError",
    "BatchNotFound",
    "BatchPage",
    "BatchProtocolError",
    "BatchStatusError",
    "BatchTimeout",
    "BatchTransportError",
    "FileObject",
    "RequestCounts",
    "classify_api_error",
]

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
# Zhipu's limit and overload codes, and its own internal/network errors: worth another try.
_TRANSIENT_CODES = frozenset({"500", "1230", "1234", "1302", "1303", "1304", "1305"})
_CHUNK = 1 << 16
_MAX_ERROR_BODY = 1 << 16  # an error body longer than this is not an API error object; don't hold it


# --------------------------------------------------------------------------------------------------
# Errors


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


def _status_error(status: int, raw: bytes, headers: Mapping[str, str], where: str) -> BatchStatusError:
    """The exception for an error answer, read from Zhipu's `{"error": {"code"|"type", "message"}}`."""
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    try:
        data = json.loads(raw) if raw and len(raw) <= _MAX_ERROR_BODY else None
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


class _wait_with_retry_after:
    """wait_backoff's full jitter, or the server's retry-after when that is longer (capped)."""

    def __init__(self, maximum: float = 30.0) -> None:
        self._own = wait_backoff(maximum=maximum)
        self._max = maximum

    def __call__(self, state: RetryCallState) -> float:
        own = self._own(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = exc.retry_after if isinstance(exc, BatchStatusError) else None
        return max(own, min(asked, self._max)) if asked else own


# --------------------------------------------------------------------------------------------------
# Typed views of the API's objects (tolerant: every field but the id may be missing)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _str(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "" else None


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """How many of a batch's requests there are, and how many finished well or badly."""

    total: int = 0
    completed: int = 0
    failed: int = 0

    @classmethod
    def from_json(cls, data: Any) -> RequestCounts:
        """Read `request_counts`; missing or malformed counts read as 0."""
        if not isinstance(data, Mapping):
            return cls()
        return cls(*(_int(data.get(name)) or 0 for name in ("total", "completed", "failed")))


@dataclass(frozen=True, slots=True)
class BatchError:
    """One validation error of a batch's input file (a bad line, a missing field)."""

    code: str | None
    message: str | None
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as the API reports it. `raw` keeps the whole object for whatever a field here lacks."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    endpoint: str | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: tuple[BatchError, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """Has the batch stopped changing (completed, failed, expired or cancelled)?"""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: Any) -> Batch:
        """Read a batch object; raises BatchProtocolError if it has no id."""
        if not isinstance(data, Mapping) or not _str(data.get("id")):
            raise BatchProtocolError(f"not a batch object: {str(data)[:200]}")
        errors_value = data.get("errors")
        error_items = errors_value.get("data") if isinstance(errors_value, Mapping) else errors_value
        errors = tuple(
            BatchError(_str(e.get("code")), _str(e.get("message")), _int(e.get("line")), _str(e.get("param")))
            for e in (error_items if isinstance(error_items, list) else [])
            if isinstance(e, Mapping)
        )
        metadata = data.get("metadata")
        times = {
            name: _int(data.get(name))
            for name in (
                "created_at",
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "expires_at",
                "cancelling_at",
                "cancelled_at",
            )
        }
        return cls(
            id=str(data["id"]),
            status=_str(data.get("status")) or "unknown",
            input_file_id=_str(data.get("input_file_id")),
            output_file_id=_str(data.get("output_file_id")),
            error_file_id=_str(data.get("error_file_id")),
            endpoint=_str(data.get("endpoint")),
            request_counts=RequestCounts.from_json(data.get("request_counts")),
            metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
            errors=errors,
            raw=dict(data),
            **times,
        )


@dataclass(frozen=True, slots=True)
class BatchPage:
    """One page of the batch list; pass `last_id` as `after` for the next one."""

    data: tuple[Batch, ...]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


@dataclass(frozen=True, slots=True)
class FileObject:
    """An uploaded file as the API reports it."""

    id: str
    bytes: int | None = None
    filename: str | None = None
    purpose: str | None = None
    created_at: int | None = None
    status: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> FileObject:
        """Read a file object; raises BatchProtocolError if it has no id."""
        if not isinstance(data, Mapping) or not _str(data.get("id")):
            raise BatchProtocolError(f"not a file object: {str(data)[:200]}")
        return cls(
            id=str(data["id"]),
            bytes=_int(data.get("bytes")),
            filename=_str(data.get("filename")),
            purpose=_str(data.get("purpose")),
            created_at=_int(data.get("created_at")),
            status=_str(data.get("status")),
            raw=dict(data),
        )


# --------------------------------------------------------------------------------------------------
# The client


class BatchAPI:
    """The Batch API of one endpoint and key. Use as `async with`, or call `aclose()` when done.

    `timeout_s` bounds each API call; `transfer_timeout_s` bounds an upload or a download as a whole
    (a download also fails when no byte arrives for `timeout_s`). `max_attempts` counts every try of
    a call, transient failures included. A result file that answers 404 is asked for again
    `not_ready_attempts` times, `not_ready_wait_s` apart and growing (instructor#1745: the output
    file may lag the `completed` status).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        transfer_timeout_s: float = 1800.0,
        max_attempts: int = 6,
        not_ready_attempts: int = 5,
        not_ready_wait_s: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wait: Callable[[RetryCallState], float] | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._max_attempts = max_attempts
        self._not_ready_attempts = not_ready_attempts
        self._not_ready_wait_s = not_ready_wait_s
        self._sleep = sleep
        self._wait = wait or _wait_with_retry_after()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchAPI:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- files ----

    async def upload(self, path: str | os.PathLike[str], *, purpose: str = "batch") -> FileObject:
        """Upload a JSONL file (multipart, `purpose=batch`), streamed from disk; returns the file object.

        A retried upload reopens the file and sends it whole again. If an answer was lost the first
        copy may exist on the server unreferenced; it expires with Zhipu's file retention.
        """
        source = Path(path)

        async def once() -> FileObject:
            handle = await asyncio.to_thread(open, source, "rb")
            try:
                form = aiohttp.FormData()
                form.add_field("purpose", purpose)
                # octet-stream is what zai-sdk ends up sending (httpx guesses no type for .jsonl).
                form.add_field("file", handle, filename=source.name, content_type="application/octet-stream")
                data = await self._request_once("POST", "/files", data=form, timeout_s=self._transfer_timeout_s)
            finally:
                handle.close()
            return FileObject.from_json(data)

        return await self._retrying(once)

    async def download(self, file_id: str, dest: str | os.PathLike[str]) -> int:
        """Stream a file's content to `dest` (via `dest.part`, fsynced, renamed); returns its size in bytes.

        A 404 is asked again a few times before it is raised as BatchNotFound: a batch's result file
        can lag its `completed` status.
        """
        target = Path(dest)
        for attempt in range(1, self._not_ready_attempts + 1):
            try:
                return await self._retrying(lambda: self._download_once(file_id, target))
            except BatchNotFound:
                if attempt == self._not_ready_attempts:
                    raise
                await self._sleep(self._not_ready_wait_s * attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def delete_file(self, file_id: str) -> bool:
        """Delete an uploaded file (Zhipu keeps at most 1,000 per account); True if the API says so."""
        data = await self._call("DELETE", f"/files/{file_id}")
        return bool(data.get("deleted", True)) if isinstance(data, Mapping) else True

    # ---- batches ----

    async def create(
        self,
        input_file_id: str,
        *,
        metadata: Mapping[str, str] | None = None,
        endpoint: str = "/v4/chat/completions",
        auto_delete_input_file: bool = True,
    ) -> Batch:
        """Create a batch over an uploaded file; never creates two from one file (see the module doc)."""
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "auto_delete_input_file": auto_delete_input_file,
        }
        if metadata:
            body["metadata"] = dict(metadata)
        tries = 0

        async def once() -> Batch:
            nonlocal tries
            tries += 1
            if tries > 1:  # an earlier try may have made it and lost the answer
                page = _page_from_json(await self._request_once("GET", "/batches", params={"limit": "100"}))
                made = next((b for b in page.data if b.input_file_id == input_file_id), None)
                if made is not None:
                    return made
            return Batch.from_json(await self._request_once("POST", "/batches", json_body=body))

        return await self._retrying(once)

    async def retrieve(self, batch_id: str) -> Batch:
        """The batch as it is now."""
        return Batch.from_json(await self._call("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> Batch:
        """Ask for the batch to be cancelled; finished requests are still delivered (and billed)."""
        return Batch.from_json(await self._call("POST", f"/batches/{batch_id}/cancel"))

    async def list(self, *, after: str | None = None, limit: int = 20) -> BatchPage:
        """One page of batches (`limit` 1 to 100), starting after the batch id `after`."""
        params = {"limit": str(max(1, min(limit, 100)))}
        if after:
            params["after"] = after
        return _page_from_json(await self._call("GET", "/batches", params=params))

    async def iter_batches(self, *, page_size: int = 100) -> AsyncIterator[Batch]:
        """Every batch of the account, page by page."""
        after: str | None = None
        while True:
            page = await self.list(after=after, limit=page_size)
            for batch in page.data:
                yield batch
            following = page.last_id or (page.data[-1].id if page.data else None)
            # Stop on the last page, and on a server that would hand back the same page forever.
            if not page.has_more or following is None or following == after:
                return
            after = following

    # ---- plumbing ----

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (an aiohttp session belongs to one loop).
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, raise_for_status=False)
        return self._session

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda e: classify_api_error(e) is Verdict.RETRY),
            sleep=self._sleep,
            reraise=True,
        )

        async def attempt() -> T:  # tenacity awaits only what is declared a coroutine function
            return await call()

        result: T = await retrying(attempt)
        return result

    async def _call(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, json_body: Any = None
    ) -> Any:
        return await self._retrying(lambda: self._request_once(method, path, params=params, json_body=json_body))

    async def _request_once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One HTTP exchange: the decoded JSON of a success, or the right BatchAPIError."""
        where = f"{method} {path}"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        try:
            async with self._client().request(
                method, self._base + path, params=params, json=json_body, data=data, timeout=timeout
            ) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors; cancellation is not one
            raise BatchTimeout(f"{where}: no answer within {timeout.total} s") from exc
        except aiohttp.ClientError as exc:
            raise BatchTransportError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if status >= 400:
            raise _status_error(status, raw, headers, where)
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            snippet = raw[:120].decode("utf-8", "replace")
            raise BatchProtocolError(f"{where}: {status} answer is not JSON: {snippet!r}") from None
        _raise_embedded_error(decoded, status, headers, where, raw)
        return decoded

    async def _download_once(self, file_id: str, target: Path) -> int:
        where = f"GET /files/{file_id}/content"
        part = target.with_name(target.name + ".part")
        timeout = aiohttp.ClientTimeout(total=self._transfer_timeout_s, sock_read=self._timeout_s)
        size = 0
        whole = False
        try:
            async with self._client().get(f"{self._base}/files/{file_id}/content", timeout=timeout) as response:
                if response.status >= 400:
                    raw = await response.content.read(_MAX_ERROR_BODY)
                    raise _status_error(response.status, raw, response.headers, where)
                handle = await asyncio.to_thread(open, part, "wb")
                try:
                    first = True
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        if first:
                            first = False
                            _refuse_error_object(chunk, response, where)
                        handle.write(chunk)
                        size += len(chunk)
                    handle.flush()
                    await asyncio.to_thread(os.fsync, handle.fileno())
                finally:
                    handle.close()
            whole = True
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors; cancellation is not one
            raise BatchTimeout(f"{where}: no whole answer within the time allowed") from exc
        except aiohttp.ClientError as exc:
            raise BatchTransportError(f"{where}: {type(exc).__name__}: {exc}") from exc
        finally:
            if not whole:  # whatever stopped it (cancellation too), never leave a torn .part behind
                part.unlink(missing_ok=True)
        os.replace(part, target)
        await asyncio.to_thread(_fsync_dir, target.parent)
        return size


def _page_from_json(data: Any) -> BatchPage:
    """Read a list answer `{"data": [...], "has_more", "first_id", "last_id"}`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise BatchProtocolError(f"not a batch list: {str(data)[:200]}")
    batches = tuple(Batch.from_json(item) for item in data["data"])
    return BatchPage(
        data=batches,
        has_more=bool(data.get("has_more")),
        first_id=_str(data.get("first_id")),
        last_id=_str(data.get("last_id")),
    )


def _raise_embedded_error(decoded: Any, status: int, headers: Mapping[str, str], where: str, raw: bytes) -> None:
    # Zhipu sometimes answers an error with status 200 and an `error` object (wire.md): not a success.
    if isinstance(decoded, Mapping) and isinstance(decoded.get("error"), Mapping) and "id" not in decoded:
        raise _status_error(status, raw, headers, where)


def _refuse_error_object(first_chunk: bytes, response: aiohttp.ClientResponse, where: str) -> None:
    """A result file is JSONL; a lone `{"error": ...}` object in its place is an error answered with 200."""
    if not first_chunk.lstrip().startswith(b"{") or len(first_chunk) >= _CHUNK:
        return
    try:
        data = json.loads(first_chunk)
    except ValueError:
        return  # several lines, or a line cut by the chunk: a result file
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "custom_id" not in data:
        raise _status_error(response.status, first_chunk, response.headers, where)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
