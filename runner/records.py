"""The records that flow through a run: a Request goes out, an Answer comes back (from any wire), and a
Result is stored (RESULT_SCHEMA: its form in every part file and the output)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import polars as pl

KEY = "key"  # the request key column: what identifies an answer in every store file


# Request, Answer and Result are made once or more per row on the paths that bound a run's speed, and a
# frozen dataclass's __init__ costs ~3x a plain one's: so they are plain slotted dataclasses. Treat them
# as values all the same: make a new one (`priced`, dataclasses.replace), never assign to a field.
@dataclass(slots=True)
class Request:
    """One request to send: its identity key and the keyword arguments for `messages.create`."""

    key: str
    params: dict[str, Any]


class RequestBlock:
    """Admitted requests handed over at once: their keys in order, and each one's Request made when
    asked for (from the Request itself, or a column-rendered prompt via `build(key, prompt)`)."""

    __slots__ = ("_build", "_items", "keys")

    def __init__(
        self, keys: list[str], items: list[Request | str], build: Callable[[str, str], Request] | None = None
    ) -> None:
        self.keys = keys
        self._items = items
        self._build = build

    def __len__(self) -> int:
        return len(self.keys)

    def requests(self) -> Iterator[Request]:
        """Each request of the block, in order."""
        build = self._build
        for key, item in zip(self.keys, self._items, strict=True):
            if isinstance(item, Request):
                yield item
            else:
                assert build is not None
                yield build(key, item)


@dataclass(slots=True)
class Answer:
    """A model's answer, whatever wire brought it; `content` holds its blocks in Messages API request
    form, so a repair turn can continue the conversation."""

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
    # The usage counts the endpoint did not report, estimated instead (never 0 for a billed answer):
    # e.g. "input_tokens"; None when every count is the endpoint's own.
    usage_estimated: str | None = None


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
    """One result as a UTF-8 JSON line (newline included) for the write-ahead journal (orjson: the hot
    path of a run)."""
    record = dict(zip(_JOURNAL_FIELDS, _journal_values(result), strict=True))
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def with_valid_unicode(result: Result) -> Result:
    """`result` with every lone surrogate in its text replaced by U+FFFD: neither the journal nor
    Parquet can hold one, and a hostile answer must not crash the run."""
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


@dataclass(slots=True)
class Answers:
    """A block of plain answers as columns (what a result file mostly holds), taken in without a Result
    each; `cost` and `est_input_tokens` are filled in by the accountant."""

    finished_at: dt.datetime
    api: str | None
    keys: list[str] = dataclasses.field(default_factory=list)
    attempts: list[int] = dataclasses.field(default_factory=list)
    model: list[str | None] = dataclasses.field(default_factory=list)
    response_text: list[str] = dataclasses.field(default_factory=list)
    thinking: list[str | None] = dataclasses.field(default_factory=list)
    stop_reason: list[str | None] = dataclasses.field(default_factory=list)
    input_tokens: list[int] = dataclasses.field(default_factory=list)
    output_tokens: list[int] = dataclasses.field(default_factory=list)
    thinking_tokens: list[int] = dataclasses.field(default_factory=list)
    cache_read_input_tokens: list[int] = dataclasses.field(default_factory=list)
    request_id: list[str | None] = dataclasses.field(default_factory=list)
    cost: list[float | None] = dataclasses.field(default_factory=list)
    est_input_tokens: list[int | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, answer: Answer, attempts: int) -> None:
        """One answer, the only turn of its request (a plain text answer: no tool call)."""
        cached = answer.cache_read_input_tokens or 0
        fields = (answer.model, answer.text, answer.thinking, answer.stop_reason, answer.input_tokens,
                  answer.output_tokens, answer.thinking_tokens, cached, answer.request_id)  # fmt: skip
        self.add_fields(key, attempts, fields)

    def add_fields(self, key: str, attempts: int, fields: tuple[Any, ...]) -> None:
        """One answer given as its fields, in the order model, text, thinking, stop_reason, input_tokens,
        output_tokens, thinking_tokens, cache_read_input_tokens, request_id (no Answer made)."""
        self.keys.append(key)
        self.attempts.append(attempts)
        model, text, thinking, stop_reason, input_tokens, output_tokens, thinking_tokens, cached, request_id = fields
        self.model.append(model)
        self.response_text.append(text)
        self.thinking.append(thinking)
        self.stop_reason.append(stop_reason)
        self.input_tokens.append(input_tokens)
        self.output_tokens.append(output_tokens)
        self.thinking_tokens.append(thinking_tokens)
        self.cache_read_input_tokens.append(cached)
        self.request_id.append(request_id)

    def only(self, keep: list[bool]) -> Answers:
        """The answers where `keep` is True."""
        taken = Answers(self.finished_at, self.api)
        for name in _ANSWER_COLUMNS:
            column = getattr(self, name)
            if column:  # cost and estimate are empty until the accountant fills them
                setattr(taken, name, [value for value, kept in zip(column, keep, strict=True) if kept])
        return taken

    def results(self) -> list[Result]:
        """The answers as Results (priced, once the accountant filled `cost` and `est_input_tokens`)."""
        count = len(self.keys)
        costs = self.cost or [None] * count
        estimates = self.est_input_tokens or [None] * count
        return [
            Result(key=self.keys[i], status="ok", attempts=self.attempts[i], latency_ms=None,
                   finished_at=self.finished_at, model=self.model[i], response_text=self.response_text[i],
                   thinking=self.thinking[i], stop_reason=self.stop_reason[i], input_tokens=self.input_tokens[i],
                   output_tokens=self.output_tokens[i], thinking_tokens=self.thinking_tokens[i],
                   cache_read_input_tokens=self.cache_read_input_tokens[i], cache_creation_input_tokens=0,
                   request_id=self.request_id[i], cost=costs[i], est_input_tokens=estimates[i], api=self.api)
            for i in range(count)
        ]  # fmt: skip

    def frame(self, run_id: str) -> pl.DataFrame:
        """The answers as results_frame makes their Results: RESULT_SCHEMA, stamped with `run_id`."""
        count = len(self.keys)
        varying: dict[str, list[Any]] = {
            "key": self.keys,
            "response_text": self.response_text,
            "thinking": self.thinking,
            "stop_reason": self.stop_reason,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "thinking_tokens": self.thinking_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "attempts": self.attempts,
            "cost": self.cost or [None] * count,
            "request_id": self.request_id,
            "model": self.model,
            "est_input_tokens": self.est_input_tokens or [None] * count,
        }
        constant = {"status": "ok", "cache_creation_input_tokens": 0, "latency_ms": None, "error_type": None,
                    "error_message": None, "retryable": False, "parsed_json": None, "repairs": 0,
                    "finished_at": self.finished_at, "run_id": run_id, "api": self.api}  # fmt: skip
        frame = pl.DataFrame([pl.Series(name, values, dtype=RESULT_SCHEMA[name]) for name, values in varying.items()])
        lits = [pl.lit(value, dtype=RESULT_SCHEMA[name]).alias(name) for name, value in constant.items()]
        return frame.with_columns(lits).select(list(RESULT_SCHEMA))


_ANSWER_COLUMNS = tuple(name for name in Answers.__slots__ if name not in ("finished_at", "api"))


def results_of_frame(frame: pl.DataFrame) -> list[Result]:
    """Stored results (RESULT_SCHEMA) back as Results: the inverse of results_frame."""
    return [Result(**row) for row in frame.drop("run_id").iter_rows(named=True)]
