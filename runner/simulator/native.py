"""Zhipu's native API on the simulator, under /api/paas/v4: tokenizer, chat completions and the Batch API
routes (what is modelled and what is guessed: docs/decisions.md, "The simulator")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from runner.simulator.answers import ask_from_chat, chat_completion, count_tokens, prompt_key
from runner.simulator.batch_input import checked_ask, eligible, parse_file
from runner.simulator.batch_state import ACTIVE, NativeState, SimBatch, SimFile
from runner.simulator.config import BATCH_QUEUE_CAPS, METADATA_MAX_KEY, METADATA_MAX_KEYS, METADATA_MAX_VALUE

NATIVE_PATH = "/api/paas/v4"
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.Response]]
BATCH_ENDPOINTS = ("/v4/chat/completions", "/v1/chat/completions")  # docs and zai-sdk disagree: accept both


class _Refused(Exception):
    """A native request refused with a Zhipu-style error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class NativeAPI(NativeState):
    """The /api/paas/v4 routes of one Simulator, over the files and batches NativeState holds."""

    def add_routes(self, app: web.Application) -> None:
        """Register the native routes on the simulator's app."""
        p, served = NATIVE_PATH, self._refusing
        app.router.add_post(f"{p}/tokenizer", served(self._tokenizer))
        app.router.add_post(f"{p}/chat/completions", served(self._chat, counted="native"))
        app.router.add_post(f"{p}/files", served(self._upload, counted="upload"))
        app.router.add_get(f"{p}/files/{{id}}", served(self._file_info))
        app.router.add_delete(f"{p}/files/{{id}}", served(self._file_delete))
        app.router.add_get(f"{p}/files/{{id}}/content", served(self._file_content))
        app.router.add_post(f"{p}/batches", served(self._create, counted="batch_create"))
        app.router.add_get(f"{p}/batches", served(self._list))
        app.router.add_get(f"{p}/batches/{{id}}", served(self._retrieve))
        app.router.add_post(f"{p}/batches/{{id}}/cancel", served(self._cancel))

    # ---- request plumbing ------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> None:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key:
            raise _Refused(401, "1001", "Authentication parameter not received in Header, unable to authenticate")
        keys = self.host.config.api_keys
        if keys is not None and key not in keys:
            raise _Refused(401, "401", "token expired or incorrect")

    def _held(self, request: web.Request, held: dict[str, T], kind: str) -> T:
        """The file or batch the route's `{id}` names, once the key is checked; 404 when there is none."""
        self._auth(request)
        ident = request.match_info["id"]
        found = held.get(ident)
        if found is None:
            raise _Refused(404, "404", f"{kind} {ident} not found")
        return found

    def _refusing(self, handler: Handler, *, counted: str | None = None) -> Handler:
        """A route as it is served: a refusal its handler raises (_Refused) is answered with Zhipu's
        error body, and counted in stats()["outcomes"] as `<counted>_<status>_<code>` when `counted`."""

        async def route(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except _Refused as err:
                if counted is not None:
                    self.host.count(f"{counted}_{err.status}_{err.code}")
                body = {"error": {"code": err.code, "message": err.message}}
                return web.json_response(body, status=err.status)

        return route

    # ---- tokenizer and online chat completions ----------------------------------------------------

    async def _tokenizer(self, request: web.Request) -> web.Response:
        """Zhipu's native token counter: the same count /v1/messages would report, and no answer."""
        if not request.headers.get("authorization", "").removeprefix("Bearer "):
            raise _Refused(401, "1001", "Authentication parameter not received in Header")
        body = await request.json()
        ask = ask_from_chat({**body, "messages": body.get("messages", [])}, 1)
        tokens = count_tokens(ask.prompt, self.host.config.token_scale)
        self.host.count("tokenizer")
        return web.json_response({"id": "tok", "created": 0, "request_id": "tok", "usage": {"prompt_tokens": tokens}})

    async def _chat(self, request: web.Request) -> web.Response:
        """Online native chat completions (non-streaming): the same answer, billed as "online".
        No faults and no concurrency cap here: those live on /v1/messages."""
        self._auth(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Refused(400, "1210", "Invalid JSON body") from exc
        ask = checked_ask(body, None, self.host.config.token_scale)
        if isinstance(ask, tuple):
            raise _Refused(*ask)
        reply = self.host.reply(ask)
        completion = chat_completion(reply, ask.model, self.host.new_id(""), int(time.time()))
        await self.host.generate(self.host.delay(), "online", prompt_key(ask.prompt), reply)
        self.host.count("native_ok")
        return web.json_response(completion, headers={"x-request-id": completion["id"]})

    # ---- files -----------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        cfg = self.host.config
        self._auth(request)
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            raise _Refused(400, "1214", "purpose must be batch")
        if not isinstance(upload, web.FileField):
            raise _Refused(400, "1214", "file is required (multipart field 'file')")
        _fault(cfg.batch_upload_status)
        data = upload.file.read()
        if len(data) > cfg.batch_max_bytes:  # the file APIs' documented code for a file over 100 MB
            raise _Refused(435, "435", f"file is {len(data)} bytes; at most {cfg.batch_max_bytes} allowed")
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        if not lines:
            raise _Refused(400, "1214", "file is empty")
        if len(lines) > cfg.batch_max_lines:
            raise _Refused(400, "1214", f"file has {len(lines)} lines; at most {cfg.batch_max_lines} allowed")
        if cfg.batch_check_on_upload:
            problem = parse_file(data)[2]
            if problem is not None:
                raise _Refused(400, "1214", problem)
        visible = time.monotonic() + cfg.batch_file_visible_after_s
        file = SimFile(self.new_file_id(), upload.filename, "batch", data, int(time.time() * 1000), visible)
        with self.host.lock:
            if cfg.batch_file_cap is not None and len(self.files) >= cfg.batch_file_cap:
                raise _Refused(400, "1214", f"file limit reached: at most {cfg.batch_file_cap} files; delete some")
            self.files[file.id] = file
        self.host.count("file_uploaded")
        return web.json_response(_file_json(file, self.host.config.batch_timestamps))

    async def _file_info(self, request: web.Request) -> web.Response:
        return web.json_response(_file_json(self._held(request, self.files, "file"), self.host.config.batch_timestamps))

    async def _file_delete(self, request: web.Request) -> web.Response:
        file = self._held(request, self.files, "file")
        with self.host.lock:
            self.files.pop(file.id, None)
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.Response:
        self.advance_all()
        file = self._held(request, self.files, "file")
        if file.purpose != "batch":
            _fault(self.host.config.batch_download_status)
        if time.monotonic() < file.ready_at:  # a result file not yet readable right after the batch ended
            self.host.count("file_not_ready_404")
            raise _Refused(404, "404", f"file {file.id} not found")
        data = file.data
        if file.purpose != "batch" and file.downloads < self.host.config.batch_result_short_downloads:
            data = data[: len(data) * 6 // 10]  # a truncated result file (a proxy, a cut transfer)
        file.downloads += 1
        return web.Response(body=data, content_type="application/jsonl")

    # ---- batches ---------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        cfg = self.host.config
        self._auth(request)
        _fault(cfg.batch_create_status)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Refused(400, "1210", "Invalid JSON body") from exc
        file = self.files.get(body.get("input_file_id", ""))
        if file is None or file.purpose != "batch":
            raise _Refused(400, "1214", f"input_file_id {body.get('input_file_id')!r} is not an uploaded batch file")
        if time.monotonic() < file.ready_at:  # just uploaded, not yet known to the batch service
            raise _Refused(404, "404", f"input file {file.id} not found")
        if body.get("endpoint") not in BATCH_ENDPOINTS:
            raise _Refused(400, "1214", f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
        metadata = body.get("metadata")
        problem = _metadata_problem(metadata)
        if problem is not None:
            raise _Refused(400, "1214", problem)
        lines, model, invalid = parse_file(file.data)
        if model is not None and cfg.batch_refuse_ineligible and not eligible(model):
            raise _Refused(400, "1212", f"model {model} is not available for the Batch API")

        def make() -> dict[str, Any]:
            made = self._make_batch(body, file, metadata, lines, model, invalid)
            self.host.count("batch_created")  # counted as it lands, heard of or not
            return made

        delay = cfg.batch_create_lands_after_s
        if delay is None or self.late_creates >= cfg.batch_create_late_times:
            payload = make()
        else:  # lands late, whether or not its client is still there to hear of it
            self.late_creates += 1
            self.host.count("batch_create_late")

            async def land() -> dict[str, Any]:
                # The delay is read as it runs: a test holds a create (a long delay) and lets it land
                # when it chooses (configure(batch_create_lands_after_s=0)).
                asked = time.monotonic()
                # A poll of the config, not an Event: a test changes it from outside (configure).
                while (left := (self.host.config.batch_create_lands_after_s or 0.0) - (time.monotonic() - asked)) > 0:  # noqa: ASYNC110
                    await asyncio.sleep(min(left, 0.02))
                return make()

            landing = asyncio.ensure_future(land())
            self.landing.add(landing)
            landing.add_done_callback(self.landing.discard)
            landing.add_done_callback(_quiet)
            payload = await asyncio.shield(landing)
        return web.json_response(payload)

    def _make_batch(
        self,
        body: dict[str, Any],
        file: SimFile,
        metadata: Any,
        lines: list[tuple[str, Any]],
        model: str | None,
        invalid: str | None,
    ) -> dict[str, Any]:
        """Make the batch a create asked for, if the model's queue has room; its JSON."""
        cfg = self.host.config
        with self.host.lock:
            now = time.monotonic()
            for other in self.batches.values():
                self._advance(other, now)
            queued = sum(b.total for b in self.batches.values() if b.model == model and b.status in ACTIVE)
            cap = cfg.batch_queue_cap if cfg.batch_queue_cap is not None else BATCH_QUEUE_CAPS.get(model or "")
            if cap is not None and queued + len(lines) > cap:
                self.host.count("batch_queue_full")
                raise _Refused(
                    429,
                    "1210",
                    f"batch queue full for {model}: {queued} requests queued, {len(lines)} more would "
                    f"exceed the cap of {cap}; wait for current tasks to finish",
                )
            batch = SimBatch(
                id=self.host.new_id("batch_"),
                input_file_id=file.id,
                endpoint=body["endpoint"],
                metadata=metadata,
                model=model,
                auto_delete=bool(body.get("auto_delete_input_file", True)),  # documented default: true
                lines=lines,
                total=len(lines),
                created=now,
                wall=time.time(),
                invalid=invalid,
            )
            batch.times["validating"] = now
            self.batches[batch.id] = batch
            self._advance(batch, now)
            return self._batch_json(batch)

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self._held(request, self.batches, "batch")
        _fault(self.host.config.batch_retrieve_status)
        if self.forgets(batch):
            raise _Refused(404, "404", f"batch {batch.id} not found")
        with self.host.lock:
            self._advance(batch, time.monotonic())
            return web.json_response(self._batch_json(batch))

    async def _list(self, request: web.Request) -> web.Response:
        """Newest first, like OpenAI (or oldest first: `batch_list_order`); `after` is the last id of the
        previous page."""
        self._auth(request)
        self.host.count("batch_list")
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError as exc:
            raise _Refused(400, "1214", "limit must be an integer") from exc
        if not 1 <= limit <= 100:
            raise _Refused(400, "1214", "limit must be between 1 and 100")
        order = list(reversed(self.batches)) if self.host.config.batch_list_order == "newest" else list(self.batches)
        after = request.query.get("after")
        if after:
            if after not in self.batches:
                raise _Refused(400, "1214", f"after: batch {after} not found")
            order = order[order.index(after) + 1 :]
        with self.host.lock:
            now = time.monotonic()
            page = [self.batches[i] for i in order[:limit]]
            for b in page:
                self._advance(b, now)
            data = [self._batch_json(b) for b in page]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(order) > limit,
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self._held(request, self.batches, "batch")
        with self.host.lock:
            now = time.monotonic()
            self._advance(batch, now)
            if batch.status not in ("validating", "in_progress"):
                raise _Refused(400, "1214", f"batch {batch.id} is {batch.status} and cannot be cancelled")
            batch.status, batch.stop_at = "cancelling", now
            batch.times["cancelling"] = now
            payload = self._batch_json(batch)  # a cancel answers `cancelling`; a later look may say cancelled
        self.host.count("batch_cancel")
        return web.json_response(payload)


def _metadata_problem(metadata: Any) -> str | None:
    """Why a create's metadata breaks the documented bounds (16 keys; a key 64, a value 512 characters)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > METADATA_MAX_KEYS:
        return f"metadata must be an object of at most {METADATA_MAX_KEYS} keys"
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            return f"metadata key {key[:20]!r}... is longer than {METADATA_MAX_KEY} characters"
        if not isinstance(value, str) or len(value) > METADATA_MAX_VALUE:
            return f"metadata value of {key!r} must be a string of at most {METADATA_MAX_VALUE} characters"
    return None


def _quiet(task: asyncio.Future[Any]) -> None:
    """A late create that was refused when it landed, with no client left to hear it: nothing to report."""
    if not task.cancelled():
        task.exception()


def _fault(status: int | None) -> None:
    """Answer with `status` (a fault a test asked for), when one is set."""
    if status is not None:
        raise _Refused(status, str(status), "Service Unavailable" if status >= 500 else f"{status} fault")


def _file_json(file: SimFile, unit: str) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": len(file.data),
        "created_at": file.created_at if unit == "ms" else file.created_at // 1000,
        "filename": file.filename,
        "purpose": file.purpose,
    }
