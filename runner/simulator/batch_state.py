"""The simulated Batch API's state: files, batches, and a batch's life computed from the clock when it
is looked at (validating, in_progress at `batch_lines_per_s`, finalizing, completed; or failed, expired,
cancelled). Each line is answered by `Simulator.reply` and billed once, as "batch"."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from runner.simulator.answers import chat_completion, prompt_key, share
from runner.simulator.batch_input import checked_ask
from runner.simulator.host import Host

__all__ = ["ACTIVE", "NativeState", "SimBatch", "SimFile"]

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_TRANSIENT = (
    (500, {"error": {"code": "500", "message": "Internal Error"}}),
    (429, {"error": {"code": "1302", "message": "您的账户已达到速率限制，请您控制请求频率"}}),
)


@dataclass
class SimFile:
    """A file the simulator holds: an uploaded batch input, or a batch's output or error file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    ready_at: float = 0.0  # monotonic time before which its content answers 404 (a result file's quirk)
    downloads: int = 0  # times its content was served


@dataclass
class SimBatch:
    """A batch as the simulator tracks it: its lines, its phase, and what it has produced so far."""

    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, Any] | None
    model: str | None
    auto_delete: bool
    lines: list[tuple[str, Any]]  # (custom_id, body) in file order; emptied when the batch ends
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
    looks: int = 0  # GET /batches/{id} answered
    id_lag: int = 0  # looks left for which a completed batch still shows no output file id
    validation_errors: list[dict[str, Any]] = field(default_factory=list)  # errors.data of a failed batch
    total: int = 0  # lines in the file (kept when `lines` is let go)


