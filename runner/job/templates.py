"""Prompt templates: Jinja2, sandboxed, with StrictUndefined so a missing variable fails loudly.

tpl = compile_template("Review: {{ text }}", origin="jobs/x.yaml: prompt.template")
tpl.variables          # {"text"}
tpl.render({"text": "Great."})
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from runner.errors import UsageError

if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment


def _printable(value: Any) -> Any:
    """What `{{ value }}` prints: a struct (dict) or list as JSON, the way a prompt should show data,
    never a Python repr; a null (None, e.g. a struct's missing field) as nothing, never the text "None";
    a binary value as its UTF-8 text, never b'...' (RenderError for the row when it is not text)."""
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(_plain(value), ensure_ascii=False, default=str, allow_nan=False)
    if isinstance(value, bytes):
        return _text(value)
    return value


def _plain(value: Any) -> Any:
    """A cell's value as JSON can hold it: NaN and infinities (which JSON has no words for) as null,
    bytes as their UTF-8 text."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return _text(value)
    return value


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a binary value is not UTF-8 text (an invalid byte at offset {exc.start})") from None


_ENV: ImmutableSandboxedEnvironment | None = None
_Code = tuple["jinja2.Template", "ImmutableSandboxedEnvironment", Callable[..., Any]]


def _environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja2 environment of the process, built (and jinja2 imported) on first use: `status`
    loads a job without parsing its templates, and so never pays for jinja2.

    Templates come from job specs, which may be shared between people, so they get the sandbox (no
    attribute access to internals) and no autoescaping (prompts are not HTML). keep_trailing_newline
    keeps a block scalar's final newline, as the user wrote it. `finalize` shapes every printed value
    (not values inside expressions: {{ item.name }} still works).
    """
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=_printable
        )
        # `| tojson` agrees with `{{ }}`: text as written (not \u escapes), dates and the like as their text.
        env.policies["json.dumps_kwargs"] = {"sort_keys": True, "ensure_ascii": False, "default": str}
        _ENV = env
    return _ENV


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
    process compiles it once, the first time it renders. A template made by `deferred_template` is
    not even parsed until its variables are first asked for.
    """

    __slots__ = ("_compiled", "_globals", "_variables", "origin", "source")

    def __init__(self, source: str, origin: str, variables: frozenset[str] | None) -> None:
        self.source = source
        self.origin = origin
        self._variables = variables
        self._compiled: _Code | None = None  # the compiled template, its environment and jinja2's new_context
        self._globals: dict[str, Any] = {}

    @property
    def variables(self) -> frozenset[str]:
        """The variables the template reads (parsed now if it was deferred; a syntax error raises UsageError)."""
        if self._variables is None:
            self._variables = _parse_variables(self.source, self.origin)
        return self._variables

    def __reduce__(self) -> tuple[Any, ...]:
        return (Template, (self.source, self.origin, self._variables))

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
        code = self._compiled
        if code is None:
            code = self._compile()
        compiled, env, new_context = code
        context = new_context(env, compiled.name, compiled.blocks, {**self._globals, **row}, shared=True)
        try:
            return str(env.concat(compiled.root_render_func(context)))
        except Exception as exc:  # anything user code in a template raises is that row's failure
            raise RenderError(f"{type(exc).__name__}: {exc}") from exc

    def _compile(self) -> _Code:
        from jinja2.runtime import new_context

        env = _environment()
        compiled = env.from_string(self.source)
        self._globals = dict(compiled.globals)
        self._compiled = (compiled, env, new_context)
        return self._compiled


def compile_template(source: str, *, origin: str) -> Template:
    """Check `source` parses, naming `origin` (file and key) in the error if its syntax is wrong."""
    return Template(source, origin, _parse_variables(source, origin))


def deferred_template(source: str, *, origin: str) -> Template:
    """A template that is parsed only when its variables are first asked for (for commands that never
    render: `status` finds the job's state without loading jinja2)."""
    return Template(source, origin, None)


def _parse_variables(source: str, origin: str) -> frozenset[str]:
    import jinja2
    from jinja2 import meta

    try:
        env = _environment()
        ast = env.parse(source)
        env.compile(ast)  # an unknown filter or test is found here (TemplateAssertionError), not by parse
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(
            f"{origin}: template syntax error on line {exc.lineno}: {exc.message}; fix the Jinja2 template"
        ) from exc
    return frozenset(meta.find_undeclared_variables(ast))
