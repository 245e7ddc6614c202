"""The job's input as a Ray dataset of blocks, read and numbered by the local engine's own
`InputSource.batches`, so rows, `_row` positions and keys are the local engine's."""

from __future__ import annotations

from typing import Any

import polars as pl
import ray
import ray.data

from runner.job.inputs import InputSource


def read_rows(source: InputSource, rows_total: int, block_rows: int) -> tuple[ray.data.Dataset, int]:
    """The input's used columns plus `_row`, in blocks of at most `block_rows` rows (a block is what one
    actor call sends: small blocks spread over every actor), each put in the object store as it is read;
    and how many blocks."""
    blocks: list[Any] = []  # refs of the numbered blocks, in input order
    read = 0
    for chunk in source.batches(block_rows, ids=False):  # the actors add `_id` (a hash per row), in parallel
        blocks.append(ray.put(chunk.to_arrow(compat_level=pl.CompatLevel.oldest())))
        read += chunk.height
    if read != rows_total:  # the input changed since it was counted: positions would join the wrong rows
        raise RuntimeError(f"read {read} input rows where {rows_total} were counted; positions would differ")
    return ray.data.from_arrow_refs(blocks), len(blocks)
