"""The Batch API client and the input-file writer, against a small aiohttp server on a real socket.

The server implements just enough of Zhipu's `/api/paas/v4` files and batches routes with canned
answers; a test queues the answers a route gives (errors, delays) and reads what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import BodyPartReader, web

from runner.send.batch.api import MAX_API_BODY, BatchAPI
from runner.send.batch.book import Chunk, custom_ids_in
from runner.send.batch.errors import (
    BatchAbort,
    BatchNotFound,
    BatchProtocolError,
    BatchStatusError,
    BatchTimeout,
    BatchTransportError,
    classify_api_error,
)
from runner.send.batch.files import BatchFile, BatchFileWriter
from runner.send.batch.harvest import read_result_lines
from runner.send.batch.native_answer import answer_from_chat
from runner.send.batch.native_request import chat_body
from runner.send.batch.native_results import classify_failure, parse_result_line
from runner.send.batch.shapes import Batch
from runner.send.retries import Fault, Verdict
from tests.conftest import until

KEY = "0123456789abcdef0123456789abcdef.secretsecret1234"
PREFIX = "/api/paas/v4"


@dataclass
class Canned:
    """One queued answer: a status and a JSON or raw body, optionally after a delay."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    """What one request carried."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    json: Any = None
    fields: dict[str, bytes] = field(default_factory=dict)
    filenames: dict[str, str | None] = field(default_factory=dict)


class FakeBatchServer:
    """Zhipu's Batch API, just enough of it: queued answers per route, defaults otherwise."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Canned]] = defaultdict(deque)
        self.seen: list[Seen] = []
        self.batches = [_batch(f"batch_{i}") for i in range(5)]  # newest first, as the list pages them
        self.files: dict[str, bytes] = {}
        self.url = ""

    def enqueue(self, route: str, *answers: Canned) -> None:
        """Queue answers for a route, named `METHOD /path` with `{id}` for any id."""
        self.queues[route].extend(answers)

    def calls(self, route: str) -> list[Seen]:
        """The requests a route received."""
        method, _, pattern = route.partition(" ")
        return [s for s in self.seen if s.method == method and _matches(pattern, s.path)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", PREFIX + "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.removeprefix(PREFIX)
        seen = Seen(request.method, path, dict(request.query), request.headers.get("Authorization"))
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if isinstance(part, BodyPartReader) and part.name:
                    seen.fields[part.name] = bytes(await part.read())
                    seen.filenames[part.name] = part.filename
        elif request.can_read_body:
            seen.json = await request.json()
        self.seen.append(seen)
        route = next((r for r in self.queues if _route_matches(r, request.method, path) and self.queues[r]), None)
        canned = self.queues[route].popleft() if route else self._default(seen)
        if canned.delay:
            await asyncio.sleep(canned.delay)
        if canned.raw is not None:
            return web.Response(status=canned.status, body=canned.raw, headers=canned.headers)
        return web.json_response(canned.body, status=canned.status, headers=canned.headers)

    def _default(self, seen: Seen) -> Canned:
        parts = seen.path.strip("/").split("/")
        if seen.method == "POST" and parts == ["files"]:
            data = seen.fields.get("file", b"")
            self.files["file_1"] = data
            return Canned(body={"id": "file_1", "object": "file", "bytes": len(data), "purpose": "batch"})
        if seen.method == "POST" and parts == ["batches"]:
            made = _batch("batch_new", input_file_id=seen.json["input_file_id"], status="validating")
            self.batches.insert(0, made)
            return Canned(body=made)
        if seen.method == "GET" and parts == ["batches"]:
            limit = int(seen.query.get("limit", "20"))
            ids = [b["id"] for b in self.batches]
            start = ids.index(seen.query["after"]) + 1 if "after" in seen.query else 0
            page = self.batches[start : start + limit]
            return Canned(
                body={
                    "object": "list",
                    "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": start + limit < len(self.batches),
                }
            )
        if seen.method == "GET" and parts[0] == "batches" and len(parts) == 2:
            return Canned(body=_batch(parts[1], status="completed", output_file_id="file_out"))
        if seen.method == "POST" and parts[0] == "batches" and parts[-1] == "cancel":
            return Canned(body=_batch(parts[1], status="cancelling"))
        if seen.method == "GET" and parts[0] == "files" and parts[-1] == "content":
            return Canned(raw=self.files.get(parts[1], b""), headers={"Content-Type": "application/octet-stream"})
        if seen.method == "DELETE" and parts[0] == "files":
            return Canned(body={"id": parts[1], "object": "file", "deleted": True})
        return Canned(status=404, body={"error": {"code": "1221", "message": "no such API"}})


def _batch(batch_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v4/chat/completions",
        "input_file_id": "file_0",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": 1_764_000_000,
        "request_counts": {"total": 3, "completed": 1, "failed": 0},
        "metadata": {"job": "t"},
        **fields,
    }


def _matches(pattern: str, path: str) -> bool:
    want, got = pattern.strip("/").split("/"), path.strip("/").split("/")
    return len(want) == len(got) and all(w == "{id}" or w == g for w, g in zip(want, got, strict=True))


def _route_matches(route: str, method: str, path: str) -> bool:
    want_method, _, pattern = route.partition(" ")
    return want_method == method and _matches(pattern, path)


@pytest.fixture
async def server() -> AsyncIterator[FakeBatchServer]:
    """The fake API on 127.0.0.1, on a port the OS picks."""
    fake = FakeBatchServer()
    runner = web.AppRunner(fake.app(), shutdown_timeout=0.1)  # slow handlers must not hold up teardown
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}{PREFIX}"
    yield fake
    await runner.cleanup()


@pytest.fixture
def waits() -> list[float]:
    """The backoff waits the client asked for (it never really sleeps in these tests)."""
    return []


@pytest.fixture
async def api(server: FakeBatchServer, waits: list[float]) -> AsyncIterator[BatchAPI]:
    """A client of the fake server whose sleeps are recorded instead of waited."""

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = BatchAPI(server.url, KEY, timeout_s=2.0, max_attempts=4, not_ready_attempts=3, sleep=sleep)
    yield client
    await client.aclose()


def error(status: int, code: str, message: str = "x", **headers: str) -> Canned:
    """Zhipu's native error answer."""
    return Canned(status=status, body={"error": {"code": code, "message": message}}, headers=headers)


