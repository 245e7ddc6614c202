"""Assemble the output: every input row joined with its answer, in input order, as one lazy frame.
Memory stays bounded by a key bucket and a row range, not by the job; only the first row with a
request key carries its `cost` (the others name it in `reused_from`), so `sum(cost)` is what was paid."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from runner.columns import OUTPUT_COLUMNS, REUSED_FROM, VOTE_COLUMNS
from runner.job.inputs import ID, ROW
from runner.output import voting
from runner.output.sinks import ROW_GROUP_ROWS, ParquetSink
from runner.records import KEY, scan_results
from runner.state.rowmap import file_identities
from runner.state.store import Buckets, Store

OUTPUT_CHUNK_ROWS = 50_000  # rows put in order at a time when writing the output


@dataclass(frozen=True)
class OutputShape:
    """What the output's columns are: the id's name, typed answer fields, and how many samples a row has."""

    id_name: str = "id"
    fields: dict[str, pl.DataType] = field(default_factory=dict)
    samples: int = 1


def finalize(store: Store, sink: ParquetSink, shape: OutputShape) -> dict[str, int]:
    """Write the output through `sink` from the store's answers; return the rows per status.

    An output the sink already holds from this very state (same row map, same answers) is left as it
    is, so re-running a finished job rewrites nothing. When every row of a sealed map is answered ok,
    the map's cover record says so, and the next run over unchanged inputs reads no key at all."""
    parts = store.compact_results()
    basis = {"row_map": store.rows.fingerprint(), "parts": [p.name for p in parts]}
    counts = sink.current_counts(basis) if basis["row_map"] is not None else None
    if counts is None:
        with assembled(store, parts, shape) as frame:
            counts = sink.write(frame, basis)
    if basis["row_map"] is not None and shape.samples == 1 and set(counts) == {"ok"}:
        # Each row's status is its key's answer (ok over an error, when compacted): all ok means
        # every key has an ok answer in these parts, settled with or without --retry-failed.
        store.rows.record_cover(file_identities(parts), [False, True], shape.samples)
    return counts


@contextlib.contextmanager
def assembled(store: Store, parts: list[Path], shape: OutputShape) -> Iterator[pl.LazyFrame]:
    """The output as a lazy frame over temporary row-range files, removed when the block ends."""
    scratch = store.state_dir
    rows = store.rows.scan()
    kept = [c for c in rows.collect_schema().names() if c not in (ROW, ID, KEY)]
    lines = store.rows.request_lines(shape.samples)
    answers = scan_results(parts)
    buckets = Buckets.for_rows(int(answers.select(pl.len()).collect().item()))
    pieces: list[Path] = []
    ranges: list[Path] = []
    try:
        for b in range(buckets.count):
            piece = scratch / f"output-{b:03d}.parquet.tmp"
            share = answers.filter(buckets.member(b))
            joined = lines.filter(buckets.member(b)).join(share, on=KEY, how="left", maintain_order="left")
            joined = _count_money_once(joined)  # every line of a key is in this bucket
            if shape.samples > 1:  # all of a row's samples are in this bucket: vote here
                joined = voting.vote(joined, shape.samples).sort(ROW)  # back in row order, as pieces must be
            joined.sink_parquet(piece, row_group_size=ROW_GROUP_ROWS)
            pieces.append(piece)
        # Each piece is in row order. The output is put together as consecutive row ranges, each read
        # from all pieces (row-group statistics skip the rest), sorted on its own and written to a file
        # of its own, one at a time; the sink then streams those files in order.
        # (merge_sorted, a global sort, or one concat of all ranges each held the whole output.)
        merged = pl.scan_parquet(pieces)
        total = int(rows.select(pl.len()).collect().item())
        for start in range(0, max(total, 1), OUTPUT_CHUNK_ROWS):
            target = scratch / f"range-{start // OUTPUT_CHUNK_ROWS:06d}.parquet.tmp"
            chunk = merged.filter(pl.col(ROW).is_between(start, start + OUTPUT_CHUNK_ROWS - 1)).sort(ROW)
            chunk.sink_parquet(target, row_group_size=ROW_GROUP_ROWS)
            ranges.append(target)
        for piece in pieces:
            piece.unlink()
        pieces = []
        output = pl.scan_parquet(ranges).rename({ID: shape.id_name, KEY: "request_key"})
        # Which API answered: older answers (before the column existed) were all online.
        answered = pl.col("status").is_not_null() & (pl.col("error_type") != "render_error").fill_null(True)
        output = output.with_columns(pl.when(answered).then(pl.col("api").fill_null("online")).alias("api"))
        if shape.fields:  # structured answers: one typed column per top-level field, beside the kept columns
            parsed = pl.col("parsed_json").str.json_decode(pl.Struct(shape.fields)).alias("_parsed")
            output = output.with_columns(parsed).unnest("_parsed")
        voted = VOTE_COLUMNS if shape.samples > 1 else ()
        yield output.select(shape.id_name, *kept, *shape.fields, *voted, *OUTPUT_COLUMNS)
    finally:
        for path in (*pieces, *ranges):
            path.unlink(missing_ok=True)


def _count_money_once(lines: pl.LazyFrame) -> pl.LazyFrame:
    """Keep an answer's cost on the first row that asked for it; the others reused it and say whose."""
    first_row = pl.col(ROW).min().over(KEY)
    payer = pl.col(ID).sort_by(ROW).first().over(KEY)
    reused = pl.col(ROW) != first_row
    return lines.with_columns(
        pl.when(reused).then(pl.lit(0.0)).otherwise(pl.col("cost")).alias("cost"),
        pl.when(reused).then(payer).otherwise(pl.lit(None, pl.String)).alias(REUSED_FROM),
    )
