"""Zhipu's native API on the simulator, under /api/paas/v4: tokenizer, chat completions and the Batch API.

The Batch API follows batch.md: upload a JSONL file (`POST /files`, multipart, purpose=batch), create a
batch from it (`POST /batches`), poll (`GET /batches/{id}`, `GET /batches?after=&limit=`), cancel
(`POST /batches/{id}/cancel`), download results (`GET /files/{id}/content`). A batch's life is computed
from the clock whenever it is looked at (no background task): validating, then in_progress at
`batch_lines_per_s`, finalizing, completed; or failed, expired, cancelling -> cancelled. Each line is
answered by the same `Simulator.reply` as /v1/messages and billed once, as "batch", when processed.
Error bodies are native-shaped: `{"error": {"code": "1214", "message": "..."}}`. Codes for cases Zhipu
does not document (a file not found, a full queue, a model not eligible) are guesses.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runner.job import catalog
from runner.testing.answers import ask_from_chat, chat_completion, count_tokens, prompt_key, share

if TYPE_CHECKING:
    from runner.testing.simulator import Simulator

NATIVE_PATH = "/api/paas/v4"
LINE_URL = "/v4/chat/completions"
BATCH_ENDPOINTS = ("/v4/chat/completions", "/v1/chat/completions")  # docs and zai-sdk disagree: accept both
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_TRANSIENT = (
    (500, {"error": {"code": "500", "message": "Internal Error"}}),
    (429, {"error": {"code": "1302", "message": "您的账户已达到速率限制，请您控制请求频率"}}),
)


class _Refused(Exception):
    """A native request refused with a Zhipu-style error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    ready_at: float = 0.0  # monotonic time before which its content answers 404 (a result file's quirk)


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, Any] | None
    model: str | None
    auto_delete: bool
    lines: list[tuple[str, Any]]  # (custom_id, body) in file order
    created: float  # monotonic
    wall: float  # time.time() at `created`, to report epoch timestamps
    status: str = "validating"
    invalid: str | None = None  # why validation fails, when it will
    started: float | None = None  # in_progress since
    stop_at: float | None = None  # when processing stopped (cancel, expiry)
    processed: int = 0
    outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    times: dict[str, float] = field(default_factory=dict)  # status -> monotonic time it began
    output_file_id: str | None = None
    error_file_id: str | None = None


