"""Rows to requests: render each row's prompt into Messages API parameters and give it an identity key.

The key is a hash of everything that determines the answer, so identical requests share one answer and
a template change re-sends exactly the rows whose request changed (docs/decisions.md, "Request keys").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from runner.errors import UsageError
from runner.job.inputs import ID, ROW
from runner.job.resolve import Job
from runner.job.sandbox import NullInput, RenderError
from runner.job.templates import blank_nested_nulls, has_nested_null
from runner.records import Request

SAMPLE_MARK = "-s"


def sample_key(key: str, index: int) -> str:
    """The request key of a row's `index`-th sample; sample 0 is the row's own key."""
    return key if index == 0 else f"{key}{SAMPLE_MARK}{index}"


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

    def __reduce__(self) -> tuple[Any, ...]:
        # A hash object does not pickle; a worker rebuilds the builder from the (picklable) job.
        return (RequestBuilder, (self._job,))

    def build(self, row: dict[str, Any]) -> Request:
        """The request for one row (a mapping of column name to value).

        A null in a column the prompt reads, or inside one (a list element, a struct field), renders
        as '' with `input.nulls: empty`, and otherwise raises NullInput (a RenderError): the row is
        recorded as failed, not sent.
        """
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

    def samples_of(self, request: Request) -> list[Request]:
        """The requests to send for one row: the row's request once per sample, each with its own key."""
        if self.samples == 1:
            return [request]
        return [Request(sample_key(request.key, i), request.params) for i in range(self.samples)]
