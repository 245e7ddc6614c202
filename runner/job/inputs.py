"""Input rows: Parquet and CSV files read lazily by polars and handed out in bounded batches.

    source = open_input(job)          # checks files, columns, ids and emptiness; reads no more than that
    for frame in source.batches():    # DataFrames of at most `batch_rows` rows, in input order
        ...

Every batch carries `_row` (the row's position in the whole input) and `_id` (the id column as text, or a
stable hash of the row's content) beside the columns the job uses. CSV is read as text so that a surprise
at row five million cannot change a column's type mid-run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import polars as pl

from runner.errors import UsageError
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

    def batches(self, batch_rows: int = 10_000) -> Iterator[pl.DataFrame]:
        """Yield the input in order, `batch_rows` at a time, with `_row` and `_id` added."""
        offset = 0
        for chunk in self.frame.collect_batches(chunk_size=batch_rows, maintain_order=True):
            if chunk.height == 0:
                continue
            chunk = chunk.with_columns(pl.int_range(offset, offset + chunk.height, dtype=pl.UInt64).alias(ROW))
            offset += chunk.height
            yield chunk.with_columns(self.ids(chunk))

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
    """Scan the job's input files and check, before any request, that the job can read what it needs."""
    spec = job.spec.input
    where = str(job.spec_path)
    frames = [_scan(p, where) for p in job.input_paths]
    try:
        schemas = [f.collect_schema() for f in frames]
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageError(f"{where}: input.paths: cannot read input ({_first_line(exc)})") from None
    columns = list(schemas[0].names())
    for path, schema in zip(job.input_paths[1:], schemas[1:], strict=True):
        if list(schema.names()) != columns:
            raise UsageError(
                f"{where}: input.paths: {path.name} has columns {list(schema.names())}, "
                f"but {job.input_paths[0].name} has {columns}; all inputs need the same columns"
            )

    available = set(spec.columns) if spec.columns is not None else set(columns)
    if spec.columns is not None:
        _require(spec.columns, columns, where, "input.columns")
    template_vars = job.template.variables | (job.system.variables if job.system else frozenset())
    missing = sorted(template_vars - available)
    if missing:
        raise UsageError(
            f"{where}: prompt: the template uses {', '.join(missing)}, which "
            f"{'input.columns does not list' if spec.columns is not None else 'the input does not have'}; "
            f"input columns are {', '.join(columns)}"
        )
    _require(job.spec.output.keep_columns, columns, where, "output.keep_columns")
    if spec.id_column is not None:
        _require([spec.id_column], columns, where, "input.id_column")
    keep = list(job.spec.output.keep_columns)
    shape = job.shape
    if job.spec.eval is not None:  # the gold answers travel to the output, for the quality report
        gold = [job.spec.eval.gold_column] if job.spec.eval.gold_column else []
        _require(gold, columns, where, "eval.gold_column")
        _require(list(job.spec.eval.gold_fields.values()), columns, where, "eval.gold_fields")
        unknown = sorted(set(job.spec.eval.gold_fields) - set(shape.fields if shape else ()))
        if unknown:
            raise UsageError(f"{where}: eval.gold_fields: {unknown[0]!r} is not a field of output.schema")
        keep += [c for c in [*gold, *job.spec.eval.gold_fields.values()] if c not in keep]
    clash = sorted(set(shape.fields if shape else ()) & (set(keep) | {"id"}))
    if clash:
        raise UsageError(
            f"{where}: output: the answer field {clash[0]!r} has the name of a column kept in the output; "
            "rename the input column or leave it out of output.keep_columns / eval.gold_column"
        )

    id_cols = {spec.id_column} if spec.id_column is not None else set()
    used = sorted(template_vars | set(keep) | id_cols)
    frame = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    frame = frame.select(used)
    if spec.limit is not None:
        frame = frame.head(spec.limit)

    try:
        if frame.head(1).collect().height == 0:
            raise UsageError(f"{where}: input.paths: the input has no rows; nothing to do")
        if spec.id_column is not None:
            nulls = frame.select(pl.col(spec.id_column).is_null().sum()).collect().item()
            if nulls:
                raise UsageError(f"{where}: input.id_column: {nulls} rows have no {spec.id_column}; fill or drop them")
    except pl.exceptions.PolarsError as exc:
        raise UsageError(f"{where}: input.paths: cannot read input ({_first_line(exc)})") from None

    return InputSource(frame, tuple(used), tuple(keep), spec.id_column)


def _scan(path: object, where: str) -> pl.LazyFrame:
    p = str(path)
    if p.endswith(".csv"):
        return pl.scan_csv(p, infer_schema=False)
    return pl.scan_parquet(p)


def _require(wanted: list[str], columns: list[str], where: str, key: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UsageError(
            f"{where}: {key}: no column {', '.join(missing)} in the input; input columns are {', '.join(columns)}"
        )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
