"""Prompt templates: Jinja2, sandboxed, with StrictUndefined so a missing variable fails loudly.

tpl = compile_template("Review: {{ text }}", origin="jobs/x.yaml: prompt.template")
tpl.variables          # {"text"}
tpl.render({"text": "Great."})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runner.errors import UsageError


def _printable(value: Any) -> Any:
    """What `{{ value }}` prints: a struct (dict) or list as JSON, the way a prompt should show data,
    never a Python repr; a null (None, e.g. a struct's missing field) as nothing, never the text "None"."""
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


# One environment for the process: templates come from job specs, which may be shared between
# people, so they get the sandbox (no attribute access to internals) and no autoescaping (prompts
# are not HTML). keep_trailing_newline keeps a block scalar's final newline, as the user wrote it.
# `finalize` shapes every printed value (not values inside expressions: {{ item.name }} still works).
_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=_printable
)
# `| tojson` agrees with `{{ }}`: text as written (not \u escapes), dates and the like as their text.
_ENV.policies["json.dumps_kwargs"] = {"sort_keys": True, "ensure_ascii": False, "default": str}


class RenderError(ValueError):
    """A template failed on one row's values (a missing column value, a type error in an expression).

    The message names the underlying error: `TypeError: unsupported operand ...`. `error_type` is
    what the row's output records."""

    error_type = "render_error"


class NullInput(RenderError):
    """A row has a null in a column the prompt uses, and the job says `input.nulls: skip`: the row is
    recorded as failed (error_type null_input) and not sent."""

    error_type = "null_input"


class Template:
    """A prompt template: its source, the variables it reads, and (compiled on first use) its code.

    Only the source travels when a job is pickled for another process or a cluster worker; each
    process compiles it once, the first time it renders.
    """

    __slots__ = ("_compiled", "_globals", "origin", "source", "variables")

    def __init__(self, source: str, origin: str, variables: frozenset[str]) -> None:
        self.source = source
        self.origin = origin
        self.variables = variables
        self._compiled: jinja2.Template | None = None
        self._globals: dict[str, Any] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (Template, (self.source, self.origin, self.variables))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and (self.source, self.origin) == (other.source, other.origin)

    def __hash__(self) -> int:
        return hash((self.source, self.origin))

    def render(self, row: Mapping[str, Any]) -> str:
        """Render for one row; raises RenderError naming what the template raised (UndefinedError,
        TypeError...): a user's template can fail on any row's values, and callers must be able to
        tell that from a bug of ours.

        `jinja2.Template.render` copies the environment's globals (a ChainMap) twice on every call,
        which was most of the cost of resuming a million-row job. Here the globals are flattened once
        and the row is layered on top: the same context `render` builds, without the copies.
        """
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _ENV.from_string(self.source)
            self._globals = dict(compiled.globals)
        context = new_context(_ENV, compiled.name, compiled.blocks, {**self._globals, **row}, shared=True)
        try:
            return str(_ENV.concat(compiled.root_render_func(context)))
        except Exception as exc:  # anything user code in a template raises is that row's failure
            raise RenderError(f"{type(exc).__name__}: {exc}") from exc


def compile_template(source: str, *, origin: str) -> Template:
    """Check `source` parses, naming `origin` (file and key) in the error if its syntax is wrong."""
    try:
        ast = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(
            f"{origin}: template syntax error on line {exc.lineno}: {exc.message}; fix the Jinja2 template"
        ) from exc
    return Template(source, origin, frozenset(meta.find_undeclared_variables(ast)))
