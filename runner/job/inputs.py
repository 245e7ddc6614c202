"""Input rows: Parquet, CSV and JSONL files read lazily by polars and handed out in bounded batches,
each with `_row` (its position in the input) and `_id` (the id column as text, or a hash of the row).
CSV is read as text and JSONL types are inferred from all lines, so no type changes mid-run.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from runner.columns import clash as output_clash
from runner.errors import DiskFull, NothingToDo, UsageError, first_line
from runner.files import read_json_object, write_json_atomic
from runner.job.reading import refuse_ambiguous_names
from runner.job.resolve import Job

ROW = "_row"
ID = "_id"


@dataclass(frozen=True)
class InputSource:
    """The job's rows as one lazy frame, and the columns each part of the job reads."""

    frame: pl.LazyFrame
    used_columns: tuple[str, ...]  # what templates read, the id and the kept columns
    keep_columns: tuple[str, ...]
    id_column: str | None
    rows: int  # how many rows: counted by the check pass of `open_input`, so nobody reads the input again for it
    names_passed: tuple[list[Any], ...] = ()  # the inputs' content identities: each passed the name check

    def batches(self, batch_rows: int = 10_000, ids: bool = True) -> Iterator[pl.DataFrame]:
        """Yield the input in order, `batch_rows` at a time, with `_row` and (if `ids`) `_id` added."""
        offset = 0
        for chunk in self.frame.collect_batches(chunk_size=batch_rows, maintain_order=True):
            if chunk.height == 0:
                continue
            chunk = chunk.with_columns(pl.int_range(offset, offset + chunk.height, dtype=pl.UInt64).alias(ROW))
            offset += chunk.height
            yield chunk.with_columns(self.ids(chunk)) if ids else chunk

    def ids(self, chunk: pl.DataFrame) -> pl.Series:
        """The `_id` of each row of `chunk` (read elsewhere too: a cluster worker labels its own rows)."""
        if self.id_column is not None:
            return chunk.get_column(self.id_column).cast(pl.String).alias(ID)
        # No id column: hash the content the job reads, so adding unrelated columns keeps ids stable.
        cols = [c for c in self.used_columns if c in chunk.columns]
        rows = chunk.select(cols).iter_rows()
        return pl.Series(ID, [_content_id(r) for r in rows], dtype=pl.String)


