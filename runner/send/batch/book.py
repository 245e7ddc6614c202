"""The batch book (`batches/book.jsonl`): a write-ahead record of every Batch API chunk, so no request is
ever submitted twice. A chunk moves written -> uploaded -> created -> harvested, abandoned or lost
(docs/decisions.md, "The batch book")."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.files import space_checked

if TYPE_CHECKING:  # `status` reads the book and must not load the Batch API's client (tenacity, asyncio)
    from runner.send.batch.shapes import Batch

OPEN = ("written", "uploaded", "created")  # a chunk in one of these has requests not yet harvested


@dataclass(frozen=True)
class Chunk:
    """One input file of the Batch API and how far it got."""

    id: str
    path: str  # the input JSONL file
    requests: str  # the round's requests file (Messages API bodies by key)
    model: str
    lines: int
    round: int
    status: str = "written"
    file_id: str | None = None
    batch_id: str | None = None
    uploaded_at: int | None = None  # epoch ms of the upload (the API's clock when it said)
    batch_status: str | None = None  # the Batch API's status at the last look
    counts: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None  # the result files, once harvested (to delete them)
    error_file_id: str | None = None
    purged: bool = False  # its files at Zhipu deleted
    file_404: bool = False  # a result file answered 404 past the waits once: a second time, it is gone
    unsure: bool = False  # its create may have been made twice (a lost answer): swept for a second batch
    digest: str | None = None  # sha256 of its input file: what a batch made from it is known by (metadata)
    created_ms: int | None = None  # epoch ms (our clock) of its last create: how long a lost one may still land

    def request_keys(self) -> Iterator[str]:
        """The request keys in the chunk (each line's custom_id), read from its file."""
        return custom_ids_in(self.path)


def custom_ids_in(path: str | os.PathLike[str]) -> Iterator[str]:
    """Each line's custom_id in a batch input file, in file order: read off the line's head (written first,
    compact), the line parsed whole only when the key holds an escape (a quote or a backslash)."""
    head = b'{"custom_id":"'
    with open(path, "rb") as f:
        for line in f:
            end = line.find(b'"', len(head))
            key = line[len(head) : end]
            if line.startswith(head) and end > 0 and b"\\" not in key:
                yield key.decode("utf-8")
            else:
                yield str(json.loads(line)["custom_id"])


class BatchBook:
    """The chunks of one job, folded from the append-only book file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "book.jsonl"
        self.chunks: dict[str, Chunk] = {}
        self.strays: dict[str, dict[str, Any]] = {}  # batch id -> a batch of this job no chunk keeps, as handled
        directory.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: the step it recorded did not happen as far as we know
                self._fold(record)

    def _fold(self, record: dict[str, Any]) -> None:
        if "stray" in record:
            self.strays[record["stray"]] = record
            return
        chunk_id = record.pop("chunk")
        known = self.chunks.get(chunk_id)
        if known is None:
            self.chunks[chunk_id] = Chunk(id=chunk_id, **record)
        else:
            self.chunks[chunk_id] = replace(known, **record)

    def record(self, chunk_id: str, **fields: Any) -> Chunk:
        """Append one step for a chunk (fsynced: it is the point of no return) and return the chunk."""
        self._append({"chunk": chunk_id, **fields})
        return self.chunks[chunk_id]

    def created(self, chunk: Chunk, batch: Batch, *, unsure: bool) -> Chunk:
        """Record that `batch` is the chunk's (made by us, or found and adopted); `unsure`: another batch may
        have been made for it too."""
        return self.record(
            chunk.id,
            status="created",
            file_id=batch.input_file_id or chunk.file_id,
            batch_id=batch.id,
            batch_status=batch.status,
            unsure=unsure,
            created_ms=int(time.time() * 1000),
        )

    def record_stray(self, batch_id: str, **fields: Any) -> None:
        """Append what was done with a batch of this job that no chunk keeps (cancelled, or reported)."""
        self._append({"stray": batch_id, **fields})

    def owned(self) -> set[str]:
        """The batch ids the book's chunks keep."""
        return {c.batch_id for c in self.chunks.values() if c.batch_id is not None}

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with space_checked(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._fold(record)

    def open_chunks(self) -> list[Chunk]:
        """Chunks whose requests have not been harvested yet, oldest first."""
        return [c for c in self.chunks.values() if c.status in OPEN]

    def next_round(self) -> int:
        """A round number no chunk uses yet."""
        return max((c.round for c in self.chunks.values()), default=-1) + 1


def read_requests(path: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The Messages API bodies of the `wanted` keys from a round's requests file (each line is
    `{"key": "<key>", "params": ...}`: the key is read off the line's head, and only wanted lines are
    parsed; the read stops once all are found)."""
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    head = len('{"key": "')
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line[head : line.find('"', head)] in wanted:
                record = json.loads(line)
                found[record["key"]] = record["params"]
                if len(found) == len(wanted):
                    break
    return found