def requests_for(n: int, model: str = "glm-4.6", repeat: int = 20) -> list[tuple[str, dict[str, Any]]]:
    """n (custom_id, body) pairs: 32-hex keys and chat bodies of about 6 * repeat bytes."""
    return [
        (
            f"{i:032x}",
            chat_body(
                {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"row {i} " * repeat}]}
            ),
        )
        for i in range(n)
    ]


# ---- files -------------------------------------------------------------------------------------------


async def test_upload_streams_the_file_with_purpose_batch(
    api: BatchAPI, server: FakeBatchServer, tmp_path: Path
) -> None:
    """The uploaded part is the file's exact bytes (several chunks' worth), with purpose=batch and the key."""
    [written] = write_batch_files(requests_for(600), tmp_path)
    assert written.size > 3 * 65536  # more than one read of the streaming payload
    uploaded = await api.upload(written.path)
    assert uploaded.id == "file_1" and uploaded.bytes == written.size
    [call] = server.calls("POST /files")
    assert call.fields["file"] == written.path.read_bytes()
    assert call.fields["purpose"] == b"batch"
    assert call.filenames["file"] == written.path.name
    assert call.authorization == f"Bearer {KEY}"


async def test_upload_retries_a_server_error_sending_the_whole_file_again(
    api: BatchAPI, server: FakeBatchServer, tmp_path: Path, waits: list[float]
) -> None:
    """A 500 on upload is retried, and the retry carries the whole file, not the unread rest."""
    [written] = write_batch_files(requests_for(10), tmp_path)
    server.enqueue("POST /files", error(500, "500"))
    await api.upload(written.path)
    calls = server.calls("POST /files")
    assert len(calls) == 2 and len(waits) == 1
    assert calls[1].fields["file"] == written.path.read_bytes()