class NativeAPI:
    """The /api/paas/v4 routes of one Simulator, and the files and batches they hold."""

    def __init__(self, host: Simulator) -> None:
        self.host = host
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}  # in creation order
        self._attempts: dict[str, int] = {}  # prompt hash -> batch lines seen (a retry draws anew)

    def add_routes(self, app: web.Application) -> None:
        """Register the native routes on the simulator's app."""
        p = NATIVE_PATH
        app.router.add_post(f"{p}/tokenizer", self._tokenizer)
        app.router.add_post(f"{p}/chat/completions", self._chat)
        app.router.add_post(f"{p}/files", self._upload)
        app.router.add_get(f"{p}/files/{{id}}", self._file_info)
        app.router.add_delete(f"{p}/files/{{id}}", self._file_delete)
        app.router.add_get(f"{p}/files/{{id}}/content", self._file_content)
        app.router.add_post(f"{p}/batches", self._create)
        app.router.add_get(f"{p}/batches", self._list)
        app.router.add_get(f"{p}/batches/{{id}}", self._retrieve)
        app.router.add_post(f"{p}/batches/{{id}}/cancel", self._cancel)

    # ---- on-demand control (tests) ---------------------------------------------------------------

    def expire(self, batch_id: str) -> None:
        """End a running batch as expired now: processed lines are delivered and billed, the rest expire."""
        with self.host.lock:
            batch = self.batches[batch_id]
            now = time.monotonic()
            self._advance(batch, now)
            if batch.status in ("validating", "in_progress", "finalizing"):
                self._end(batch, "expired", now)

    def fail(self, batch_id: str, message: str) -> None:
        """Fail a batch that has not ended, as if validation had refused it."""
        with self.host.lock:
            batch = self.batches[batch_id]
            now = time.monotonic()
            self._advance(batch, now)
            if batch.status in ACTIVE:
                batch.invalid = message
                self._end(batch, "failed", now)

    def advance_all(self) -> None:
        """Bring every batch up to the present (stats() calls this so the bill is current)."""
        with self.host.lock:
            now = time.monotonic()
            for batch in self.batches.values():
                self._advance(batch, now)

    def stats_locked(self) -> dict[str, Any]:
        """The batch part of Simulator.stats(); the caller holds the lock."""
        by_status: dict[str, int] = {}
        for b in self.batches.values():
            by_status[b.status] = by_status.get(b.status, 0) + 1
        return {
            "batches": by_status,
            "batch_lines_processed": sum(b.processed for b in self.batches.values()),
            "files": len(self.files),
        }

    # ---- request plumbing ------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> None:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key:
            raise _Refused(401, "1001", "Authentication parameter not received in Header, unable to authenticate")
        keys = self.host.config.api_keys
        if keys is not None and key not in keys:
            raise _Refused(401, "401", "token expired or incorrect")

    @staticmethod
    def _refusal(err: _Refused) -> web.Response:
        return web.json_response({"error": {"code": err.code, "message": err.message}}, status=err.status)

    # ---- tokenizer and online chat completions ----------------------------------------------------

    async def _tokenizer(self, request: web.Request) -> web.Response:
        """Zhipu's native token counter: the same count /v1/messages would report, and no answer."""
        if not request.headers.get("authorization", "").removeprefix("Bearer "):
            return self._refusal(_Refused(401, "1001", "Authentication parameter not received in Header"))
        body = await request.json()
        ask = ask_from_chat({**body, "messages": body.get("messages", [])}, 1)
        tokens = count_tokens(ask.prompt, self.host.config.token_scale)
        self.host.count("tokenizer")
        return web.json_response({"id": "tok", "created": 0, "request_id": "tok", "usage": {"prompt_tokens": tokens}})

    async def _chat(self, request: web.Request) -> web.Response:
        """Online native chat completions (non-streaming): the same answer, billed as "online".
        No faults and no concurrency cap here: those live on /v1/messages."""
        try:
            self._auth(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _Refused(400, "1210", "Invalid JSON body") from exc
            problem = _line_problem(body, None, self.host.config.token_scale)
            if problem is not None:
                raise _Refused(*problem)
        except _Refused as err:
            self.host.count(f"native_{err.status}_{err.code}")
            return self._refusal(err)
        ask = ask_from_chat(body, catalog.models()[body["model"]].max_output)
        reply = self.host.reply(ask)
        completion = chat_completion(reply, ask.model, self.host.new_id(""), int(time.time()))
        await self.host.generate(self.host.delay(), "online", prompt_key(ask.prompt), reply)
        self.host.count("native_ok")
        return web.json_response(completion, headers={"x-request-id": completion["id"]})

    # ---- files -----------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        cfg = self.host.config
        try:
            self._auth(request)
            form = await request.post()
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose != "batch":
                raise _Refused(400, "1214", "purpose must be batch")
            if not isinstance(upload, web.FileField):
                raise _Refused(400, "1214", "file is required (multipart field 'file')")
            data = upload.file.read()
            if len(data) > cfg.batch_max_bytes:
                raise _Refused(400, "1214", f"file is {len(data)} bytes; at most {cfg.batch_max_bytes} allowed")
            lines = [ln for ln in data.split(b"\n") if ln.strip()]
            if not lines:
                raise _Refused(400, "1214", "file is empty")
            if len(lines) > cfg.batch_max_lines:
                raise _Refused(400, "1214", f"file has {len(lines)} lines; at most {cfg.batch_max_lines} allowed")
            if cfg.batch_check_on_upload:
                problem = _file_problem(lines)
                if problem is not None:
                    raise _Refused(400, "1214", problem)
        except _Refused as err:
            self.host.count(f"upload_{err.status}_{err.code}")
            return self._refusal(err)
        file = _File(self.host.new_id("file-"), upload.filename, "batch", data, int(time.time()))
        with self.host.lock:
            self.files[file.id] = file
        self.host.count("file_uploaded")
        return web.json_response(_file_json(file))

    def _file(self, request: web.Request) -> _File:
        self._auth(request)
        file = self.files.get(request.match_info["id"])
        if file is None:
            raise _Refused(404, "404", f"file {request.match_info['id']} not found")
        return file

    async def _file_info(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(_file_json(self._file(request)))
        except _Refused as err:
            return self._refusal(err)

    async def _file_delete(self, request: web.Request) -> web.Response:
        try:
            file = self._file(request)
        except _Refused as err:
            return self._refusal(err)
        with self.host.lock:
            self.files.pop(file.id, None)
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.Response:
        self.advance_all()
        try:
            file = self._file(request)
            if time.monotonic() < file.ready_at:  # a result file not yet readable right after the batch ended
                self.host.count("file_not_ready_404")
                raise _Refused(404, "404", f"file {file.id} not found")
        except _Refused as err:
            return self._refusal(err)
        return web.Response(body=file.data, content_type="application/jsonl")

    # ---- batches ---------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        cfg = self.host.config
        try:
            self._auth(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _Refused(400, "1210", "Invalid JSON body") from exc
            file = self.files.get(body.get("input_file_id", ""))
            if file is None or file.purpose != "batch":
                raise _Refused(
                    400, "1214", f"input_file_id {body.get('input_file_id')!r} is not an uploaded batch file"
                )
            if body.get("endpoint") not in BATCH_ENDPOINTS:
                raise _Refused(400, "1214", f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
            metadata = body.get("metadata")
            if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16):
                raise _Refused(400, "1214", "metadata must be an object of at most 16 keys")
            lines, model, invalid = _parse_file(file.data)
            if model is not None and cfg.batch_refuse_ineligible and not _eligible(model):
                raise _Refused(400, "1212", f"model {model} is not available for the Batch API")
            with self.host.lock:
                now = time.monotonic()
                for other in self.batches.values():
                    self._advance(other, now)
                queued = sum(len(b.lines) for b in self.batches.values() if b.model == model and b.status in ACTIVE)
                if cfg.batch_queue_cap is not None and queued + len(lines) > cfg.batch_queue_cap:
                    raise _Refused(
                        400,
                        "1210",
                        f"batch queue full for {model}: {queued} requests queued, {len(lines)} more would "
                        f"exceed the cap of {cfg.batch_queue_cap}",
                    )
                batch = _Batch(
                    id=self.host.new_id("batch_"),
                    input_file_id=file.id,
                    endpoint=body["endpoint"],
                    metadata=metadata,
                    model=model,
                    auto_delete=bool(body.get("auto_delete_input_file", False)),
                    lines=lines,
                    created=now,
                    wall=time.time(),
                    invalid=invalid,
                )
                batch.times["validating"] = now
                self.batches[batch.id] = batch
                self._advance(batch, now)
                payload = self._batch_json(batch)
        except _Refused as err:
            self.host.count(f"batch_create_{err.status}_{err.code}")
            return self._refusal(err)
        self.host.count("batch_created")
        return web.json_response(payload)

    def _get(self, request: web.Request) -> _Batch:
        self._auth(request)
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise _Refused(404, "404", f"batch {request.match_info['id']} not found")
        return batch

    async def _retrieve(self, request: web.Request) -> web.Response:
        try:
            batch = self._get(request)
        except _Refused as err:
            return self._refusal(err)
        with self.host.lock:
            self._advance(batch, time.monotonic())
            return web.json_response(self._batch_json(batch))

    async def _list(self, request: web.Request) -> web.Response:
        """Newest first, like OpenAI: `after` is the last id of the previous page."""
        try:
            self._auth(request)
            try:
                limit = int(request.query.get("limit", "20"))
            except ValueError as exc:
                raise _Refused(400, "1214", "limit must be an integer") from exc
            if not 1 <= limit <= 100:
                raise _Refused(400, "1214", "limit must be between 1 and 100")
            newest = list(reversed(self.batches))
            after = request.query.get("after")
            if after:
                if after not in self.batches:
                    raise _Refused(400, "1214", f"after: batch {after} not found")
                newest = newest[newest.index(after) + 1 :]
        except _Refused as err:
            return self._refusal(err)
        with self.host.lock:
            now = time.monotonic()
            page = [self.batches[i] for i in newest[:limit]]
            for b in page:
                self._advance(b, now)
            data = [self._batch_json(b) for b in page]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(newest) > limit,
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        try:
            batch = self._get(request)
            with self.host.lock:
                now = time.monotonic()
                self._advance(batch, now)
                if batch.status not in ("validating", "in_progress"):
                    raise _Refused(400, "1214", f"batch {batch.id} is {batch.status} and cannot be cancelled")
                batch.status, batch.stop_at = "cancelling", now
                batch.times["cancelling"] = now
                self._advance(batch, now)
                payload = self._batch_json(batch)
        except _Refused as err:
            return self._refusal(err)
        self.host.count("batch_cancel")
        return web.json_response(payload)

    # ---- the life of a batch (caller holds the lock) ---------------------------------------------

    def _advance(self, b: _Batch, now: float) -> None:
        """Move a batch through every phase whose time has come, processing the lines now due."""
        cfg = self.host.config
        if b.status == "validating":
            at = b.created + cfg.batch_validating_s
            if now < at:
                return
            if b.invalid is not None:
                self._end(b, "failed", at)
                return
            b.status, b.started = "in_progress", at
            b.times["in_progress"] = at
        if b.status == "in_progress":
            assert b.started is not None
            rate = cfg.batch_lines_per_s
            expire_at = b.started + cfg.batch_expire_after_s if cfg.batch_expire_after_s is not None else math.inf
            until = min(now, expire_at)
            due = len(b.lines) if not rate else min(len(b.lines), _lines_by(until - b.started, rate))
            self._process(b, due)
            if b.processed == len(b.lines):
                done = b.started + (len(b.lines) / rate if rate else 0.0)
                b.status = "finalizing"
                b.times["finalizing"] = min(done, now)
            elif now >= expire_at:
                self._end(b, "expired", expire_at)
                return
        if b.status == "finalizing":
            at = b.times["finalizing"] + cfg.batch_finalizing_s
            if now >= at:
                self._end(b, "completed", at)
        if b.status == "cancelling":
            assert b.stop_at is not None
            if b.started is not None and cfg.batch_lines_per_s:
                self._process(b, min(len(b.lines), _lines_by(b.stop_at - b.started, cfg.batch_lines_per_s)))
            elif b.started is not None:
                self._process(b, len(b.lines))
            at = b.stop_at + cfg.batch_cancelling_s
            if now >= at:
                self._end(b, "cancelled", at)

    def _process(self, b: _Batch, due: int) -> None:
        """Answer lines up to `due`: a success is billed as "batch"; errors are not billed."""
        cfg = self.host.config
        while b.processed < due:
            custom_id, body = b.lines[b.processed]
            b.processed += 1
            request_id = self.host.new_id("")
            line_id = f"batch_req_{request_id}"
            problem = _line_problem(body, b.model, cfg.token_scale)
            if problem is not None:
                status, code, message = problem
                response = {
                    "status_code": status,
                    "request_id": request_id,
                    "body": {"error": {"code": code, "message": message}},
                }
                b.errors.append(_dump({"id": line_id, "custom_id": custom_id, "response": response, "error": None}))
                b.failed += 1
                continue
            ask = ask_from_chat(body, catalog.models()[body["model"]].max_output)
            key = prompt_key(ask.prompt)
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            draw = share(f"batch-error{attempt}{custom_id}{ask.prompt}")
            if draw < cfg.batch_error_rate:
                status, error = _TRANSIENT[int(draw * 1e6) % 2]
                response = {"status_code": status, "request_id": request_id, "body": error}
                b.errors.append(_dump({"id": line_id, "custom_id": custom_id, "response": response, "error": None}))
                b.failed += 1
                continue
            reply = self.host.reply(ask)
            self.host.bill_locked("batch", key, reply)
            completion = chat_completion(reply, ask.model, request_id, int(time.time()))
            response = {"status_code": 200, "request_id": request_id, "body": completion}
            b.outputs.append(_dump({"id": line_id, "custom_id": custom_id, "response": response, "error": None}))
            b.completed += 1

    def _end(self, b: _Batch, status: str, at: float) -> None:
        """Finish a batch: write its result files (lines shuffled, as Zhipu promises no order)."""
        b.status = status
        b.times[status] = at
        if status == "failed":
            return
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        if code is not None:
            for custom_id, _ in b.lines[b.processed :]:
                error = {"code": code, "message": f"The request was not processed before the batch was {status}."}
                b.errors.append(
                    _dump(
                        {
                            "id": f"batch_req_{self.host.new_id('')}",
                            "custom_id": custom_id,
                            "response": None,
                            "error": error,
                        }
                    )
                )
        shuffle = random.Random(f"{self.host.config.seed}{b.id}")
        ready = at + self.host.config.batch_output_404_s
        for lines, kind in ((b.outputs, "output"), (b.errors, "error")):
            if not lines:
                continue
            shuffled = list(lines)
            shuffle.shuffle(shuffled)
            data = ("\n".join(shuffled) + "\n").encode()
            file = _File(
                self.host.new_id("file-"), f"{b.id}_{kind}.jsonl", f"batch_{kind}", data, int(time.time()), ready
            )
            self.files[file.id] = file
            if kind == "output":
                b.output_file_id = file.id
            else:
                b.error_file_id = file.id
        if b.auto_delete and status == "completed":
            self.files.pop(b.input_file_id, None)

    def _batch_json(self, b: _Batch) -> dict[str, Any]:
        def epoch(status: str) -> int | None:
            t = b.times.get(status)
            return None if t is None else int(b.wall + (t - b.created))

        errors = None
        if b.status == "failed":
            errors = {"object": "list", "data": [{"code": "invalid_file", "message": b.invalid, "line": None}]}
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": errors,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": epoch("validating"),
            "in_progress_at": epoch("in_progress"),
            "expires_at": int(b.wall + 7 * 86400),
            "finalizing_at": epoch("finalizing"),
            "completed_at": epoch("completed"),
            "failed_at": epoch("failed"),
            "expired_at": epoch("expired"),
            "cancelling_at": epoch("cancelling"),
            "cancelled_at": epoch("cancelled"),
            "request_counts": {"total": len(b.lines), "completed": b.completed, "failed": b.failed},
            "metadata": b.metadata,
        }


def _lines_by(seconds: float, rate: float) -> int:
    """Lines processed in `seconds` at `rate` a second (0.3 s at 20/s is 6, not 5.999...)."""
    return int(seconds * rate + 1e-9)


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False)


def _file_json(file: _File) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": len(file.data),
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
    }


