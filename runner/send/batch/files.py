"""Batch input files: requests streamed into JSONL files that fit Zhipu's per-file limits.

    files = write_batch_files(((r.key, chat_body(r.params)) for r in requests), directory)
    with BatchFileWriter(directory) as writer:             # or a line at a time
        writer.add(request.key, chat_body(request.params))

One model per file, at most `max_requests` lines and `max_bytes`; written as `.part` and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from runner.control import Control
from runner.files import fsync_rename
from runner.job import catalog
from runner.job.spec import BatchSpec
from runner.records import Request
from runner.send.batch.book import BatchBook, Chunk
from runner.send.batch.native_request import chat_body

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_REQUESTS",
    "BatchFile",
    "BatchFileWriter",
    "LineTooLarge",
    "write_batch_files",
    "write_round",
]

DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 95 * 1024 * 1024
PART_SUFFIX = ".part"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class LineTooLarge(ValueError):
    """One request's line is bigger than a batch file may hold: no file can take it."""


@dataclass(frozen=True, slots=True)
class BatchFile:
    """One finished input file: where it is, what is in it."""

    path: Path
    lines: int
    size: int  # bytes
    model: str
    custom_ids: tuple[str, ...]  # in file order
    digest: str = ""  # sha256 of its bytes, hex


@dataclass(slots=True)
class _Open:
    """A file being written for one model."""

    part: Path
    final: Path
    handle: Any  # a binary file object
    model: str
    lines: int = 0
    size: int = 0
    custom_ids: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)


class BatchFileWriter:
    """Writes (custom_id, body) pairs into as many JSONL files as the limits require, per model.

    Use it as a context manager: a clean exit finishes every open file; an exception removes the
    unfinished `.part` files (finished files stay: each is whole). `files` lists the finished files in
    the order they were finished.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        url: str = "/v4/chat/completions",
        prefix: str = "batch",
        queue_caps: Mapping[str, int] | None = None,
    ) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests and max_bytes must be at least 1")
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._url = url
        self._prefix = prefix
        self._queue_caps = dict(queue_caps or {})  # model -> its batch queue cap: a file never holds more
        self._open: dict[str, _Open] = {}
        self._sequence: dict[str, int] = {}
        self._seen: set[str] = set()  # custom_ids must be unique within a file; we keep them unique overall
        self.files: list[BatchFile] = []

    def add(self, custom_id: str, body: Mapping[str, Any]) -> None:
        """Write one request line to its model's current file, starting a new file when it is full.

        A model's file holds at most `max_requests` lines, and never more than the model's queue cap
        (`queue_caps`): a file bigger than the queue could never be created. Raises ValueError for a body
        without a model or a repeated custom_id, and LineTooLarge for a line that alone is larger than
        `max_bytes` (nothing is written).
        """
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"request {custom_id}: the body names no model")
        if not custom_id:
            raise ValueError("a request needs a non-empty custom_id")
        if custom_id in self._seen:
            raise ValueError(f"request {custom_id}: custom_id given twice")
        line = _json_line({"custom_id": custom_id, "method": "POST", "url": self._url, "body": body})
        if len(line) > self._max_bytes:
            raise LineTooLarge(f"its batch line is {len(line):,} bytes, more than a batch file may hold")
        current = self._open.get(model)
        most = min(self._max_requests, self._queue_caps.get(model, self._max_requests))
        if current is not None and (current.lines >= most or current.size + len(line) > self._max_bytes):
            self._finish(current)
            current = None
        if current is None:
            current = self._start(model)
        current.handle.write(line)
        current.digest.update(line)
        current.lines += 1
        current.size += len(line)
        current.custom_ids.append(custom_id)
        self._seen.add(custom_id)

    def close(self) -> list[BatchFile]:
        """Finish every open file; return all finished files."""
        for current in list(self._open.values()):
            self._finish(current)
        return self.files

    def abort(self) -> None:
        """Close and remove every unfinished file (finished ones are whole and stay)."""
        for current in list(self._open.values()):
            current.handle.close()
            current.part.unlink(missing_ok=True)
        self._open.clear()

    def __enter__(self) -> BatchFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self, model: str) -> _Open:
        sequence = self._sequence.get(model, 0) + 1
        self._sequence[model] = sequence
        final = self._dir / f"{self._prefix}-{_UNSAFE.sub('_', model)}-{sequence:04d}.jsonl"
        part = final.with_name(final.name + PART_SUFFIX)
        current = _Open(part=part, final=final, handle=open(part, "wb"), model=model)  # noqa: SIM115
        self._open[model] = current
        return current

    def _finish(self, current: _Open) -> None:
        current.handle.close()
        fsync_rename(current.part, current.final)
        del self._open[current.model]
        self.files.append(
            BatchFile(
                current.final,
                current.lines,
                current.size,
                current.model,
                tuple(current.custom_ids),
                current.digest.hexdigest(),
            )
        )


def _json_line(value: Any) -> bytes:
    """`value` as one compact JSON line in UTF-8, newline included: what json.dumps(ensure_ascii=False,
    separators=(",", ":")) writes, by orjson (a fifth of the time; twice a request). What orjson does not
    take (an integer over 64 bits, a lone surrogate) goes through json as before."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)
    except (orjson.JSONEncodeError, TypeError):
        return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def write_batch_files(
    items: Iterable[tuple[str, Mapping[str, Any]]],
    directory: str | os.PathLike[str],
    *,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    url: str = "/v4/chat/completions",
    prefix: str = "batch",
) -> list[BatchFile]:
    """Stream (custom_id, body) pairs into batch input files; return the files in finishing order."""
    with BatchFileWriter(directory, max_requests=max_requests, max_bytes=max_bytes, url=url, prefix=prefix) as writer:
        for custom_id, body in items:
            writer.add(custom_id, body)
    return writer.files