class NativeState:
    """The files and batches of one Simulator's native API, and the on-demand controls tests use."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}  # in creation order
        self._attempts: dict[str, int] = {}  # prompt hash -> batch lines seen (a retry draws anew)
        self._failed_by_config = 0  # batches failed at validation by `batch_fail_validation`
        self._forgotten: set[str] = set()  # ids of the batches forgotten by `batch_forget_after_looks`
        self.late_creates = 0  # creates held by `batch_create_lands_after_s` so far
        self.landing: set[asyncio.Future[Any]] = set()  # late creates still to land (they outlive their client)

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
                batch.validation_errors = _errors_data(message)
                self._end(batch, "failed", now)

    def forgets(self, batch: SimBatch) -> bool:
        """Count a look at a batch; past `batch_forget_after_looks` (for the first `batch_forget_times`
        batches) it is forgotten (True), as a purged or deleted batch is: every later look answers 404."""
        cfg = self.host.config
        with self.host.lock:
            batch.looks += 1
            if cfg.batch_forget_after_looks is None or batch.looks <= cfg.batch_forget_after_looks:
                return False
            if len(self._forgotten) >= cfg.batch_forget_times and batch.id not in self._forgotten:
                return False
            self._advance(batch, time.monotonic())
            self._forgotten.add(batch.id)
            del self.batches[batch.id]
        self.host.count("batch_forgotten")
        return True

    def new_file_id(self) -> str:
        """A file id shaped like Zhipu's: `<epoch seconds>_<32 hex digits>`."""
        return f"{int(time.time())}_{self.host.rng.getrandbits(128):032x}"

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

    # ---- the life of a batch (caller holds the lock) ---------------------------------------------

    def _advance(self, b: SimBatch, now: float) -> None:
        """Move a batch through every phase whose time has come, processing the lines now due."""
        cfg = self.host.config
        if b.status == "validating":
            at = b.created + cfg.batch_validating_s
            if now < at:
                return
            configured = cfg.batch_fail_validation
            times = cfg.batch_fail_validation_times
            if b.invalid is None and configured and (times is None or self._failed_by_config < times):
                self._failed_by_config += 1
                b.invalid = "; ".join(str(e.get("message")) for e in configured)
                b.validation_errors = [dict(e) for e in configured]
            if b.invalid is not None:
                b.validation_errors = b.validation_errors or _errors_data(b.invalid)
                self._end(b, "failed", at)
                return
            b.status, b.started = "in_progress", at
            b.times["in_progress"] = at
        if b.status == "in_progress":
            assert b.started is not None
            rate = cfg.batch_lines_per_s
            expire_at = b.started + cfg.batch_expire_after_s if cfg.batch_expire_after_s is not None else math.inf
            until = min(now, expire_at)
            self._process(b, _due(b.total, until - b.started, rate))
            if b.processed == b.total:
                done = b.started + (b.total / rate if rate else 0.0)
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
            if b.started is not None:
                self._process(b, _due(b.total, b.stop_at - b.started, cfg.batch_lines_per_s))
            at = b.stop_at + cfg.batch_cancelling_s
            if now >= at:
                self._end(b, "cancelled", at)

    def _process(self, b: SimBatch, due: int) -> None:
        """Answer lines up to `due`: a success is billed as "batch"; errors are not billed. Each body is
        checked and answered from one Ask, and let go once answered (a million-line run holds none)."""
        cfg = self.host.config
        lines = b.lines
        while b.processed < due:
            custom_id, body = lines[b.processed]
            lines[b.processed] = (custom_id, None)  # answered: its body is not needed again
            b.processed += 1
            request_id = self.host.new_id("")
            line_id = b.id  # real result lines carry the batch's id, and request_id inside the body
            ask = checked_ask(body, b.model, cfg.token_scale)
            if isinstance(ask, tuple):
                status, code, message = ask
                error_body = {"error": {"code": code, "message": message}, "request_id": request_id}
                b.errors.append(_result_line(line_id, custom_id, {"status_code": status, "body": error_body}))
                b.failed += 1
                continue
            prompt = ask.prompt
            key = prompt_key(prompt)
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            draw = share(f"batch-error{attempt}{custom_id}{prompt}")
            if draw < cfg.batch_error_rate:
                status, error = _TRANSIENT[int(draw * 1e6) % 2]
                if cfg.batch_error_line_shape == "error":
                    said = {"code": str(status), "message": error["error"]["message"]}
                    b.errors.append(_result_line(line_id, custom_id, None, said))
                else:
                    response = {"status_code": status, "body": {**error, "request_id": request_id}}
                    b.errors.append(_result_line(line_id, custom_id, response))
                b.failed += 1
                continue
            reply = self.host.reply(ask)
            self.host.bill("batch", key, reply)
            completion = chat_completion(reply, ask.model, request_id, int(time.time()))
            cut = share(f"batch-finish{attempt}{custom_id}{prompt}")
            if cut < cfg.batch_network_error_rate:  # inference aborted: a partial answer, billed
                _finish(completion, "network_error")
            elif cut < cfg.batch_network_error_rate + cfg.batch_sensitive_rate:  # blocked: empty, billed
                _finish(completion, "sensitive")
            if share(f"batch-usage{attempt}{custom_id}{prompt}") < cfg.batch_usage_missing_rate:
                del completion["usage"]  # billed all the same
            b.outputs.append(_result_line(line_id, custom_id, {"status_code": 200, "body": completion}))
            b.completed += 1

    def _end(self, b: SimBatch, status: str, at: float) -> None:
        """Finish a batch: write its result files (lines shuffled, as Zhipu promises no order)."""
        b.status = status
        b.times[status] = at
        if status == "failed":
            b.lines = []  # never processed; `total` keeps the count
            return
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        if code is not None:
            for custom_id, _ in b.lines[b.processed :]:
                error = {"code": code, "message": f"The request was not processed before the batch was {status}."}
                b.errors.append(_result_line(f"batch_req_{self.host.new_id('')}", custom_id, None, error))
        b.lines = []  # the batch has ended: its lines are answered or expired (`total` keeps the count)
        shuffle = random.Random(f"{self.host.config.seed}{b.id}")
        ready = at + self.host.config.batch_output_404_s
        for lines, kind in ((b.outputs, "output"), (b.errors, "error")):
            if not lines:
                continue
            shuffled = list(lines)
            shuffle.shuffle(shuffled)
            data = ("\n".join(shuffled) + "\n").encode()
            file = SimFile(self.new_file_id(), f"{b.id}_{kind}.jsonl", f"batch_{kind}", data, _ms(time.time()), ready)
            self.files[file.id] = file
            if kind == "output":
                b.output_file_id = file.id
            else:
                b.error_file_id = file.id
        b.outputs, b.errors = [], []  # they are in the files now
        if status == "completed":
            b.id_lag = self.host.config.batch_output_id_lag_polls
        if b.auto_delete and status == "completed":
            self.files.pop(b.input_file_id, None)

    def _batch_json(self, b: SimBatch) -> dict[str, Any]:
        """The batch as the real API shows it: millisecond timestamps, `""` for a file that does not
        exist (yet), counts of nulls while validating. A look at a completed batch with `id_lag` left
        shows no output file id yet, and uses one up."""

        unit = 1 if self.host.config.batch_timestamps == "ms" else 1000

        def epoch(status: str) -> int | None:
            t = b.times.get(status)
            return None if t is None else _ms(b.wall + (t - b.created)) // unit

        errors = None
        if b.status == "failed":
            errors = {"object": "list", "data": b.validation_errors}
        output_file_id = b.output_file_id or ""
        if b.status == "completed" and b.id_lag > 0:
            b.id_lag -= 1
            output_file_id = ""
        counts: dict[str, int | None] = {"total": b.total, "completed": b.completed, "failed": b.failed}
        if b.status == "validating":
            counts = {"total": None, "completed": None, "failed": None}
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": errors,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": output_file_id,
            "error_file_id": b.error_file_id or "",
            "created_at": epoch("validating"),
            "in_progress_at": epoch("in_progress"),
            "expires_at": _ms(b.wall + 7 * 86400) // unit,
            "finalizing_at": epoch("finalizing"),
            "completed_at": epoch("completed"),
            "failed_at": epoch("failed"),
            "expired_at": epoch("expired"),
            "cancelling_at": epoch("cancelling"),
            "cancelled_at": epoch("cancelled"),
            "request_counts": counts,
            "metadata": b.metadata,
        }


def _due(total: int, seconds: float, rate: float | None) -> int:
    """Lines of `total` processed in `seconds` at `rate` a second (None: all at once; 0.3 s at 20/s is 6,
    not 5.999...)."""
    return min(total, int(seconds * rate + 1e-9)) if rate else total


def _ms(seconds: float) -> int:
    """Epoch milliseconds: the unit real batch objects use (the docs say seconds)."""
    return int(seconds * 1000)


_LINE = re.compile(r"^line (\d+): (.*)$", re.S)


def _errors_data(message: str) -> list[dict[str, Any]]:
    """A validation failure as the real `errors.data`: [{code, line, message, param}]."""
    match = _LINE.match(message)
    line, text = (int(match.group(1)), match.group(2)) if match else (None, message)
    return [{"code": "1214", "line": line, "message": text, "param": None}]


def _finish(completion: dict[str, Any], reason: str) -> None:
    """Turn a whole answer into one cut short (`network_error`: half its text) or blocked (`sensitive`)."""
    choice = completion["choices"][0]
    choice["finish_reason"] = reason
    message = choice["message"]
    text = message.get("content") or ""
    message["content"] = text[: len(text) // 2] if reason == "network_error" else ""
    message.pop("tool_calls", None)


def _result_line(line_id: str, custom_id: str, response: Any, error: Any = None) -> str:
    """One line of a batch's output or error file."""
    line = {"id": line_id, "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False)
