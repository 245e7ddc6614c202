"""The command line: the typer app, its entry point `main` and what every command shares; the commands
live by concern in `run`, `inspect`, `scaffold` and `doctor`. Imports stay light (docs/decisions.md,
"CLI start-up")."""

from __future__ import annotations

import os

# polars' jemalloc returns freed pages at once (docs/decisions.md, "CLI start-up"): set before polars
# loads, by the command line only, at the top of this package; an operator's own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from runner import __version__
from runner.errors import GlmBatchError, NothingToDo, deliberate

if TYPE_CHECKING:
    from runner.job.resolve import Job


class _PlainFlags:
    """Show on/off options as bare flags in help: typer's rich help would print `<bool>` beside them."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_PlainFlags, TyperCommand):
    """A command whose help shows flags as flags."""


class _Group(_PlainFlags, TyperGroup):
    """The top-level command group, showing flags as flags in its help like every command."""


def _typer() -> typer.Typer:
    """An app with the top-level options (--version) and no command yet."""
    one = typer.Typer(
        cls=_Group,
        add_completion=True,
        no_args_is_help=True,
        pretty_exceptions_enable=False,  # nothing escapes `_guarded` and `main` as a traceback
        help="Batch prompt processing against Zhipu's GLM models (Anthropic-compatible Messages API).",
    )
    one.callback()(_main)
    return one


T = TypeVar("T")


SpecArg = Annotated[Path, typer.Argument(metavar="JOB", help="The job spec (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a spec field: --set run.concurrency=4 (repeatable)."),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, metavar="N", help="Use only the first N input rows.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _version(value: bool) -> None:
    if value:
        print(f"glm-batch {__version__}")
        raise typer.Exit()


def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Batch prompt processing against Zhipu's GLM models (Anthropic-compatible Messages API)."""


app = _typer()


def _guarded(fn: Callable[[], T]) -> T:
    """Run `fn` inside every command's exception boundary: a GlmBatchError (also in an ExceptionGroup) is
    its one line and exit code; anything else one line and a crash log (exit 70, runner.cli.boundary)."""
    try:
        try:
            return fn()
        except ExceptionGroup as group:
            raise deliberate(group) or group from None
    except NothingToDo as exc:  # a normal day for a cron job: a notice, not an error (stdout is for --json)
        print(f"glm-batch: {exc}", file=sys.stderr)
        raise typer.Exit(0) from None
    except GlmBatchError as exc:
        print(f"glm-batch: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # the boundary: never a traceback on the terminal; cancellation passes
        from runner.cli.boundary import crash

        raise typer.Exit(crash(exc)) from None


def command(fn: Callable[..., int | None]) -> Callable[..., None]:
    """`fn` as a command: run inside `_guarded`; what it returns, if anything, is its exit code."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> None:
        code = _guarded(lambda: fn(*args, **kwargs))
        if code:
            raise typer.Exit(code)

    return guarded


def _load(
    spec: Path,
    overrides: list[str] | None,
    limit: int | None,
    *,
    check_templates: bool = True,
    writes: bool = True,
    sends: bool = True,
) -> Job:
    from runner.job.resolve import load_job

    items = list(overrides or [])
    if limit is not None:
        items.append(f"input.limit={limit}")
    return load_job(spec, items, check_templates=check_templates, writes=writes, sends=sends)


def _console() -> Any:
    """A rich console on stdout (its width: the terminal's, $COLUMNS, or 80 when piped)."""
    from rich.console import Console

    return Console()


def main() -> None:
    """Console-script entry point: standard streams that cannot fail the run, and no traceback ever
    (an unexpected error is one line and a crash log, exit 70; see runner.cli.boundary)."""
    from runner.cli.boundary import crash, ensure_utf8_mode, harden_streams

    ensure_utf8_mode()
    harden_streams()
    try:
        app_for(sys.argv[1:])()
    except Exception as exc:  # what escaped a command's own boundary (typer's parsing, an import)
        sys.exit(crash(exc))


def app_for(args: list[str]) -> typer.Typer:
    """The app that runs `glm-batch ARGS`: for `glm-batch COMMAND ...`, one with that command alone;
    the whole app for anything else (no command, --help, --version, a misspelt one) and shell completion."""
    name = args[0] if args else ""
    if name not in COMMANDS or any(key.startswith("_") and key.endswith("_COMPLETE") for key in os.environ):
        return app
    one = _typer()
    one.command(name, cls=_Command)(COMMANDS[name])
    return one


# The commands live in modules by concern and register here, after the app and the helpers they use,
# in the order `glm-batch --help` lists them.
from runner.cli import doctor, inspect, run, scaffold, show  # noqa: E402

COMMANDS: dict[str, Callable[..., None]] = {
    fn.__name__: fn
    for fn in (
        run.run,
        run.estimate,
        inspect.usage,
        inspect.report,
        scaffold.validate,
        doctor.doctor,
        inspect.status,
        show.show,
        inspect.cancel,
        inspect.models,
        scaffold.schema,
        scaffold.init,
        run.simulate,
    )
}
for _name, _fn in COMMANDS.items():
    app.command(_name, cls=_Command)(_fn)

__all__ = ["COMMANDS", "app", "app_for", "main"]
