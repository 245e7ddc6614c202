"""The job's input as a Ray dataset whose rows carry the same `_row` position as the local engine's.

    ds = read_rows(job, source, rows_total, block_rows=500)   # Ray Data reads; `_row` from block offsets

The rows counted must equal the rows polars counted, or the run stops (docs/decisions.md, "Ray runs").
"""

from __future__ import annotations

import logging
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import ray
import ray.data
from ray.data.block import BlockAccessor

from runner.job.inputs import ROW, InputSource
from runner.job.resolve import Job


@ray.remote(num_cpus=0.25)
def _number(block: Any, start: int, lo: int, hi: int) -> pa.Table:
    """Rows lo..hi-1 of the block with `_row` (their positions in the whole input) added."""
    table = BlockAccessor.for_block(block).to_arrow().slice(lo, hi - lo)
    return table.append_column(ROW, pa.array(range(start + lo, start + hi), type=pa.uint64()))


def _read(paths: list[str], used: list[str]) -> ray.data.Dataset:
    """One Ray read of files of one kind, with only the columns the job uses."""
    if paths[0].endswith(".csv"):
        # Every column as text, as polars reads it for the local engine (infer_schema=False).
        names = pl.scan_csv(paths[0], infer_schema=False).collect_schema().names()
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True, include_columns=used
        )
        return ray.data.read_csv(paths, convert_options=convert)
    return ray.data.read_parquet(paths, columns=used)


def read_rows(job: Job, source: InputSource, rows_total: int, block_rows: int) -> ray.data.Dataset:
    """The input as a dataset of the used columns plus `_row`, limited as the spec says, in blocks of at
    most `block_rows` (a block is what one actor call sends: small blocks spread over every actor)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # The run's own progress lines say how far it is; Ray Data's bars and plans would repeat them.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    paths = [str(p) for p in job.input_paths]
    used = list(source.used_columns)
    # Files of one kind are one read; a mix is read kind by kind, in the spec's order, and joined end to end.
    groups: list[list[str]] = []
    for path in paths:
        if groups and groups[-1][0].endswith(".csv") == path.endswith(".csv"):
            groups[-1].append(path)
        else:
            groups.append([path])
    reads = [_read(group, used) for group in groups]
    ds = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    ds = ds.select_columns(used)
    if job.spec.input.limit is not None:
        ds = ds.limit(job.spec.input.limit)
    numbered: list[Any] = []  # refs of the numbered blocks, in input order
    offset = 0
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            rows = entry.metadata.num_rows
            if rows is None:
                rows = BlockAccessor.for_block(ray.get(entry.ref)).num_rows()
            for lo in range(0, rows, block_rows):
                numbered.append(_number.remote(entry.ref, offset, lo, min(rows, lo + block_rows)))
            offset += rows
    if offset != rows_total:
        raise RuntimeError(f"Ray read {offset} input rows where polars counted {rows_total}; positions would differ")
    return ray.data.from_arrow_refs(numbered)
