"""Batch input files: requests streamed into JSONL files that fit Zhipu's per-file limits (one model per
file, at most `max_requests` lines and `max_bytes`; written as `.part` and renamed), a round at a time."""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import polars as pl

from runner.control import Control
from runner.files import fsync_rename
from runner.job import catalog
from runner.job.spec import BatchSpec
from runner.records import Request
from runner.send.batch.book import BatchBook, Chunk, custom_ids_in
from runner.send.batch.native_request import chat_body

DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 95 * 1024 * 1024
PART_SUFFIX = ".part"
CHAT_URL = "/v4/chat/completions"
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
    seen: set[str] = field(default_factory=set)  # its custom_ids (unique within a file, as the API wants)
    digest: Any = field(default_factory=hashlib.sha256)


class BatchFileWriter:
    """Writes (custom_id, body) pairs into as many JSONL files as the limits require, per model; `files`
    lists the finished ones in order. A clean exit of `with` finishes every open file; an exception
    removes the unfinished `.part` files (finished files stay: each is whole)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        url: str = CHAT_URL,
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
        # custom_ids must be unique within a file (each file's `seen`); we keep them unique overall, checked
        # at `close` by their hashes (8 bytes a line: memory stays flat in the rows).
        self._hashes = array("q")
        self.files: list[BatchFile] = []

    def add(self, custom_id: str, body: Mapping[str, Any]) -> None:
        """Write one request line to its model's current file, starting a new one when it is full: at most
        `max_requests` lines, never more than the model's queue cap (a bigger file could never be created).
        ValueError for a body without a model or a repeated custom_id; LineTooLarge (nothing written) for a
        line past `max_bytes`."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"request {custom_id}: the body names no model")
        self.add_line(
            custom_id, model, _json_line({"custom_id": custom_id, "method": "POST", "url": self._url, "body": body})
        )

    def add_line(self, custom_id: str, model: str, line: bytes) -> None:
        """`add`, given the request's line as `add` would make it (the custom_id first) and its model."""
        if not custom_id:
            raise ValueError("a request needs a non-empty custom_id")
        if len(line) > self._max_bytes:
            raise LineTooLarge(f"its batch line is {len(line):,} bytes, more than a batch file may hold")
        current = self._open.get(model)
        most = min(self._max_requests, self._queue_caps.get(model, self._max_requests))
        if current is not None and (current.lines >= most or current.size + len(line) > self._max_bytes):
            self._finish(current)
            current = None
        if current is None:
            current = self._start(model)
        if custom_id in current.seen:
            raise ValueError(f"request {custom_id}: custom_id given twice")
        current.handle.write(line)
        current.digest.update(line)
        current.lines += 1
        current.size += len(line)
        current.seen.add(custom_id)
        self._hashes.append(hash(custom_id))

    def close(self) -> list[BatchFile]:
        """Finish every open file; return all finished files. Raises ValueError for a custom_id given twice
        (in two files: within one, `add` refuses it)."""
        for current in list(self._open.values()):
            self._finish(current)
        hashes = pl.Series("hash", self._hashes, dtype=pl.Int64).sort()  # (is_duplicated holds ~10x more)
        shared = hashes.filter(hashes == hashes.shift(1))
        if len(shared):  # maybe twice (or two ids of one hash): the files say which
            suspects, seen = set(shared.to_list()), set()
            for file in self.files:
                for custom_id in custom_ids_in(file.path):
                    if hash(custom_id) not in suspects:
                        continue
                    if custom_id in seen:
                        raise ValueError(f"request {custom_id}: custom_id given twice")
                    seen.add(custom_id)
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
            BatchFile(current.final, current.lines, current.size, current.model, current.digest.hexdigest())
        )