def _content_id(values: tuple[object, ...]) -> str:
    blob = json.dumps(values, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_input(job: Job) -> InputSource:
    """Scan the job's input files and check, before any request, that the job can read what it needs:
    one streaming pass counts rows, null and distinct ids and nulls in the prompt's columns (a CSV is
    read whole, so a ragged row is caught here); an input with no rows raises NothingToDo."""
    spec = job.spec.input
    where = str(job.spec_path)
    # A CSV or JSONL export with no rows may be a 0-byte file: it has no header either, so it adds nothing.
    paths = [p for p in job.input_paths if not (p.suffix in _TEXT_FORMATS and p.stat().st_size == 0)]
    if not paths:
        raise NothingToDo(f"{where}: input.paths: the input has no rows; nothing to do")
    passed = _refuse_ambiguous(job, paths, where)
    frames = [_scan(p, where) for p in paths]
    schemas = []
    for path, frame in zip(paths, frames, strict=True):
        try:
            schemas.append(frame.collect_schema())
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise UsageError(
                _not_utf8(path, where)
                or f"{where}: input.paths: cannot read {path}{_bad_json_line(path)} ({first_line(exc)})"
            ) from None
    columns = list(schemas[0].names())
    for path, schema in zip(paths[1:], schemas[1:], strict=True):
        if list(schema.names()) != columns:
            raise UsageError(
                f"{where}: input.paths: {path.name} has columns {list(schema.names())}, "
                f"but {paths[0].name} has {columns}; all inputs need the same columns"
            )

    available = set(spec.columns) if spec.columns is not None else set(columns)
    if spec.columns is not None:
        _require(spec.columns, columns, where, "input.columns")
    template_vars = job.prompt_variables
    missing = sorted(template_vars - available)
    if missing:
        raise UsageError(
            f"{where}: prompt: the template uses {', '.join(missing)}, which "
            f"{'input.columns does not list' if spec.columns is not None else 'the input does not have'}; "
            f"input columns are {', '.join(columns)}" + _spaced_hint(columns)
        )
    private = sorted(template_vars & {ROW, ID})
    if private:
        raise UsageError(
            f"{where}: prompt: the template reads {private[0]!r}, a name the runner keeps for its own "
            f"({ROW}: the row's position, {ID}: its id), so the input column of that name would never reach "
            "the prompt; rename the column in the input"
        )
    _require(list(job.keep_columns), columns, where, "output.keep_columns")
    if spec.id_column is not None:
        _require([spec.id_column], columns, where, "input.id_column")
    keep = list(job.keep_columns)
    shape = job.shape
    carried: dict[str, str] = {}  # gold columns the output carries under another name (`label` as `label_gold`)
    if job.spec.eval is not None:  # the gold answers travel to the output, for the quality report
        gold = [job.spec.eval.gold_column] if job.spec.eval.gold_column else []
        _require(gold, columns, where, "eval.gold_column")
        _require(list(job.spec.eval.gold_fields.values()), columns, where, "eval.gold_fields")
        unknown = sorted(set(job.spec.eval.gold_fields) - set(shape.fields if shape else ()))
        if unknown:
            raise UsageError(f"{where}: eval.gold_fields: {unknown[0]!r} is not a field of output.schema")
        carried = {c: name for c, name in job.gold_columns.items() if name != c and c not in keep}
        for c, name in carried.items():
            if name in columns:
                raise UsageError(
                    f"{where}: eval: the gold column {c!r} is named like an output column, so the output "
                    f"carries it as {name!r}, but the input has a column {name!r} too; rename one in the input"
                )
        keep += [c for c in [*gold, *job.spec.eval.gold_fields.values()] if c not in keep]
    fields = shape.fields if shape else ()
    clash = output_clash(spec.id_column or "id", [carried.get(c, c) for c in keep], fields, job.spec.output.samples)
    if clash:
        raise UsageError(f"{where}: {clash}")

    id_cols = {spec.id_column} if spec.id_column is not None else set()
    used = sorted(template_vars | set(keep) | id_cols)
    frames = _agree_on_types(frames, schemas, paths, used, spec.id_column, where)
    whole = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    if spec.limit is not None:
        whole = whole.head(spec.limit)
    # A carried gold column is read for nothing else (a prompt reading gold is refused at load): renamed in place.
    frame = whole.select([pl.col(c).alias(carried.get(c, c)) for c in used])

    stats = _stats(job, whole, used, tuple(sorted(template_vars)), paths)
    if stats["rows"] == 0:
        raise NothingToDo(f"{where}: input.paths: the input has no rows; nothing to do")
    if spec.id_column is not None:
        _check_ids(frame, spec.id_column, stats, where)
    if spec.nulls == "error":
        _check_nulls(tuple(sorted(template_vars)), stats, where)

    named = tuple(carried.get(c, c) for c in used)
    kept = tuple(carried.get(c, c) for c in keep)
    return InputSource(frame, named, kept, spec.id_column, stats["rows"], names_passed=passed)


# What passed the name check, by content identity, in the state directory: an unchanged input is not
# parsed again (a JSONL file's check reads every line in Python, about 1.5 s a million lines).
NAMES_CHECKED = "inputs-checked.json"
NAMES_CHECK_VERSION = 1  # raised when refuse_ambiguous_names refuses more: what passed before is checked again


def content_identity(path: Path) -> list[Any]:
    """What tells an input's content from any other: its real path, device and inode, size, and mtime and
    ctime to the nanosecond (a write changes ctime, and no one can set it back)."""
    st = path.stat()
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _refuse_ambiguous(job: Job, paths: list[Path], where: str) -> tuple[list[Any], ...]:
    """refuse_ambiguous_names on each input whose content has not passed it before (a torn or foreign
    record reads as nothing passed); the identities of the inputs, which have now all passed."""
    known = read_json_object(job.state_dir / NAMES_CHECKED) or {}
    passed = known.get("passed") if known.get("version") == NAMES_CHECK_VERSION else None
    passed = passed if isinstance(passed, list) else []
    identities = []
    for path in paths:
        identity = content_identity(path)  # before the check: a write during it changes the ctime
        if identity not in passed:
            refuse_ambiguous_names(path, where)
        identities.append(identity)
    return tuple(identities)


def record_names_checked(job: Job, source: InputSource) -> None:
    """Record in the state directory (a run's, opened) that the inputs `source` was read from passed
    the name check. A cache: a record that cannot be written is left unwritten."""
    record = job.state_dir / NAMES_CHECKED
    passed = [list(identity) for identity in source.names_passed]
    if passed and (read_json_object(record) or {}).get("passed") != passed:
        with contextlib.suppress(OSError, DiskFull):
            write_json_atomic({"version": NAMES_CHECK_VERSION, "passed": passed}, record)


def _agree_on_types(
    frames: list[pl.LazyFrame],
    schemas: list[pl.Schema],
    paths: list[Path],
    used: list[str],
    id_column: str | None,
    where: str,
) -> list[pl.LazyFrame]:
    """Make the inputs' column types agree so they concatenate: ids are compared as text anyway, so an
    id column that is a number in one file and text in another is read as text; any other column the
    job uses must have one type in every file. A column the job never reads may differ: it is left out."""
    differ = [c for c in schemas[0].names() if c not in used and any(s[c] != schemas[0][c] for s in schemas[1:])]
    if differ:
        frames = [f.drop(differ) for f in frames]
    if id_column is not None:
        dtype = schemas[0][id_column]
        if dtype.is_nested() or dtype == pl.Object or dtype == pl.Null:
            raise UsageError(
                f"{where}: input.id_column: {id_column!r} is a {dtype} column; ids must be text or numbers"
            )
        if any(s[id_column] != dtype for s in schemas[1:]):
            frames = [f.with_columns(pl.col(id_column).cast(pl.String)) for f in frames]
    for column in used:
        if column == id_column:
            continue
        for path, schema in zip(paths[1:], schemas[1:], strict=True):
            if schema[column] != schemas[0][column]:
                raise UsageError(
                    f"{where}: input.paths: column {column!r} is {schema[column]} in {path.name} but "
                    f"{schemas[0][column]} in {paths[0].name}; make the inputs agree on its type"
                )
    return frames


def _stats(
    job: Job, whole: pl.LazyFrame, used: list[str], prompt_columns: tuple[str, ...], paths: list[Path]
) -> dict[str, Any]:
    """One streaming pass over the rows the job will read: how many, nulls per column, rows with a
    null the prompt would read, and distinct ids (by 64-bit hash: docs/decisions.md, "Input checks").
    """
    where = str(job.spec_path)
    id_column = job.spec.input.id_column
    schema = whole.collect_schema()
    names = list(schema.names())
    # A CSV is checked whole: polars reads a projection of it without noticing a row with extra fields.
    counted = names if any(p.suffix in _TEXT_FORMATS for p in paths) else used or names[:1]
    exprs = [pl.col(c).is_null().alias(f"nulls:{c}") for c in counted]
    # A null inside a list or struct the prompt reads counts as that column's null (input.nulls).
    nested = {c: _nested_null(pl.col(c), schema[c]) for c in prompt_columns}
    exprs += [
        (pl.col(c).is_null() | inside.fill_null(False)).alias(f"nulls:{c}")
        for c, inside in nested.items()
        if inside is not None
    ]
    exprs = list({e.meta.output_name(): e for e in exprs}.values())  # the nested check replaces the plain one
    if id_column is not None:
        exprs.append(pl.col(id_column).cast(pl.String).hash().alias("ids"))
    try:
        flags = whole.select(exprs).collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageError(_unreadable(paths, job.spec.input.limit, where, exc)) from None
    stats: dict[str, Any] = {"rows": flags.height}
    stats.update({f"nulls:{c}": int(flags.get_column(f"nulls:{c}").sum()) for c in counted})
    if prompt_columns:
        stats["null_rows"] = flags.select(pl.any_horizontal(f"nulls:{c}" for c in prompt_columns).sum()).item()
    if id_column is not None:
        stats["ids"] = flags.get_column("ids").n_unique()
    return stats


def _nested_null(expr: pl.Expr, dtype: Any) -> pl.Expr | None:
    """True where a list or struct value holds a null somewhere inside it; None for a flat column."""
    if isinstance(dtype, pl.Array):
        return _nested_null(expr.arr.to_list(), pl.List(dtype.inner))
    if isinstance(dtype, pl.List):
        inner = _nested_null(pl.element(), dtype.inner)
        element = pl.element().is_null() if inner is None else pl.element().is_null() | inner.fill_null(False)
        return expr.list.eval(element).list.any()
    if isinstance(dtype, pl.Struct):
        flags = []
        for field in dtype.fields:
            value = expr.struct.field(field.name)
            inner = _nested_null(value, field.dtype)
            flags.append(value.is_null() if inner is None else value.is_null() | inner.fill_null(False))
        return expr.is_not_null() & pl.any_horizontal(flags) if flags else None
    return None


def _unreadable(paths: list[Path], limit: int | None, where: str, exc: BaseException) -> str:
    """Name the input file that cannot be read (the error path only: each file is read again)."""
    for path in paths:
        frame = _scan(path, where)
        if limit is not None:
            frame = frame.head(limit)
        try:
            frame.select(pl.all().null_count()).collect(engine="streaming")
        except (pl.exceptions.PolarsError, OSError) as one:
            problem = first_line(one)
            not_utf8 = _not_utf8(path, where)
            if not_utf8:
                return not_utf8
            if "more fields than" in problem:
                return (
                    f"{where}: input.paths: {path}: a row has more fields than the header ({problem}); "
                    "quote fields that contain the separator, or fix the row"
                )
            return f"{where}: input.paths: {path}: cannot read input ({problem})"
    return f"{where}: input.paths: cannot read input ({first_line(exc)})"


def _check_ids(frame: pl.LazyFrame, id_column: str, stats: dict[str, Any], where: str) -> None:
    """Every row needs an id, and no two rows the same one (two answers under one id are a lost answer)."""
    nulls = stats[f"nulls:{id_column}"]
    if nulls:
        raise UsageError(f"{where}: input.id_column: {nulls} rows have no {id_column}; fill or drop them")
    if stats["ids"] == stats["rows"]:
        return
    repeated = (
        frame.select(pl.col(id_column).cast(pl.String).alias("id"))
        .with_row_index("pos")
        .group_by("id")
        .agg(pl.len().alias("n"), pl.col("pos").min().alias("first"))
        .filter(pl.col("n") > 1)
        .select(pl.len().alias("ids"), pl.col("id").sort_by("first").first(), pl.col("n").sort_by("first").first())
    )
    try:
        count, example, times = repeated.collect(engine="streaming").row(0)
    except pl.exceptions.PolarsError as exc:
        raise UsageError(f"{where}: input.paths: cannot read input ({first_line(exc)})") from None
    if count:
        raise UsageError(
            f"{where}: input.id_column: {count} {id_column} values appear on more than one row "
            f"(e.g. {example!r}, {times} times); ids must be distinct: fix the input, or drop "
            "input.id_column to key rows by their content"
        )


def _check_nulls(prompt_columns: tuple[str, ...], stats: dict[str, Any], where: str) -> None:
    """`input.nulls: error`: refuse, before sending anything, a job whose prompt would read a null."""
    per_column = {c: stats[f"nulls:{c}"] for c in prompt_columns if stats[f"nulls:{c}"]}
    if not per_column:
        return
    detail = ", ".join(f"{c!r} in {n}" for c, n in per_column.items())
    raise UsageError(
        f"{where}: input.nulls: {stats['null_rows']} rows have a null in (or inside: a list element, a struct "
        f"field) a column the prompt uses ({detail}); "
        "fill them, or set input.nulls: skip (record those rows as failed, unsent) or input.nulls: empty "
        "(render a null as '')"
    )


def _spaced_hint(columns: list[str]) -> str:
    """A column whose name is not an identifier cannot be a template variable; say how to use it."""
    odd = [c for c in columns if not c.isidentifier()]
    if not odd:
        return ""
    return f" (a column named like {odd[0]!r} is not a template variable: rename it in the input)"


_TEXT_FORMATS = (".csv", ".jsonl", ".ndjson")


def _not_utf8(path: Path, where: str) -> str | None:
    """The one line for a CSV or JSONL input that is not UTF-8 (a Latin-1 or Windows export), naming the
    first line and byte that are not; None when it all decodes (the error path only: it reads the file)."""
    if path.suffix not in _TEXT_FORMATS:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with contextlib.suppress(OSError), open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as bad:  # bad.object: the bytes held back from the last chunk, then this
                line += bytes(bad.object).count(b"\n", 0, bad.start)
                return (
                    f"{where}: input.paths: {path}, line {line}: not UTF-8 text (byte 0x{bad.object[bad.start]:02x}); "
                    "save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
                )
            if not chunk:
                return None
            line += chunk.count(b"\n")
    return None


def _bad_json_line(path: Path) -> str:
    """ ", line N" for the first line of a JSONL file that is not JSON (polars names only a character)."""
    if path.suffix not in (".jsonl", ".ndjson"):
        return ""
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                return f", line {number}"
    return ""


def _scan(path: object, where: str) -> pl.LazyFrame:
    p = str(path)
    if p.endswith(".csv"):
        return pl.scan_csv(p, infer_schema=False)
    if p.endswith((".jsonl", ".ndjson")):
        # Types from every line (None), not the first 100: a later line with a wider type would fail mid-run.
        return pl.scan_ndjson(p, infer_schema_length=None)
    return pl.scan_parquet(p)


def _require(wanted: list[str], columns: list[str], where: str, key: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UsageError(
            f"{where}: {key}: no column {', '.join(missing)} in the input; input columns are {', '.join(columns)}"
        )