async def test_download_waits_out_a_404_right_after_completion(
    api: BatchAPI, server: FakeBatchServer, tmp_path: Path, waits: list[float]
) -> None:
    """A result file that is not there yet (404) is asked for again; then it lands whole, no .part left."""
    content = b"".join(json.dumps({"custom_id": f"{i:032x}", "response": {}}).encode() + b"\n" for i in range(3000))
    server.files["file_out"] = content
    server.enqueue(
        "GET /files/{id}/content", error(404, "file_not_found", "file not found"), error(404, "file_not_found")
    )
    dest = tmp_path / "out.jsonl"
    assert await api.download("file_out", dest) == len(content)
    assert dest.read_bytes() == content
    assert len(server.calls("GET /files/{id}/content")) == 3
    assert waits == [2.0, 4.0]
    assert os.listdir(tmp_path) == ["out.jsonl"]


async def test_download_gives_up_on_a_file_that_never_appears(
    api: BatchAPI, server: FakeBatchServer, tmp_path: Path
) -> None:
    """A 404 that persists is raised as BatchNotFound after the not-ready attempts, and nothing is written."""
    server.enqueue("GET /files/{id}/content", *[error(404, "1221")] * 3)
    with pytest.raises(BatchNotFound):
        await api.download("nope", tmp_path / "out.jsonl")
    assert len(server.calls("GET /files/{id}/content")) == 3
    assert os.listdir(tmp_path) == []


async def test_download_refuses_an_error_object_served_as_the_file(
    api: BatchAPI, server: FakeBatchServer, tmp_path: Path
) -> None:
    """A 200 whose body is a lone error object (Zhipu does this) is an error, not a result file."""
    server.enqueue("GET /files/{id}/content", Canned(body={"error": {"code": "1113", "message": "余额不足"}}))
    with pytest.raises(BatchAbort, match="1113"):
        await api.download("file_out", tmp_path / "out.jsonl")
    assert os.listdir(tmp_path) == []


async def test_delete_file(api: BatchAPI) -> None:
    """Deleting a file reports the API's `deleted`."""
    assert await api.delete_file("file_1") is True


# ---- batches -----------------------------------------------------------------------------------------


async def test_create_sends_the_file_endpoint_and_metadata(api: BatchAPI, server: FakeBatchServer) -> None:
    """create posts what Zhipu documents and reads back a typed Batch."""
    batch = await api.create("file_9", metadata={"job": "reviews"})
    [call] = server.calls("POST /batches")
    assert call.json == {
        "input_file_id": "file_9",
        "endpoint": "/v4/chat/completions",
        "auto_delete_input_file": True,
        "metadata": {"job": "reviews"},
    }
    assert (batch.id, batch.status, batch.input_file_id, batch.done) == ("batch_new", "validating", "file_9", False)


async def test_retries_500_and_429_1302_then_succeeds(
    api: BatchAPI, server: FakeBatchServer, waits: list[float]
) -> None:
    """Transient answers are retried with backoff, honouring retry-after; the third try succeeds."""
    server.enqueue(
        "GET /batches/{id}",
        error(500, "500", "internal"),
        error(429, "1302", "您的账户已达到速率限制", **{"retry-after": "7"}),
    )
    batch = await api.retrieve("batch_3")
    assert batch.status == "completed" and batch.output_file_id == "file_out"
    assert len(server.calls("GET /batches/{id}")) == 3
    assert len(waits) == 2 and waits[1] >= 7.0


async def test_1113_aborts_at_once(api: BatchAPI, server: FakeBatchServer, waits: list[float]) -> None:
    """No balance (429 with code 1113) raises BatchAbort on the first answer: retrying cannot help."""
    server.enqueue("GET /batches/{id}", error(429, "1113", "余额不足或无可用资源包,请充值。"))
    with pytest.raises(BatchAbort) as caught:
        await api.retrieve("batch_1")
    assert (caught.value.status, caught.value.code) == (429, "1113")
    assert "余额不足" in caught.value.message
    assert len(server.calls("GET /batches/{id}")) == 1 and waits == []
    assert classify_api_error(caught.value) == Fault(Verdict.ABORT, "429/1113", caught.value.message)