def _json_line(value: Any) -> bytes:
    """`value` as one compact JSON line in UTF-8, newline included: what json.dumps(ensure_ascii=False,
    separators=(",", ":")) writes, by orjson (a fifth of the time; twice a request). What orjson does not
    take (an integer over 64 bits, a lone surrogate) goes through json as before."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)
    except (orjson.JSONEncodeError, TypeError):
        return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


_KEY, _TEXT = "\u0000glm-batch key\u0000", "\u0000glm-batch text\u0000"  # stand-ins in a shape's lines
_MOST_SHAPES = 64  # more distinct shapes than this in a round: the rows differ in more than the text


class _Shapes:
    """The batch line and the kept body line of requests that differ only in their key and in the text
    of their one user turn (a template over rows): made once per shape by the row path itself (chat_body,
    _json_line) with stand-ins for key and text, then filled in for each request. The bytes are the row
    path's: each line is that encoding of one object, whose two strings are encoded on their own.
    A request of any other form, or one whose key or text orjson does not take, goes the row path."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._known: dict[bytes, tuple[str, list[bytes], list[bytes]] | None] = {}

    def lines(self, request: Request) -> tuple[str, bytes, bytes] | None:
        """The request's model, batch line and kept body line; None where the row path makes them."""
        params, known = request.params, self._known
        messages = params.get("messages")
        if type(messages) is not list or len(messages) != 1 or len(known) > _MOST_SHAPES:
            return None
        turn = messages[0]
        if (
            type(turn) is not dict
            or len(turn) != 2
            or turn.get("role") != "user"
            or type(turn.get("content")) is not str
        ):
            return None
        try:
            shape = orjson.dumps({**params, "messages": next(iter(turn))})  # all but the text, and the turn's order
            key, text = orjson.dumps(request.key), orjson.dumps(turn["content"])
        except (orjson.JSONEncodeError, TypeError):
            return None
        made = known[shape] if shape in known else known.setdefault(shape, self._shape(params, turn))
        if made is None:
            return None
        model, line, body = made
        return model, key.join((line[0], text.join(line[1:]))), key.join((body[0], text.join(body[1:])))

    def _shape(self, params: dict[str, Any], turn: dict[str, Any]) -> tuple[str, list[bytes], list[bytes]] | None:
        """A shape's two lines cut where the key and the text go; None when the row path must make them."""
        proto = {**params, "messages": [{name: _TEXT if name == "content" else value for name, value in turn.items()}]}
        model = params.get("model")
        try:
            batch = {"custom_id": _KEY, "method": "POST", "url": self._url, "body": chat_body(proto)}
            kept = b'{"key": ' + orjson.dumps(_KEY) + b', "params": ' + orjson.dumps(proto) + b"}\n"  # as _kept
            lines = orjson.dumps(batch, option=orjson.OPT_APPEND_NEWLINE), kept
        except (orjson.JSONEncodeError, TypeError, ValueError):
            return None  # orjson does not take it (json does) or chat_body refuses it: the row path says so
        key, text = orjson.dumps(_KEY), orjson.dumps(_TEXT)
        cut = [line.split(key) for line in lines]
        if (
            type(model) is not str
            or not model
            or any(len(c) != 2 or c[1].count(text) != 1 or text in c[0] for c in cut)
        ):
            return None
        return model, [cut[0][0], *cut[0][1].split(text)], [cut[1][0], *cut[1][1].split(text)]


def _kept(key: str, params: dict[str, Any]) -> bytes:
    """A request's line in the round's requests file. Its head `{"key": "<key>", ` is what read_requests
    finds a line by (runner.send.batch.book)."""
    return b'{"key": ' + _json_line(key)[:-1] + b', "params": ' + _json_line(params)[:-1] + b"}\n"


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
    shapes = _Shapes(CHAT_URL)
    # Local, buffered writes between awaits: blocking them briefly is cheaper than a thread hop per line.
    with writer, open(bodies, "wb") as keep:  # noqa: ASYNC230
        async for request in requests:
            if control.stopping.is_set():
                break
            made = shapes.lines(request)
            try:
                if made is None:
                    writer.add(request.key, chat_body(request.params))
                    kept = _kept(request.key, request.params)
                else:
                    writer.add_line(request.key, made[0], made[1])
                    kept = made[2]
            except LineTooLarge as exc:
                if refuse is None:
                    raise
                limit = f"run.batch.max_bytes is {spec.max_bytes:,}; the Batch API takes up to 100,000,000"
                refuse(request, f"{exc} ({limit}): raise it, shorten the row's input, or send it with run.mode: online")
                continue
            keep.write(kept)
    chunks = []
    for index, file in enumerate(writer.files):
        fields = {"path": str(file.path), "requests": str(bodies), "model": file.model, "lines": file.lines}
        fields["digest"] = file.digest
        chunks.append(book.record(f"{folder.name}-{index:04d}", **fields, round=round_no, status="written"))
    return chunks
