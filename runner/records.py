"""The records that flow through a run: a Request goes out, an Answer comes back (from any wire),
and a Result is stored.

RESULT_SCHEMA is the stored and output form of a Result; every part file and the final output use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import polars as pl

KEY = "key"  # the request key column: what identifies an answer in every store file


@dataclass(frozen=True, slots=True)
class Request:
    """One request to send: its identity key and the keyword arguments for `messages.create`."""

    key: str
    params: dict[str, Any]


# Answer and Result are made once or twice per answer, on the path that bounds a run's rows per second,
# and a frozen dataclass's __init__ costs ~4x a plain one's (every field through object.__setattr__):
# so they are plain slotted dataclasses. Treat them as values all the same: make a new one
# (`priced`, dataclasses.replace), never assign to a field.
@dataclass(slots=True)
class Answer:
    """A model's answer, whatever wire brought it: the parts a run keeps.

    `content` holds the answer's blocks in Messages API request form, so a repair turn can continue
    the conversation; a transport with another wire (the Batch API's chat completions) fills it the
    same way."""

    text: str
    thinking: str | None
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    request_id: str | None
    model: str | None
    thinking_tokens: int = 0  # part of output_tokens; reported by the endpoint, else estimated from the text
    tool_input: Any = None  # the input of the first tool call, if the model made one
    tool_use_id: str | None = None
    content: tuple[dict[str, Any], ...] = ()  # the answer's blocks in request form, to continue the turn


@dataclass(slots=True)
class Result:
    """What became of one request: the answer and its usage, or the error it ended with."""

    key: str
    # skipped: not sent by the job's decision (input.nulls: skip on a null); neither answered nor failed
    status: Literal["ok", "error", "invalid", "skipped"]
    attempts: int
    latency_ms: float | None
    finished_at: dt.datetime
    model: str | None = None
    response_text: str | None = None
    thinking: str | None = None
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    thinking_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool = False  # for errors: may a later run send it again without --retry-failed?
    cost: float | None = None  # in the endpoint's currency; None when the model has no price there
    est_input_tokens: int | None = None  # the local estimate made before sending (for calibration)
    parsed_json: str | None = None  # a structured answer, validated, as JSON
    repairs: int = 0  # follow-up turns spent getting a valid structured answer
    api: str | None = None  # which API answered: "online" (the Messages API) or "batch" (Zhipu's Batch API)
    # Milliseconds the request waited in this process before being sent (queue and slot); for the
    # summary only: neither journalled nor stored.
    wait_ms: float | None = None


_ALL_FIELDS = Result.__slots__  # in the order __init__ takes them
_all_values = operator.attrgetter(*_ALL_FIELDS)
_COST_AT = _ALL_FIELDS.index("cost")
assert _ALL_FIELDS[_COST_AT : _COST_AT + 2] == ("cost", "est_input_tokens")


def priced(result: Result, cost: float | None, est_input_tokens: int | None) -> Result:
    """`result` with its cost and pre-send estimate: what dataclasses.replace makes, at a sixth of its
    cost (it runs once per answer, and replace looks each field up by name)."""
    values = list(_all_values(result))
    values[_COST_AT : _COST_AT + 2] = cost, est_input_tokens
    return Result(*values)


RESULT_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(),
    "status": pl.String(),
    "response_text": pl.String(),
    "thinking": pl.String(),
    "stop_reason": pl.String(),
    "input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "thinking_tokens": pl.Int64(),
    "cache_read_input_tokens": pl.Int64(),
    "cache_creation_input_tokens": pl.Int64(),
    "latency_ms": pl.Float64(),
    "attempts": pl.Int32(),
    "error_type": pl.String(),
    "error_message": pl.String(),
    "retryable": pl.Boolean(),
    "cost": pl.Float64(),
    "est_input_tokens": pl.Int64(),
    "parsed_json": pl.String(),
    "repairs": pl.Int32(),
    "request_id": pl.String(),
    "model": pl.String(),
    "finished_at": pl.Datetime("us", "UTC"),
    "run_id": pl.String(),
    "api": pl.String(),  # added after the first release: older parts lack it (read as null: online)
}


def scan_results(parts: list[Path]) -> pl.LazyFrame:
    """Answer parts as one lazy frame in RESULT_SCHEMA; a column that older parts lack reads as null."""
    return pl.scan_parquet(parts, schema=RESULT_SCHEMA, missing_columns="insert")


def settles(retry_failed: bool) -> pl.Expr:
    """Which stored results settle their key, so that no later run sends it again: an ok answer, and a
    failure for good (not retryable) unless the run sends failures again (--retry-failed)."""
    ok = pl.col("status") == "ok"
    return ok if retry_failed else ok | ~pl.col("retryable")


_NOT_JOURNALLED = frozenset({"wait_ms"})
_JOURNAL_FIELDS = tuple(name for name in Result.__slots__ if name not in _NOT_JOURNALLED)
_journal_values = operator.attrgetter(*_JOURNAL_FIELDS)


def journal_line(result: Result) -> bytes:
    """One result as a UTF-8 JSON line (newline included) for the write-ahead journal.

    orjson writes what json.dumps(..., ensure_ascii=False) would, datetimes in ISO 8601, about five
    times faster: this runs once per answer, on the path that bounds a run's rows per second."""
    record = dict(zip(_JOURNAL_FIELDS, _journal_values(result), strict=True))
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def with_valid_unicode(result: Result) -> Result:
    """`result` with every lone surrogate in its text replaced by U+FFFD (a surrogate pair is kept).

    A hostile answer or error body may decode to a lone surrogate ("\\ud800"), which is not UTF-8:
    neither the journal nor Parquet can hold it, and it must not crash the run."""
    changes: dict[str, Any] = {
        name: value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        for name, value in zip(_JOURNAL_FIELDS, _journal_values(result), strict=True)
        if isinstance(value, str)
    }
    return dataclasses.replace(result, **changes)


def result_to_json(result: Result) -> str:
    """One result as a JSON line (no newline) for the write-ahead journal."""
    return journal_line(result)[:-1].decode()


def result_from_json(line: str | bytes) -> Result:
    """The inverse of result_to_json; raises ValueError on a torn or foreign line."""
    data = orjson.loads(line)  # its JSONDecodeError is a ValueError
    if not isinstance(data, dict) or "key" not in data:
        raise ValueError("not a journal record")
    data["finished_at"] = dt.datetime.fromisoformat(data["finished_at"])
    return Result(**data)


def read_journal(path: Path) -> list[Result]:
    """Every result in a journal file; a line that does not read (a torn last line) is skipped."""
    results = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            results.append(result_from_json(line))
        except (ValueError, TypeError):
            continue
    return results


_STORED_FIELDS = tuple(name for name in RESULT_SCHEMA if name != "run_id")
_stored_values = operator.attrgetter(*_STORED_FIELDS)


def results_frame(results: list[Result], run_id: str) -> pl.DataFrame:
    """Results as a DataFrame in RESULT_SCHEMA, stamped with the run that produced them."""
    # One tuple per result, transposed into columns at once: a getattr per field and result cost more.
    rows = [_stored_values(r) for r in results]
    columns = dict(zip(_STORED_FIELDS, zip(*rows, strict=True), strict=True)) if rows else {}
    data = {name: columns.get(name, ()) for name in _STORED_FIELDS} | {"run_id": [run_id] * len(rows)}
    return pl.DataFrame({name: data[name] for name in RESULT_SCHEMA}, schema=RESULT_SCHEMA)
