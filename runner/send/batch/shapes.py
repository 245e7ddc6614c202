"""Typed views of the Batch API's objects, read tolerantly: any field but the id may be missing or
malformed; a missing id raises BatchProtocolError."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from runner.send.batch.errors import BatchProtocolError

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


def whole_number(value: Any) -> int | None:
    """A whole number as the wire gave it (an int, an integral float, a digit string), else None; never a bool."""
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
        return cls(*(whole_number(data.get(name)) or 0 for name in ("total", "completed", "failed")))


@dataclass(frozen=True, slots=True)
class BatchError:
    """One validation error of a batch's input file (a bad line, a missing field)."""

    code: str | None
    message: str | None
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as the API reports it: the fields the runner reads; `raw` keeps the whole object."""

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
            BatchError(_str(e.get("code")), _str(e.get("message")), whole_number(e.get("line")), _str(e.get("param")))
            for e in (error_items if isinstance(error_items, list) else [])
            if isinstance(e, Mapping)
        )
        metadata = data.get("metadata")
        read: dict[str, Any] = {f.name: whole_number(data.get(f.name)) for f in fields(cls) if f.name.endswith("_at")}
        read |= {
            name: _str(data.get(name)) for name in ("input_file_id", "output_file_id", "error_file_id", "endpoint")
        }
        return cls(
            id=str(data["id"]),
            status=_str(data.get("status")) or "unknown",
            request_counts=RequestCounts.from_json(data.get("request_counts")),
            metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
            errors=errors,
            raw=dict(data),
            **read,
        )


@dataclass(frozen=True, slots=True)
class BatchPage:
    """One page of the batch list; pass `last_id` as `after` for the next one."""

    data: tuple[Batch, ...]
    has_more: bool
    last_id: str | None = None


@dataclass(frozen=True, slots=True)
class FileObject:
    """An uploaded file as the API reports it: the fields the runner reads; `raw` keeps the whole object."""

    id: str
    bytes: int | None = None
    created_at: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> FileObject:
        """Read a file object; raises BatchProtocolError if it has no id."""
        if not isinstance(data, Mapping) or not _str(data.get("id")):
            raise BatchProtocolError(f"not a file object: {str(data)[:200]}")
        return cls(
            id=str(data["id"]),
            bytes=whole_number(data.get("bytes")),
            created_at=whole_number(data.get("created_at")),
            raw=dict(data),
        )


def page_from_json(data: Any) -> BatchPage:
    """Read a list answer `{"data": [...], "has_more", "first_id", "last_id"}`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise BatchProtocolError(f"not a batch list: {str(data)[:200]}")
    batches = tuple(Batch.from_json(item) for item in data["data"])
    return BatchPage(
        data=batches,
        has_more=bool(data.get("has_more")),
        last_id=_str(data.get("last_id")),
    )
