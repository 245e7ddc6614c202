"""Prompt templates: Jinja2, sandboxed, with StrictUndefined so a missing variable fails loudly.

tpl = compile_template("Review: {{ text }}", origin="jobs/x.yaml: prompt.template")
tpl.variables          # {"text"}
tpl.render({"text": "Great."})

Rendering is bounded (a template comes from a spec that may be shared, and renders once per row): a
row whose template would build a number over MAX_INT_BITS bits, a text or list over MAX_TEXT
characters or items, run more than MAX_STEPS loop steps or take more than MAX_RENDER_S seconds fails
with RenderLimit (error_type render_limit) instead of exhausting memory or never ending.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from runner.errors import UsageError

if TYPE_CHECKING:
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# Rendering limits, per row. Far above any real prompt (GLM's largest context is ~200K tokens, well under
# a million characters), low enough that a template cannot take the machine down.
MAX_TEXT = 10_000_000  # characters of a rendered prompt, and of any text or list built while rendering it
MAX_INT_BITS = 10_000  # bits of a number built by arithmetic (about 3,000 decimal digits)
MAX_STEPS = 1_000_000  # loop iterations ({% for %}) in one row's rendering
MAX_RENDER_S = 5.0  # seconds one row's rendering may take (checked at loop steps and operators)


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
    _budget().size(len(text))
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


# ---- nulls inside a cell: list elements and struct fields ----------------------------------------------


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


# ---- limits -----------------------------------------------------------------------------------------


class _Budget:
    """What one row's rendering has used: loop steps, and when it must end."""

    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_RENDER_S

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise RenderLimit(f"render_limit: the template ran over {MAX_STEPS:,} loop steps for one row")
        if not self.steps & 1023:
            self.clock()

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"render_limit: the template took over {MAX_RENDER_S:g} s for one row")

    @staticmethod
    def size(n: int) -> None:
        if n > MAX_TEXT:
            raise RenderLimit(f"render_limit: the template built a text or list of {n:,} (over {MAX_TEXT:,})")


_UNBOUNDED = _Budget()  # used outside a row's rendering (compile-time constant folding): sizes only
_UNBOUNDED.deadline = math.inf
_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("glm_batch_render_budget")


def _budget() -> _Budget:
    return _BUDGET.get(_UNBOUNDED)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 0


_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise RenderLimit("render_limit: a format width or precision of a million or more")


def _checked_binop(op: str, left: Any, right: Any) -> Any:
    """`left op right` for the operators that can build huge values, refused before they are built."""
    budget = _budget()
    budget.clock()
    if op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and _bits(left) * right > MAX_INT_BITS:
            raise RenderLimit(f"render_limit: a number over {MAX_INT_BITS:,} bits ({left} ** {right})")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if _bits(left) + _bits(right) > MAX_INT_BITS:
                raise RenderLimit(f"render_limit: a number over {MAX_INT_BITS:,} bits")
        elif isinstance(right, int) and not isinstance(right, bool):
            budget.size(_length(left) * right)
        elif isinstance(left, int) and not isinstance(left, bool):
            budget.size(_length(right) * left)
    elif op == "+":
        budget.size(_length(left) + _length(right))
    elif op == "%":
        _check_format(left)
    result = _BINOPS[op](left, right)
    if isinstance(result, int) and _bits(result) > MAX_INT_BITS:
        raise RenderLimit(f"render_limit: a number over {MAX_INT_BITS:,} bits")
    return result


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "**": operator.pow,
    "*": operator.mul,
    "+": operator.add,
    "%": operator.mod,
}


