"""Rows to requests: each row's prompt rendered into Messages API parameters, with a key hashing all that
determines the answer, so identical requests share one answer and a template change re-sends exactly
the rows it changed (docs/decisions.md, "Request keys")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from runner.errors import UsageError
from runner.job.inputs import ID, ROW
from runner.job.resolve import Job
from runner.job.sandbox import MAX_TEXT, NullInput, RenderError
from runner.job.templates import blank_nested_nulls, has_nested_null
from runner.records import KEY, Request

SAMPLE_MARK = "-s"
SAMPLE = "_sample"  # a request line's sample index within its row


@dataclass(frozen=True)
class _Columns:
    """A prompt rendered as columns: the row turn's literals and column names, and the key's hash
    over everything before the row's turn."""

    pieces: tuple[tuple[bool, str], ...]
    prefix: Any  # a hashlib sha256 object, copied for each row
    head: dict[str, Any]  # the parameters before `messages`, copied for each row


def sample_key(key: str, index: int) -> str:
    """The request key of a row's `index`-th sample; sample 0 is the row's own key."""
    return key if index == 0 else f"{key}{SAMPLE_MARK}{index}"


def expand_samples(rows: pl.LazyFrame, samples: int) -> pl.LazyFrame:
    """One line per (row, sample): each row's key becomes its samples' keys, as `sample_key` makes them."""
    keys = [pl.col(KEY), *(pl.col(KEY) + f"{SAMPLE_MARK}{i}" for i in range(1, samples))]
    return rows.with_columns(pl.concat_list(keys).alias(KEY), pl.int_ranges(0, samples).alias(SAMPLE)).explode(
        [KEY, SAMPLE]
    )


