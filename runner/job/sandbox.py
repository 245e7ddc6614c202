"""The sandbox prompt templates render in: a template may come from a shared spec and renders once a
row, so a row over a limit (MAX_INT_BITS, MAX_TEXT, MAX_STEPS, MAX_RENDER_S) fails with RenderLimit.
Arithmetic, loops, `~`, str/list methods and built-in filters are all checked.
"""

from __future__ import annotations

import contextvars
import functools
import math
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# Rendering limits, per row. Far above any real prompt (GLM's largest context is ~200K tokens, well under
# a million characters), low enough that a template cannot take the machine down.
MAX_TEXT = 10_000_000  # characters of a rendered prompt, and of any text or list built while rendering it
MAX_INT_BITS = 10_000  # bits of a number built by arithmetic (about 3,000 decimal digits)
MAX_STEPS = 1_000_000  # loop iterations ({% for %}) in one row's rendering
MAX_RENDER_S = 5.0  # seconds one row's rendering may take (checked at loop steps and operators)
# Words `lipsum(n, html, min, max)` may make (at most n * max): the one global whose work grows with its
# arguments in one call the row's clock cannot interrupt (lipsum(1000000) ran for minutes).
MAX_LIPSUM_WORDS = 100_000


class RenderError(ValueError):
    """A template failed on one row's values; the message names the underlying error, `error_type` is
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


def check_size(n: int) -> None:
    """Raise RenderLimit when a text or list of n is over MAX_TEXT."""
    if n > MAX_TEXT:
        raise RenderLimit(f"render_limit: the template built a text or list of {n:,} (over {MAX_TEXT:,})")


_UNBOUNDED = _Budget()  # outside a row's rendering (compile-time constant folding): no deadline
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
            check_size(_length(left) * right)
        elif isinstance(left, int) and not isinstance(left, bool):
            check_size(_length(right) * left)
    elif op == "+":
        check_size(_length(left) + _length(right))
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
    check_size(len(text))
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
                check_size(len(texts[-3]) + (len(texts[-3]) + 1) * len(texts[-1]))
        result = function(*args, **kwargs)
        check_size(_length(result))
        return result

    return bounded


def _bounded_lipsum(lipsum: Any) -> Callable[..., Any]:
    """`lipsum` refused before it runs when it could make more than MAX_LIPSUM_WORDS words."""

    @functools.wraps(lipsum)
    def bounded(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> Any:
        if isinstance(n, int) and isinstance(max, int) and n * max > MAX_LIPSUM_WORDS:
            raise RenderLimit(f"render_limit: lipsum({n:,}, max={max:,}) could make over {MAX_LIPSUM_WORDS:,} words")
        return lipsum(n, html, min, max)

    return bounded


def start_row() -> contextvars.Token[_Budget]:
    """A fresh budget for one row's rendering (end it with `end_row`)."""
    return _BUDGET.set(_Budget())


def end_row(token: contextvars.Token[_Budget]) -> None:
    _BUDGET.reset(token)


def bounded_environment(finalize: Callable[[Any], Any], dumps: Callable[..., str]) -> ImmutableSandboxedEnvironment:
    """The sandbox with the limits, printing through `finalize` and dumping JSON (`| tojson`) with `dumps`."""
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
            check_size(_length(result))
            return result

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            return _bound_tree(super()._parse(source, name, filename))

    env = Bounded(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=finalize)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["lipsum"] = _bounded_lipsum(env.globals["lipsum"])
    # `| tojson` agrees with `{{ }}`: text as written (not \u escapes), NaN as null, bytes as their text.
    env.policies["json.dumps_function"] = dumps
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