def _eligible(model: str) -> bool:
    """Whether the catalogue lets a model into the Batch API: its `batch` field when it has one
    (the field may not exist yet: then every known model is accepted)."""
    info = catalog.models().get(model)
    return info is not None and getattr(info, "batch", True) is not False


def _line_problem(body: Any, model: str | None, scale: float) -> tuple[int, str, str] | None:
    """Why a chat completions body would be refused (status, code, message), or None."""
    if not isinstance(body, dict):
        return 400, "1214", "body must be a JSON object"
    name = body.get("model")
    if name not in catalog.models():
        return 400, "1211", "Unknown Model, please check the model code."
    if model is not None and name != model:
        return 400, "1214", f"model {name} differs from the file's model {model}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return 400, "1214", "messages must be a non-empty list of objects"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return 400, "1214", "max_tokens must be a positive integer"
    ask = ask_from_chat(body, 1)
    if count_tokens(ask.prompt, scale) > catalog.models()[name].context:
        return 400, "1261", "Prompt too long"
    return None


def _parse_file(data: bytes) -> tuple[list[tuple[str, Any]], str | None, str | None]:
    """A batch file's lines (custom_id, body), its model, and why validation fails (None if it passes).
    Bodies are not checked here: a bad body fails its own line, not the batch."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    problem = _file_problem(lines)
    parsed: list[tuple[str, Any]] = []
    model = None
    for raw in lines:
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(line, dict):
            parsed.append((str(line.get("custom_id")), line.get("body")))
            body = line.get("body")
            if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
    return parsed, model, problem


def _file_problem(lines: list[bytes]) -> str | None:
    """What makes a whole batch file invalid: bad JSON, a malformed line, a duplicate custom_id, more
    than one model, an unknown model. None when the file is valid."""
    seen: set[str] = set()
    models: set[str] = set()
    for number, raw in enumerate(lines, 1):
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"line {number}: not valid JSON"
        if not isinstance(line, dict):
            return f"line {number}: not a JSON object"
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return f"line {number}: custom_id must be a non-empty string"
        if custom_id in seen:
            return f"line {number}: duplicate custom_id {custom_id!r}"
        seen.add(custom_id)
        if line.get("method") != "POST":
            return f"line {number}: method must be POST"
        if line.get("url") != LINE_URL:
            return f"line {number}: url must be {LINE_URL}"
        body = line.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return f"line {number}: body must be an object with a model"
        if body["model"] not in catalog.models():
            return f"line {number}: Unknown Model {body['model']!r}"
        models.add(body["model"])
        if len(models) > 1:
            return f"line {number}: a file may hold one model; found {', '.join(sorted(models))}"
    return None