@pytest.mark.parametrize(
    ("answer", "kind", "verdict"),
    [
        (
            Canned(status=401, body={"error": {"message": "token expired or incorrect", "type": "401"}}),
            BatchAbort,
            "abort",
        ),
        (error(400, "1214", "input_file_id invalid"), BatchStatusError, "fail"),
        (error(404, "1221"), BatchNotFound, "fail"),
        (Canned(status=200, body={"error": {"code": "1211", "message": "Unknown Model"}}), BatchAbort, "abort"),
    ],
)
async def test_errors_that_are_not_retried(
    api: BatchAPI, server: FakeBatchServer, answer: Canned, kind: type[Exception], verdict: str
) -> None:
    """Auth failures, bad requests, unknown ids and errors hidden in a 200 raise on the first answer."""
    server.enqueue("POST /batches/{id}/cancel", answer)
    with pytest.raises(kind) as caught:
        await api.cancel("batch_1")
    assert type(caught.value) is kind
    assert classify_api_error(caught.value).verdict.value == verdict
    assert len(server.calls("POST /batches/{id}/cancel")) == 1
    assert KEY not in str(caught.value)


async def test_create_after_a_lost_answer_does_not_make_a_second_batch(
    server: FakeBatchServer, waits: list[float]
) -> None:
    """If create times out after the server made the batch, the retry finds that batch instead of paying twice."""

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    made = _batch("batch_made", input_file_id="file_7")

    # The first create is made on the server but its answer comes too late.
    server.batches.insert(0, made)
    server.enqueue("POST /batches", Canned(body=made, delay=0.5))
    async with BatchAPI(server.url, KEY, timeout_s=0.1, max_attempts=3, sleep=sleep) as api:
        batch = await api.create("file_7")
    assert batch.id == "batch_made"
    assert len(server.calls("POST /batches")) == 1
    assert len(server.calls("GET /batches")) == 1


async def test_list_pages_and_iterates_every_batch(api: BatchAPI, server: FakeBatchServer) -> None:
    """list gives one page with has_more and last_id; pages follows `after` to the end."""
    page = await api.list(limit=2)
    assert [b.id for b in page.data] == ["batch_0", "batch_1"]
    assert page.has_more and page.last_id == "batch_1"
    ids = [b.id async for each in api.pages(page_size=2) for b in each.data]
    assert ids == [f"batch_{i}" for i in range(5)]
    afters = [c.query.get("after") for c in server.calls("GET /batches")][1:]
    assert afters == [None, "batch_1", "batch_3"]


async def test_iteration_stops_on_a_server_that_repeats_a_page(api: BatchAPI, server: FakeBatchServer) -> None:
    """A server that says has_more but hands back the same page cannot loop us forever."""
    stuck = {"data": [_batch("batch_0")], "has_more": True, "last_id": "batch_0"}
    server.enqueue("GET /batches", Canned(body=stuck), Canned(body=stuck), Canned(body=stuck))
    assert [b.id async for each in api.pages() for b in each.data] == ["batch_0", "batch_0"]


@pytest.mark.parametrize("newest_first", [True, False])
async def test_batches_since_a_moment_are_found_in_either_list_order(
    api: BatchAPI, server: FakeBatchServer, newest_first: bool
) -> None:
    """The list's order is not documented: newest first, reading stops at the page that ends before
    the moment; in any other order every page is read. Either way only batches since then are given."""
    from runner.send.batch.duplicates import batches_since

    made = [_batch(f"b{i}", created_at=1_764_000_000_000 + i * 1000) for i in range(6)]  # ms, oldest first
    listed = made[::-1] if newest_first else made
    pages = [listed[:2], listed[2:4], listed[4:]]
    for n, page in enumerate(pages):
        body = {"object": "list", "data": page, "last_id": page[-1]["id"], "has_more": n < 2}
        server.enqueue("GET /batches", Canned(body=body))
    found = [b.id async for b in batches_since(api, 1_764_000_002_500)]  # after b2 was made
    assert sorted(found) == ["b3", "b4", "b5"]
    assert len(server.calls("GET /batches")) == (2 if newest_first else 3)


async def test_a_slow_answer_times_out_and_is_retried(server: FakeBatchServer, waits: list[float]) -> None:
    """A call with no answer within its timeout raises BatchTimeout internally and is tried again."""

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    server.enqueue("GET /batches/{id}", Canned(body=_batch("b"), delay=0.5))
    async with BatchAPI(server.url, KEY, timeout_s=0.1, max_attempts=2, sleep=sleep) as api:
        assert (await api.retrieve("b")).status == "completed"
        server.enqueue("GET /batches/{id}", *[Canned(body=_batch("b"), delay=0.5)] * 2)
        with pytest.raises(BatchTimeout):
            await api.retrieve("b")
    assert len(waits) == 2


