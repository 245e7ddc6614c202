"""Prompt templates: Jinja2, sandboxed (runner.job.sandbox), with StrictUndefined so a missing variable
fails loudly."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from runner.errors import UsageError
from runner.job.sandbox import MAX_TEXT, RenderError, RenderLimit, bounded_environment, check_size, end_row, start_row

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
        return _dumps(value)
    if isinstance(value, bytes):
        return _text(value)
    return value


def _dumps(value: Any, **kwargs: Any) -> str:
    """JSON as a prompt shows it (`{{ struct }}` and `| tojson` alike): text as written, NaN as null,
    bytes as their text, a blanked null (input.nulls: empty) as null, dates and the like as their text."""
    options: dict[str, Any] = {"ensure_ascii": False, "default": str, "allow_nan": False, **kwargs}
    text = json.dumps(_plain(value), **options)
    check_size(len(text))
    return text


def _plain(value: Any) -> Any:
    """A cell's value as JSON can hold it: NaN and infinities (which JSON has no words for) as null,
    bytes as their UTF-8 text, a blanked null as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, Blank):
        return None
    return value


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a binary value is not UTF-8 text (an invalid byte at offset {exc.start})") from None


class Blank(str):
    """A null inside a list or struct under `input.nulls: empty`: prints (and filters) as '', and is
    null again in JSON (`{{ tags }}`, `| tojson`)."""

    __slots__ = ()


def has_nested_null(value: Any) -> bool:
    """Does a list or struct value hold a null anywhere inside it?"""
    if isinstance(value, dict):
        return any(v is None or has_nested_null(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(v is None or has_nested_null(v) for v in value)
    return False


def blank_nested_nulls(value: Any) -> Any:
    """`value` with every null inside it (list elements, struct fields) made a Blank."""
    if isinstance(value, dict):
        return {k: _BLANK if v is None else blank_nested_nulls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_BLANK if v is None else blank_nested_nulls(v) for v in value]
    return value


_BLANK = Blank("")


_Code = tuple["jinja2.Template", "ImmutableSandboxedEnvironment", Callable[..., Any]]


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja2 environment of the process, built (and jinja2 imported) on first use: sandboxed,
    no autoescaping (prompts are not HTML), the final newline kept, `finalize` shaping printed values."""
    return bounded_environment(_printable, _dumps)


class Template:
    """A prompt template: its source, the variables it reads, and its code, compiled on first use in
    each process (only the source is pickled); `deferred_template` even parses it late."""

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

    def substitution(self) -> tuple[tuple[bool, str], ...] | None:
        """The template as literal texts and column names, `(is_column, text)` in order, when that is all
        it is (`Summarise: {{ text }}`): printing a plain value is `str(value)` between the literals, so
        a whole batch of rows can be rendered as columns (runner.job.prompts). None for anything else."""
        from jinja2 import nodes

        pieces: list[tuple[bool, str]] = []
        for node in _environment().parse(self.source).body:  # the literals as the lexer leaves them
            if type(node) is not nodes.Output:
                return None
            for child in node.nodes:
                if type(child) is nodes.TemplateData:
                    pieces.append((False, child.data))
                elif type(child) is nodes.Name and child.ctx == "load":
                    pieces.append((True, child.name))
                else:
                    return None
        return tuple(pieces)

    def render(self, row: Mapping[str, Any]) -> str:
        """Render for one row; RenderError naming what the template raised. The globals are flattened
        once (jinja2's `render` copies them twice a call, most of a million-row resume's cost)."""
        code = self._compiled
        if code is None:
            code = self._compile()
        compiled, env, new_context = code
        context = new_context(env, compiled.name, compiled.blocks, {**self._globals, **row}, shared=True)
        token = start_row()
        try:
            pieces: list[str] = []
            size = 0
            for piece in compiled.root_render_func(context):
                size += len(piece)
                if size > MAX_TEXT:
                    raise RenderLimit(f"render_limit: the prompt is over {MAX_TEXT:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        except RenderError:
            raise
        except Exception as exc:  # anything user code in a template raises is that row's failure
            raise RenderError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            end_row(token)

    def _compile(self) -> _Code:
        from jinja2.runtime import new_context

        env = _environment()
        compiled = _compiled(env, self.source, self.origin)
        self._globals = dict(compiled.globals)
        self._compiled = (compiled, env, new_context)
        return self._compiled


def compile_template(source: str, *, origin: str) -> Template:
    """Check `source` parses and compiles (an unknown filter or test is found here, not at the first
    row), naming `origin` (file and key) in the error if it does not."""
    template = Template(source, origin, _parse_variables(source, origin))
    template._compile()
    return template


def deferred_template(source: str, *, origin: str) -> Template:
    """A template that is parsed only when its variables are first asked for (for commands that never
    render: `status` finds the job's state without loading jinja2)."""
    return Template(source, origin, None)


def _parse_variables(source: str, origin: str) -> frozenset[str]:
    import jinja2
    from jinja2 import meta

    try:
        return frozenset(meta.find_undeclared_variables(_environment().parse(source)))
    except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError too: "No filter named 'x'."
        raise UsageError(_syntax_error(exc, origin)) from None
    except RecursionError:
        raise UsageError(f"{origin}: the template is nested too deeply to parse; simplify it") from None


def _compiled(env: ImmutableSandboxedEnvironment, source: str, origin: str) -> jinja2.Template:
    """`source` compiled; a fault only compiling finds (an unknown filter or test) as one UsageError line."""
    import jinja2

    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError too: "No filter named 'x'."
        raise UsageError(_syntax_error(exc, origin)) from None
    except (RecursionError, MemoryError, SyntaxError) as exc:
        raise UsageError(f"{origin}: the template cannot be compiled ({type(exc).__name__}); simplify it") from None


def _syntax_error(exc: jinja2.TemplateSyntaxError, origin: str) -> str:
    import jinja2

    kind = "template syntax error" if type(exc) is jinja2.TemplateSyntaxError else "template error"
    message = " ".join(str(exc.message).split()).rstrip(".")  # one line
    return f"{origin}: {kind} on line {exc.lineno}: {message}; fix the Jinja2 template"
