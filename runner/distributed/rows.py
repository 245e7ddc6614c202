"""The job's input as a Ray dataset of blocks whose rows carry the local engine's `_row` positions, read
through the local engine's own lazy frame, so rows, positions and keys are the local engine's."""

from __future__ import annotations

from typing import Any

import polars as pl
import ray
import ray.data

from runner.job.inputs import ROW, InputSource


def read_rows(source: InputSource, rows_total: int, block_rows: int) -> tuple[ray.data.Dataset, int]:
    """The input's used columns plus `_row`, in blocks of at most `block_rows` rows (a block is what one
    actor call sends: small blocks spread over every actor), each put in the object store as it is read;
    and how many blocks."""
    blocks: list[Any] = []  # refs of the numbered blocks, in input order
    offset = 0
    for chunk in source.frame.collect_batches(chunk_size=block_rows, maintain_order=True):
        if chunk.height == 0:
            continue
        chunk = chunk.with_columns(pl.int_range(offset, offset + chunk.height, dtype=pl.UInt64).alias(ROW))
        blocks.append(ray.put(chunk.to_arrow(compat_level=pl.CompatLevel.oldest())))
        offset += chunk.height
    if offset != rows_total:  # the input changed since it was counted: positions would join the wrong rows
        raise RuntimeError(f"read {offset} input rows where {rows_total} were counted; positions would differ")
    return ray.data.from_arrow_refs(blocks), len(blocks)
