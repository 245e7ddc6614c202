"""`glm-batch show OUTPUT_OR_JOB`: an output's rows as a table that fits the terminal, or JSON with
`--json`. Reads lazily: only the rows shown and a count of those matching are computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli import JsonOpt, SetOpt, _console, _load, command
from runner.errors import UsageError, first_line

SHORT = 12  # a column this narrow is never squeezed; wider ones share the rest of the terminal
MAX_CELL = 200  # characters of a cell put in the table (the table cuts it again to fit)
# Shown when --columns is not given: the row's id, the kept input columns and answer fields, and these.
DEFAULT_TAIL = ("response_text", "status", "error_type")


@command
def show(
    target: Annotated[
        Path,
        typer.Argument(
            metavar="OUTPUT_OR_JOB",
            help="An output Parquet file, or the job spec (YAML) whose output to show.",
            show_default=False,
        ),
    ],
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where", metavar="COLUMN=VALUE", help="Only rows whose column is (=) or is not (!=) this (repeatable)."
        ),
    ] = None,
    columns: Annotated[
        str | None, typer.Option("--columns", metavar="A,B", help="The columns to show, in this order.")
    ] = None,
    rows: Annotated[int, typer.Option("-n", "--rows", min=1, metavar="N", help="How many rows to show.")] = 20,
    as_json: JsonOpt = False,
    set_: SetOpt = None,
) -> None:
    """Show an output's rows as a table that fits the terminal (or as JSON)."""

    import polars as pl

    path = _output_of(target, set_)
    try:
        names = list(pl.read_parquet_schema(path))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise UsageError(f"{path}: cannot read it as Parquet ({first_line(exc)})") from None
    chosen = _columns(columns, names)
    frame = pl.scan_parquet(path)
    for condition in where or []:
        frame = frame.filter(_condition(condition, names))
    shown = frame.select(chosen).head(rows).collect()
    matching = int(frame.select(pl.len()).collect().item())
    if as_json:
        print(json.dumps(shown.to_dicts(), default=str, ensure_ascii=False, indent=2))
        return
    _print_table(shown, matching, path, bool(where))


def _output_of(target: Path, overrides: list[str] | None) -> Path:
    """The output file a target names: itself (a .parquet file) or its job's output."""
    if target.suffix == ".parquet":
        if not target.is_file():
            raise UsageError(f"{target}: no such output file")
        return target
    job = _load(target, overrides, None, check_templates=False, writes=False)
    if not job.output_path.is_file():
        raise UsageError(f"{job.output_path}: no output yet; run the job first: glm-batch run {target}")
    return job.output_path


def _columns(given: str | None, names: list[str]) -> list[str]:
    """The columns to show: those given (each must exist), else the id, the input and answer columns."""
    from runner.columns import OUTPUT_COLUMNS, VOTE_COLUMNS

    if given is None:
        own = [n for n in names if n not in OUTPUT_COLUMNS and n not in VOTE_COLUMNS]
        return [*own, *(n for n in DEFAULT_TAIL if n in names)]
    chosen = [c.strip() for c in given.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in names]
    if unknown or not chosen:
        raise UsageError(
            f"--columns {given}: no column {unknown[0] if unknown else '(none given)'!r}; "
            f"the output has: {', '.join(names)}"
        )
    return chosen


def _condition(text: str, names: list[str]) -> Any:
    """`--where column=value` (or `column!=value`) as a polars filter; values compare as text."""
    import polars as pl

    negate = "!=" in text
    column, sep, value = text.partition("!=" if negate else "=")
    column = column.strip()
    if not sep or not column:
        raise UsageError(f"--where {text!r}: expected COLUMN=VALUE or COLUMN!=VALUE, e.g. --where status=error")
    if column not in names:
        raise UsageError(f"--where {text!r}: no column {column!r}; the output has: {', '.join(names)}")
    cell = pl.col(column).cast(pl.String)
    if negate:
        return (cell != value).fill_null(True)
    return (cell == value).fill_null(False)


def _print_table(shown: Any, matching: int, path: Path, filtered: bool) -> None:
    """The rows as a rich table as wide as the terminal: each cell on one line, cut with an ellipsis."""
    from rich.table import Table

    console = _console()
    cells = [[_cell(v) for v in row] for row in shown.iter_rows()]
    natural = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(shown.columns)]
    table = Table(show_lines=False, pad_edge=False, expand=False)
    for name, width in zip(shown.columns, fit(natural, console.width), strict=True):
        table.add_column(name, overflow="ellipsis", no_wrap=True, width=width)
    for row in cells:
        table.add_row(*row)
    console.print(table, crop=True)
    which = "matching rows" if filtered else "rows"
    console.print(f"{shown.height:,} of {matching:,} {which} of {path}", highlight=False, overflow="fold")


def fit(natural: list[int], total: int) -> list[int]:
    """Column widths for a table `total` characters wide: short columns (an id, a status) keep their
    natural width, longer ones share what is left in proportion to theirs, none below 3 characters;
    when even that is too wide, the widest give way first and the first column (the id) last."""
    room = total - (3 * len(natural) + 1)  # each column's border and padding, and the last border
    short = [n <= SHORT for n in natural]
    widths = [n if s else 3 for n, s in zip(natural, short, strict=True)]
    left = room - sum(w for w, s in zip(widths, short, strict=True) if s)
    longs = [n for n, s in zip(natural, short, strict=True) if not s]
    if longs and left > 0:
        share = [max(SHORT, left * n // sum(longs)) for n in longs]
        fitted = iter(min(n, w) for n, w in zip(longs, share, strict=True))
        widths = [w if s else next(fitted) for w, s in zip(widths, short, strict=True)]
    while sum(widths) > room and max(widths) > 3:  # too many columns: shrink the widest, the id last
        rest = widths[1:]
        at = 1 + rest.index(max(rest)) if rest and max(rest) > 3 else 0
        widths[at] -= 1
    return [max(3, w) for w in widths]


def _cell(value: Any) -> str:
    """A value as one line of text: nothing for null, JSON for lists and structs, no line breaks."""
    if value is None:
        return ""
    text = json.dumps(value, default=str, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
    text = text[: MAX_CELL + 1].replace("\r", " ").replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