def _loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every `{% for %}` iterates through this: one step of the row's budget per item."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _join(parts: Iterable[Any]) -> str:
    """The `~` operator, with the size of what it builds checked."""
    text = "".join(str(p) for p in parts)
    _budget().size(len(text))
    return text


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter with its size arguments (widths, counts) and its result checked."""

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_TEXT:
                raise RenderLimit(f"render_limit: | {name}({arg:,}) is over the limit of {MAX_TEXT:,}")
        if name == "format" and args:
            _check_format(args[0])
        if name == "replace":
            texts = [a for a in args if isinstance(a, str)]
            if len(texts) >= 3:  # (value, old, new): at worst, new for each character
                _budget().size(len(texts[-3]) + (len(texts[-3]) + 1) * len(texts[-1]))
        result = function(*args, **kwargs)
        _budget().size(_length(result))
        return result

    return bounded


_ENV: ImmutableSandboxedEnvironment | None = None
_Code = tuple["jinja2.Template", "ImmutableSandboxedEnvironment", Callable[..., Any]]


def _environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja2 environment of the process, built (and jinja2 imported) on first use: `status`
    loads a job without parsing its templates, and so never pays for jinja2.

    Templates come from job specs, which may be shared between people, so they get the sandbox (no
    attribute access to internals), with the limits above, and no autoescaping (prompts are not HTML).
    keep_trailing_newline keeps a block scalar's final newline, as the user wrote it. `finalize` shapes
    every printed value (not values inside expressions: {{ item.name }} still works).
    """
    global _ENV
    if _ENV is None:
        _ENV = _bounded_environment()
    return _ENV


def _bounded_environment() -> ImmutableSandboxedEnvironment:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        """The sandbox with limits: operators that build big values, loops, `~`, str methods, filters."""

        intercepted_binops = frozenset(_BINOPS)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _checked_binop(operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner = getattr(target, "__self__", None)
            if isinstance(owner, str) and getattr(target, "__name__", "") in ("format", "format_map"):
                _check_format(owner)  # '{:>10000000000}'.format(x)
            if isinstance(owner, str | bytes | list | tuple):  # 'a'.ljust(10**9), 'a'.zfill(...), ...
                for arg in (*args, *kwargs.values()):
                    if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_TEXT:
                        raise RenderLimit(f"render_limit: an argument of {arg:,} is over the limit of {MAX_TEXT:,}")
            result = super().call(__context, __obj, *args, **kwargs)
            _budget().size(_length(result))
            return result

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            return _bound_tree(super()._parse(source, name, filename))

    env = Bounded(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=_printable)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    # `| tojson` agrees with `{{ }}`: text as written (not \u escapes), NaN as null, bytes as their text.
    env.policies["json.dumps_function"] = _dumps
    env.policies["json.dumps_kwargs"] = {"sort_keys": True}
    setattr(env, "glm_loop", _loop)  # noqa: B010 - reached from compiled templates as environment.glm_loop
    setattr(env, "glm_join", _join)  # noqa: B010
    return env


def _bound_tree(tree: nodes.Template) -> nodes.Template:
    """Route every loop through the step budget and every `~` through the size check."""
    from jinja2 import nodes

    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.EnvironmentAttribute("glm_loop"), [loop.iter], [], None, None)
    for parent in tree.find_all(nodes.Node):
        for field in parent.fields:
            value = getattr(parent, field, None)
            if isinstance(value, nodes.Concat):
                setattr(parent, field, _join_call(value))
            elif isinstance(value, list):
                setattr(parent, field, [_join_call(v) if isinstance(v, nodes.Concat) else v for v in value])
    return tree


def _join_call(concat: nodes.Concat) -> nodes.Call:
    from jinja2 import nodes

    return nodes.Call(nodes.EnvironmentAttribute("glm_join"), [nodes.List(concat.nodes)], [], None, None)


class RenderError(ValueError):
    """A template failed on one row's values (a missing column value, a type error in an expression).

    The message names the underlying error: `TypeError: unsupported operand ...`. `error_type` is
    what the row's output records."""

    error_type = "render_error"


class NullInput(RenderError):
    """A row has a null in a column the prompt uses, and the job says `input.nulls: skip`: the row is
    recorded as failed (error_type null_input) and not sent."""

    error_type = "null_input"


class RenderLimit(RenderError):
    """A row's rendering went over a limit (MAX_TEXT, MAX_INT_BITS, MAX_STEPS, MAX_RENDER_S): recorded
    as failed (error_type render_limit), not sent."""

    error_type = "render_limit"


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
        token = _BUDGET.set(_Budget())
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
            _BUDGET.reset(token)

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