async def test_connection_refused_is_a_transport_error(waits: list[float]) -> None:
    """Nothing listening: retried, then raised as BatchTransportError."""

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with BatchAPI("http://127.0.0.1:9/api/paas/v4", KEY, max_attempts=2, sleep=sleep) as api:
        with pytest.raises(BatchTransportError):
            await api.retrieve("b")
    assert len(waits) == 1


async def test_an_html_page_is_a_protocol_error(api: BatchAPI, server: FakeBatchServer) -> None:
    """A gateway's HTML with status 200 is retried as a passing fault, then raised as such."""
    page = Canned(raw=b"<html>upstream busy</html>", headers={"Content-Type": "text/html"})
    server.enqueue("GET /batches/{id}", *[page] * 4)
    with pytest.raises(BatchProtocolError, match="not JSON"):
        await api.retrieve("b")
    assert len(server.calls("GET /batches/{id}")) == 4


async def test_cancellation_propagates(server: FakeBatchServer) -> None:
    """Cancelling a call in flight cancels it: no retry, no wrapping, no .part file left."""
    server.enqueue("GET /batches/{id}", Canned(body=_batch("b"), delay=5))
    async with BatchAPI(server.url, KEY, timeout_s=10) as api:
        task = asyncio.create_task(api.retrieve("b"))
        await until(lambda: server.calls("GET /batches/{id}"))  # in flight: the server holds its answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(server.calls("GET /batches/{id}")) == 1


def test_batch_view_is_tolerant() -> None:
    """A batch object with only an id and a status still reads; odd fields read as defaults."""
    batch = Batch.from_json({"id": "b", "status": "completed", "request_counts": {"total": "3", "failed": None}})
    assert (batch.done, batch.request_counts.total, batch.request_counts.failed) == (True, 3, 0)
    assert batch.output_file_id is None and batch.metadata == {}
    full = Batch.from_json(
        {**_batch("b2"), "errors": {"object": "list", "data": [{"code": "1214", "line": 3, "message": "bad"}]}}
    )
    assert full.errors[0].line == 3 and full.metadata == {"job": "t"}
    with pytest.raises(BatchProtocolError):
        Batch.from_json({"status": "completed"})


# ---- input files -------------------------------------------------------------------------------------


def write_batch_files(
    items: Iterable[tuple[str, Mapping[str, Any]]], directory: Path, **limits: int
) -> list[BatchFile]:
    """(custom_id, body) pairs written into batch input files by the runner's writer; the files."""
    with BatchFileWriter(directory, **limits) as writer:
        for custom_id, body in items:
            writer.add(custom_id, body)
    return writer.files


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_files_split_by_count_and_keep_one_model_each(tmp_path: Path) -> None:
    """Requests split at max_requests per file and never mix models; every line is a documented line."""
    items = requests_for(5, "glm-4.6") + requests_for(3, "glm-4.5-air")
    items = [(f"{i:032x}", body) for i, (_, body) in enumerate(items)]  # ids unique across both models
    files = write_batch_files(items, tmp_path, max_requests=2)
    assert [(f.model, f.lines) for f in files] == [
        ("glm-4.6", 2),
        ("glm-4.6", 2),
        ("glm-4.5-air", 2),
        ("glm-4.6", 1),
        ("glm-4.5-air", 1),
    ]
    seen: list[str] = []
    for f in files:
        lines = _read_lines(f.path)
        assert f.size == f.path.stat().st_size
        assert {line["body"]["model"] for line in lines} == {f.model}
        assert [line["custom_id"] for line in lines] == list(custom_ids_in(f.path))
        assert all(line["method"] == "POST" and line["url"] == "/v4/chat/completions" for line in lines)
        seen += custom_ids_in(f.path)
    assert sorted(seen) == sorted(cid for cid, _ in items)
    assert not list(tmp_path.glob("*.part"))