class RequestBuilder:
    """Renders rows into Requests for one job; everything that is the same for every row is built once."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self.samples = job.spec.output.samples
        m = job.spec.model
        fixed: dict[str, Any] = {"model": m.name, "max_tokens": m.max_tokens}
        if m.stop_sequences:
            fixed["stop_sequences"] = list(m.stop_sequences)
        if m.thinking is not None:
            fixed["thinking"] = m.thinking.model_dump(exclude_none=True)
        # SDK 2.x removed temperature/top_p/top_k as arguments; they travel in the request body.
        sampling = {
            k: v for k, v in (("temperature", m.temperature), ("top_p", m.top_p), ("top_k", m.top_k)) if v is not None
        }
        if sampling:
            fixed["extra_body"] = sampling
        self._fixed = fixed
        # A system prompt without variables is the same for every row: render it once.
        system = job.system
        try:
            self._system: str | None = system.render({}) if system is not None and not system.variables else None
        except RenderError as exc:
            raise UsageError(f"{job.spec_path}: prompt.system: the template fails to render: {exc}") from None
        # The turns before the row's own (prompt.messages): those without variables are rendered once.
        self._history: list[tuple[str, str | None]] = []
        for index, (role, tpl) in enumerate(job.history):
            try:
                self._history.append((role, None if tpl.variables else tpl.render({})))
            except RenderError as exc:
                raise UsageError(
                    f"{job.spec_path}: prompt.messages.{index}.content: the template fails to render: {exc}"
                ) from None
        # The columns the prompt reads, checked for nulls on every row (a null is never sent as "None").
        self._prompt_columns = tuple(sorted(job.prompt_variables))
        self._nulls = job.spec.input.nulls
        self._shape = job.shape
        shape = {"schema": self._shape.schema, "mode": self._shape.mode} if self._shape else None
        # The endpoint is part of the identity: the same prompt on another platform is another answer;
        # so is the structure asked for (a changed schema is a changed request).
        salt = json.dumps({"endpoint": job.base_url or job.endpoint_name, "shape": shape, **fixed}, sort_keys=True)
        self._salt = hashlib.sha256(salt.encode())
        # A labeling job's default `thinking: disabled` (runner.job.thinking) is sent but not hashed: a
        # Messages request without `thinking` asks for no reasoning already, so the request is the same
        # one and the answers of earlier runs keep serving it.
        default_thinking = job.thinking.default
        if default_thinking is not None and "thinking" not in fixed:
            self._fixed = {**fixed, "thinking": default_thinking}
        self._columns = self._column_rendering()

    def _column_rendering(self) -> _Columns | None:
        """How `key_batch` renders a batch as columns, or None when this job's prompt cannot be: only a
        row turn that substitutes columns between literal texts, under a system prompt and earlier turns
        that are the same for every row."""
        job = self._job
        if (job.system is not None and job.system.variables) or any(tpl.variables for _, tpl in job.history):
            return None
        pieces = job.template.substitution()
        if not pieces or not any(is_column for is_column, _ in pieces):
            return None
        # The key's parts before the row's turn are the same for every row: hashed once here.
        prefix = self._salt.copy()
        parts = [self._system or ""] + [part for role, text in self._history for part in (role, text or "")]
        for part in parts:
            data = part.encode()
            prefix.update(len(data).to_bytes(8, "little"))
            prefix.update(data)
        head = dict(self._fixed)
        if self._system is not None:
            head["system"] = self._system
        return _Columns(pieces, prefix, head)

    def __reduce__(self) -> tuple[Any, ...]:
        # A hash object does not pickle; a worker rebuilds the builder from the (picklable) job.
        return (RequestBuilder, (self._job,))

    def build(self, row: dict[str, Any]) -> Request:
        """The request for one row. A null the prompt reads (or inside one) renders as '' with
        `input.nulls: empty`, else raises NullInput: the row is recorded as failed, not sent."""
        nulls = [c for c in self._prompt_columns if row.get(c, "") is None]
        nested = [c for c in self._prompt_columns if has_nested_null(row.get(c))]
        if nulls or nested:
            if self._nulls != "empty":
                names = ", ".join(repr(c) for c in nulls)
                inside = ", ".join(repr(c) for c in nested)
                where = " and ".join(
                    part for part in (names and f"in column {names}", inside and f"inside column {inside}") if part
                )
                raise NullInput(
                    f"null {where}; not sent (input.nulls: {self._nulls}; fill it, or set input.nulls: empty)"
                )
            row = {**row, **dict.fromkeys(nulls, ""), **{c: blank_nested_nulls(row[c]) for c in nested}}
        params = dict(self._fixed)
        if self._system is not None:
            params["system"] = self._system
        elif self._job.system is not None:
            params["system"] = self._job.system.render(row)
        parts: list[str] = [params.get("system") or ""]
        messages: list[dict[str, Any]] = []
        for (role, text), (_, tpl) in zip(self._history, self._job.history, strict=True):
            text = tpl.render(row) if text is None else text
            messages.append({"role": role, "content": text})
            parts += (role, text)
        content = self._job.template.render(row)
        messages.append({"role": "user", "content": content})
        parts.append(content)
        params["messages"] = messages
        if self._shape is not None:
            params = self._shape.ask(params)
        # The key: everything fixed (hashed once), then the system prompt, each earlier turn's role and
        # text, and the row's turn, each length-prefixed so that no two different prompts (or
        # conversations) can run together into the same bytes.
        digest = self._salt.copy()
        for part in parts:
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return Request(digest.hexdigest()[:32], params)

    def render(self, rows: Iterable[dict[str, Any]]) -> Iterator[tuple[int, str, Request | RenderError]]:
        """Each row (a mapping with its position `_row` and id `_id`) as its request, or as the
        RenderError it has instead: the one render loop of run, estimate and validate."""
        for values in rows:
            try:
                yield values[ROW], values[ID], self.build(values)
            except RenderError as exc:
                yield values[ROW], values[ID], exc

    def key_batch(self, frame: pl.DataFrame) -> tuple[list[str | None], list[str | None]] | None:
        """Each row's request key and prompt, made as `build` makes them, for a batch of rows at once;
        None when these columns cannot be rendered as columns, and a row whose key is None goes through
        `build`. A template that only substitutes text or integer columns is rendered by one polars
        expression (`prompt_column`); only the key is made row by row."""
        column = self.prompt_column(frame)
        if column is None:
            return None
        prompts = column.to_list()  # null: a null
        return self.keys_of(prompts), prompts

    def prompt_column(self, frame: pl.DataFrame) -> pl.Series | None:
        """Each row's prompt (its turn's text) rendered by one polars expression, null where a column it
        reads is null; None when this job or these columns cannot be rendered as columns."""
        columns = self._columns
        if columns is None:
            return None
        schema = frame.schema
        names = [text for is_column, text in columns.pieces if is_column]
        if any(name not in schema or not (schema[name] == pl.String or schema[name].is_integer()) for name in names):
            return None
        pieces = [
            pl.col(text).cast(pl.String) if is_column else pl.lit(text, pl.String) for is_column, text in columns.pieces
        ]
        return frame.select(pl.concat_str(pieces).alias("prompt")).get_column("prompt")

    def keys_of(self, prompts: list[str | None]) -> list[str | None]:
        """The request key of each prompt `prompt_column` rendered, as `build` makes it (the parts before
        the row's turn hashed once); None for a null prompt or one over the rendering limit."""
        assert self._columns is not None
        copy = self._columns.prefix.copy
        keys: list[str | None] = []
        append = keys.append
        for prompt in prompts:
            if prompt is None or len(prompt) > MAX_TEXT:
                append(None)
                continue
            data = prompt.encode()
            digest = copy()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
            append(digest.hexdigest()[:32])
        return keys

    def column_request(self, key: str, prompt: str | None) -> Request:
        """The request of a row `key_batch` keyed, from its prompt: what `build` makes, key for key."""
        assert self._columns is not None
        params = self._columns.head.copy()  # the fixed parameters and the system prompt, in build's order
        messages: list[dict[str, Any]] = [{"role": role, "content": text} for role, text in self._history]
        messages.append({"role": "user", "content": prompt})
        params["messages"] = messages
        if self._shape is not None:
            params = self._shape.ask(params)
        return Request(key, params)

    @property
    def renders_columns(self) -> bool:
        """Can this job's prompt be rendered as columns (for columns of text and integers)?"""
        return self._columns is not None

    def samples_of(self, request: Request) -> list[Request]:
        """The requests to send for one row: the row's request once per sample, each with its own key."""
        if self.samples == 1:
            return [request]
        return [Request(sample_key(request.key, i), request.params) for i in range(self.samples)]
