"""Sample keys as columns: a row asked k times (`output.samples: k`) has one request line per sample,
keyed as `runner.job.prompts.sample_key` keys them."""

from __future__ import annotations

import polars as pl

from runner.job.prompts import SAMPLE_MARK
from runner.records import KEY

SAMPLE = "_sample"  # the sample's index within its row


def expand_samples(rows: pl.LazyFrame, samples: int) -> pl.LazyFrame:
    """One line per (row, sample): each row's key becomes its samples' keys."""
    keys = [pl.col(KEY), *(pl.col(KEY) + f"{SAMPLE_MARK}{i}" for i in range(1, samples))]
    return rows.with_columns(pl.concat_list(keys).alias(KEY), pl.int_ranges(0, samples).alias(SAMPLE)).explode(
        [KEY, SAMPLE]
    )