def test_a_chunk_gives_back_every_key_it_was_written_with(tmp_path: Path) -> None:
    """The batch book reads a chunk's keys back as written: plain ones, and ones with a quote, a
    backslash, a control character or non-ASCII text."""
    keys = ["0f3a9c", 'say "hi"', "back\\slash", "tab\there", "评论-7", "k" * 200]
    items = [(key, body) for key, (_, body) in zip(keys, requests_for(len(keys)), strict=True)]
    (written,) = write_batch_files(items, tmp_path)
    chunk = Chunk(id="c", path=str(written.path), requests="", model=written.model, lines=written.lines, round=0)
    assert list(chunk.request_keys()) == keys


def test_files_split_by_bytes(tmp_path: Path) -> None:
    """No file passes max_bytes; a line that alone would is refused."""
    items = requests_for(20)
    line_size = len(
        json.dumps({"custom_id": items[0][0], "method": "POST", "url": "/v4/chat/completions", "body": items[0][1]})
    )
    files = write_batch_files(items, tmp_path, max_bytes=line_size * 3 + 10)
    assert all(f.size <= line_size * 3 + 10 for f in files) and sum(f.lines for f in files) == 20
    with pytest.raises(ValueError, match="more than a batch file may hold"):
        write_batch_files(items[:1], tmp_path / "small", max_bytes=50)


def test_writer_streams_and_cleans_up_after_a_failure(tmp_path: Path) -> None:
    """Lines reach disk as they come; a failure midway leaves no .part file that could pass for whole."""

    def items() -> Any:
        # Lines larger than the file object's buffer, so what was written is on disk, not in a buffer.
        for n, item in enumerate(requests_for(5, repeat=2000)):
            if n == 3:
                # The first three lines are already on disk, in a .part file, before the iterator ends.
                [part] = tmp_path.glob("*.part")
                assert part.read_bytes().count(b"\n") == 3
                raise RuntimeError("input broke")
            yield item

    with pytest.raises(RuntimeError):
        write_batch_files(items(), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("a", {"messages": []})], "no model"),
        ([("a", {"model": "m"}), ("a", {"model": "m"})], "twice"),
        ([("", {"model": "m"})], "custom_id"),
    ],
)
def test_writer_refuses_bad_requests(tmp_path: Path, pairs: list[tuple[str, dict[str, Any]]], fragment: str) -> None:
    """A body with no model, a repeated or empty custom_id are refused by name."""
    with pytest.raises(ValueError, match=fragment), BatchFileWriter(tmp_path) as writer:
        for cid, body in pairs:
            writer.add(cid, body)


# ---- against the simulator's Batch API, where this branch has it -------------------------------------


async def test_round_trip_on_the_simulator(tmp_path: Path) -> None:
    """Write, upload, create, poll, download and read every line back, on the simulator's Batch API.

    Skipped where the simulator has no Batch API (it is built on another branch); the fake server above
    is what proves the client's behaviour, this proves it speaks the same wire as the simulator.
    """
    pytest.importorskip("runner.simulator.native", reason="the simulator's Batch API is not on this branch")
    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import SimulatorThread

    config: dict[str, Any] = {"batch_error_rate": 0.3, "batch_output_404_s": 0.2, "seed": 1}
    requests = requests_for(30)
    [written] = write_batch_files(requests, tmp_path / "in")
    with SimulatorThread(SimConfig(**config)) as sim:
        async with BatchAPI(sim.url + "/api/paas/v4", KEY, timeout_s=10, not_ready_wait_s=0.1) as api:
            uploaded = await api.upload(written.path)
            made = await api.create(uploaded.id, metadata={"job": "wire-test"})

            async def done() -> Batch | None:
                batch = await api.retrieve(made.id)
                return batch if batch.done else None

            batch = await until(done, every_s=0.05)
            assert batch.status == "completed"
            assert batch.request_counts.total == 30
            lines: list[bytes] = []
            for n, file_id in enumerate(f for f in (batch.output_file_id, batch.error_file_id) if f):
                await api.download(file_id, tmp_path / f"result-{n}.jsonl")
                lines += (tmp_path / f"result-{n}.jsonl").read_bytes().splitlines()
    parsed = [parse_result_line(line) for line in lines]
    assert sorted(p.custom_id or "" for p in parsed) == sorted(cid for cid, _ in requests)
    good = [p for p in parsed if p.ok]
    assert len(good) == batch.request_counts.completed
    for line in good:
        assert line.body is not None
        answer = answer_from_chat(line.body, line.request_id)
        assert answer.text and answer.input_tokens > 0 and answer.model == "glm-4.6"
    assert all(classify_failure(p) is Verdict.RETRY for p in parsed if not p.ok)  # 500 and 429/1302 lines