def queue_caps() -> dict[str, int]:
    """Each model's batch queue cap, where the catalogue knows one (configs/models.yaml `batch.queue_cap`)."""
    return {name: info.batch.queue_cap for name, info in catalog.models().items() if info.batch.queue_cap}


async def write_round(
    book: BatchBook,
    spec: BatchSpec,
    requests: AsyncIterator[Request],
    control: Control,
    refuse: Callable[[Request, str], None] | None = None,
) -> list[Chunk]:
    """Write the requests into a new round's chunk files (and their bodies, by key); record each chunk.
    A request no batch file can hold (LineTooLarge) goes to `refuse` with why, and the round goes on."""
    round_no = book.next_round()
    folder = book.directory / f"round-{round_no:04d}"
    writer = BatchFileWriter(
        folder, max_requests=spec.max_requests, max_bytes=spec.max_bytes, prefix="chunk", queue_caps=queue_caps()
    )
    bodies = folder / "requests.jsonl"
    # Local, buffered writes between awaits: blocking them briefly is cheaper than a thread hop per line.
    with writer, open(bodies, "wb") as keep:  # noqa: ASYNC230
        async for request in requests:
            if control.stopping.is_set():
                break
            try:
                writer.add(request.key, chat_body(request.params))
            except LineTooLarge as exc:
                if refuse is None:
                    raise
                limit = f"run.batch.max_bytes is {spec.max_bytes:,}; the Batch API takes up to 100,000,000"
                refuse(request, f"{exc} ({limit}): raise it, shorten the row's input, or send it with run.mode: online")
                continue
            # The head `{"key": "<key>", ` is what read_requests finds a line by (runner.send.batch.book).
            head = b'{"key": ' + _json_line(request.key)[:-1]
            keep.write(head + b', "params": ' + _json_line(request.params)[:-1] + b"}\n")
    chunks = []
    for index, file in enumerate(writer.files):
        fields = {"path": str(file.path), "requests": str(bodies), "model": file.model, "lines": file.lines}
        fields["digest"] = file.digest
        chunks.append(book.record(f"{folder.name}-{index:04d}", **fields, round=round_no, status="written"))
    return chunks
