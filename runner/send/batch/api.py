"""An async client for Zhipu's Batch API: upload files, create, watch and cancel batches, download
results (why aiohttp, how it retries, why `create` never pays twice: docs/decisions.md)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_incrementing

from runner.files import fsync_rename
from runner.send.base import read_at_most
from runner.send.batch.errors import (
    MAX_ERROR_BODY,
    BatchNotFound,
    BatchProtocolError,
    BatchStatusError,
    BatchTimeout,
    BatchTransportError,
    classify_api_error,
    status_error,
)
from runner.send.batch.shapes import (
    Batch,
    BatchPage,
    FileObject,
    page_from_json,
)
from runner.send.retries import retrying, wait_backoff

T = TypeVar("T")

_CHUNK = 1 << 16
MAX_API_BODY = 16 << 20  # a batch object, a page of 100 of them, a file object: far less than this


class BatchAPI:
    """The Batch API of one endpoint and key; use as `async with`. `timeout_s` bounds each call,
    `transfer_timeout_s` a whole upload or download; a result file that answers 404 is asked again
    `not_ready_attempts` times (it may lag the `completed` status)."""

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
        self._wait = wait or wait_backoff(classify=classify_api_error)
        self._session: aiohttp.ClientSession | None = None
        self.retried_creates: set[str] = set()  # input files whose create was sent more than once

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

    async def upload(self, path: str | os.PathLike[str], *, purpose: str = "batch") -> FileObject:
        """Upload a JSONL file (multipart, `purpose=batch`) streamed from disk; the file object. A retry
        sends it whole again (a lost first copy expires with Zhipu's file retention)."""
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
        """Stream a file's content to `dest` (via `dest.part`, fsynced, renamed); its size in bytes.
        A 404 is asked again a few times before BatchNotFound (results can lag `completed`)."""
        target = Path(dest)
        return await self._until_there(lambda: self._retrying(lambda: self._download_once(file_id, target)))

    async def delete_file(self, file_id: str) -> bool:
        """Delete an uploaded file (Zhipu keeps at most 1,000 per account); True if the API says so."""
        data = await self._call("DELETE", f"/files/{file_id}")
        return bool(data.get("deleted", True)) if isinstance(data, Mapping) else True

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
        maybe_made = False  # an earlier try may have made it and lost the answer (an error answer did not)

        async def once() -> Batch:
            nonlocal maybe_made
            if maybe_made:
                self.retried_creates.add(input_file_id)
                page = page_from_json(await self._request_once("GET", "/batches", params={"limit": "100"}))
                made = next((b for b in page.data if b.input_file_id == input_file_id), None)
                if made is not None:
                    return made
            maybe_made = True  # until this try's answer is in hand
            try:
                return Batch.from_json(await self._request_once("POST", "/batches", json_body=body))
            except BatchStatusError as exc:
                maybe_made = exc.status >= 500  # a 4xx answer made nothing; a gateway's 5xx may hide a batch
                raise

        # A file just uploaded can be unknown to the batch service for a moment (404 "input file not
        # found", GenAI-Showcase#175): asked again, a little later each time, like a result file.
        return await self._until_there(lambda: self._retrying(once))

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
        return page_from_json(await self._call("GET", "/batches", params=params))

    async def pages(self, *, page_size: int = 100) -> AsyncIterator[BatchPage]:
        """The account's batches, a page at a time."""
        after: str | None = None
        while True:
            page = await self.list(after=after, limit=page_size)
            yield page
            following = page.last_id or (page.data[-1].id if page.data else None)
            # Stop on the last page, and on a server that would hand back the same page forever.
            if not page.has_more or following is None or following == after:
                return
            after = following

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (an aiohttp session belongs to one loop).
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, raise_for_status=False)
        return self._session

    async def _until_there(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, asked again while it raises BatchNotFound (an object not there yet), a little later each
        time, up to the not-ready attempts; then its BatchNotFound."""
        wait = self._not_ready_wait_s
        policy = AsyncRetrying(
            retry=retry_if_exception_type(BatchNotFound),
            stop=stop_after_attempt(self._not_ready_attempts),
            wait=wait_incrementing(start=wait, increment=wait),
            sleep=self._sleep,
            reraise=True,
        )
        return await _under(policy, call)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        policy = retrying(self._max_attempts, classify=classify_api_error, sleep=self._sleep, wait=self._wait)
        return await _under(policy, call)

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
                status, headers = response.status, response.headers
                # Bounded: an error body past MAX_ERROR_BODY is no API error object, a success past
                # MAX_API_BODY no batch object or page (a gateway's page, a runaway body).
                most = MAX_ERROR_BODY if status >= 400 else MAX_API_BODY
                raw = await read_at_most(response.content, most)
                if len(raw) > most and status < 400:
                    raise BatchProtocolError(f"{where}: {status} answer is over {most:,} bytes: not an API object")
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors; cancellation is not one
            raise BatchTimeout(f"{where}: no answer within {timeout.total} s") from exc
        except aiohttp.ClientError as exc:
            raise BatchTransportError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if status >= 400:
            raise status_error(status, raw, headers, where)
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            snippet = raw[:120].decode("utf-8", "replace")
            raise BatchProtocolError(f"{where}: {status} answer is not JSON: {snippet!r}") from None
        # Zhipu sometimes answers an error with status 200 and an `error` object (wire.md): not a success.
        if isinstance(decoded, Mapping) and isinstance(decoded.get("error"), Mapping) and "id" not in decoded:
            raise status_error(status, raw, headers, where)
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
                    raw = await read_at_most(response.content, MAX_ERROR_BODY)
                    raise status_error(response.status, raw, response.headers, where)
                handle = await asyncio.to_thread(open, part, "wb")
                try:
                    first = True
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        if first:
                            first = False
                            _refuse_error_object(chunk, response, where)
                        handle.write(chunk)
                        size += len(chunk)
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
        await asyncio.to_thread(fsync_rename, part, target)
        return size


async def _under(policy: AsyncRetrying, call: Callable[[], Awaitable[T]]) -> T:
    """`call` under a tenacity policy (which awaits only what is declared a coroutine function)."""

    async def attempt() -> T:
        return await call()

    result: T = await policy(attempt)
    return result


def _refuse_error_object(first_chunk: bytes, response: aiohttp.ClientResponse, where: str) -> None:
    """A result file is JSONL; a lone `{"error": ...}` object in its place is an error answered with 200."""
    if not first_chunk.lstrip().startswith(b"{") or len(first_chunk) >= _CHUNK:
        return
    try:
        data = json.loads(first_chunk)
    except ValueError:
        return  # several lines, or a line cut by the chunk: a result file
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "custom_id" not in data:
        raise status_error(response.status, first_chunk, response.headers, where)