async def test_a_create_retried_after_its_answer_was_lost_leaves_one_live_batch_for_the_chunk(tmp_path: Path) -> None:
    """The first create's answer never comes in time (it lands a second later, as a lost answer's batch
    does); the client's retry finds nothing yet and creates another. A sweep over the chunk's tag keeps
    the batch the book has and cancels the one that landed late, while it still validates (free)."""
    from runner.send.batch.book import BatchBook
    from runner.send.batch.duplicates import Twins
    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import SimulatorThread

    [written] = write_batch_files(requests_for(10), tmp_path / "in")
    book = BatchBook(tmp_path / "book")
    book.record("c", path=str(written.path), requests="", model="glm-4.6", lines=10, round=0, status="written")
    config = SimConfig(batch_create_lands_after_s=1.0, batch_validating_s=30.0)
    with SimulatorThread(config) as sim:
        async with BatchAPI(sim.url + "/api/paas/v4", KEY, timeout_s=0.3) as api:
            uploaded = await api.upload(written.path)
            made = await api.create(uploaded.id, metadata={"glm_batch_job": "j", "glm_batch_chunk": "c"})
            assert uploaded.id in api.retried_creates  # the client knows its create may have been made twice
            book.record("c", status="created", file_id=uploaded.id, uploaded_at=uploaded.created_at, batch_id=made.id)
            twins = Twins("j")
            assert await twins.sweep(api, book, ["c"]) == set() and book.strays == {}  # one batch so far
            await until(lambda: sim.stats()["outcomes"].get("batch_created") == 2)  # the late one landed
            assert await twins.sweep(api, book, ["c"]) == set()  # the book's batch is kept
            [late] = book.strays
            assert late != made.id and book.chunks["c"].batch_id == made.id
            assert (await api.retrieve(late)).status in ("cancelling", "cancelled")
            assert (await api.retrieve(made.id)).status == "validating"
            assert await twins.sweep(api, book, ["c"]) == set() and list(book.strays) == [late]  # once


async def test_an_answer_past_the_api_bound_is_refused_never_held_whole(
    api: BatchAPI, server: FakeBatchServer, waits: list[float]
) -> None:
    """A batch object is a few kB: a 16 MB+ answer (a runaway body, a gateway's dump) is refused after
    MAX_API_BODY bytes, retried like any unreadable answer, and the call fails when it stays so."""
    huge = b'{"id": "b", "status": "completed", "note": "' + b"x" * MAX_API_BODY + b'"}'
    server.enqueue("GET /batches/{id}", *[Canned(raw=huge)] * 4)
    with pytest.raises(BatchProtocolError, match="over 16,777,216 bytes"):
        await api.retrieve("b")
    assert len(server.calls("GET /batches/{id}")) == 4 and len(waits) == 3


def test_a_result_line_past_the_answer_bound_fails_its_request_read_through_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """A result line longer than one answer may be (here 1 MB; MAX_ANSWER_BYTES in a run) is skipped
    through without being held (its ends name its request) and fails it for good: asked again it would
    be as large, and it was billed. The lines around it are read as ever."""
    import tracemalloc

    ok = json.dumps({"custom_id": "a", "response": {"status_code": 200, "body": {}}}).encode() + b"\n"
    body = b'{"response": {"status_code": 200, "body": {"x": "' + b"y" * (20 << 20) + b'"}}, "custom_id": "big"}\n'
    path = tmp_path / "out.jsonl"
    path.write_bytes(ok + body + ok.replace(b'"a"', b'"c"'))
    del body
    tracemalloc.start()
    lines = list(read_result_lines([path], limit=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [line.custom_id for line in lines] == ["a", "big", "c"]
    assert lines[1].error_code == "answer_too_large" and classify_failure(lines[1]) is Verdict.FAIL
    assert peak < 4 << 20, peak  # a few times the bound, never the 20 MB line
