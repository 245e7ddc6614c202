"""Samples and the majority vote (`output.samples: k`): a row asked k times becomes one answer (the
rules: docs/decisions.md, "Samples and the vote")."""

from __future__ import annotations

import polars as pl

from runner.columns import AGREEMENT, BILLED_COLUMNS, SAMPLE_ANSWERS
from runner.job.inputs import ROW
from runner.job.prompts import SAMPLE

# Counted once per request, so a row's figure is the sum over its samples.
SUMMED = (*BILLED_COLUMNS, "attempts", "repairs")
# A sum widens integers; keep the result schema's types.
_SUMMED_TYPES: dict[str, pl.DataType] = {"attempts": pl.Int32(), "repairs": pl.Int32()}

_ANSWER, _VOTES, _FIRST = "_answer", "_votes", "_first"
_WINNER, _WIN_VOTES, _FIRST_ERROR, _FIRST_INVALID, _PICK = "_winner", "_win_votes", "_ferr", "_finv", "_pick"


def vote(lines: pl.LazyFrame, samples: int) -> pl.LazyFrame:
    """One line per row from one line per (row, sample) joined with the samples' results."""
    status = pl.col("status")
    lines = lines.with_columns(pl.when(status == "ok").then(pl.col("parsed_json")).alias(_ANSWER))
    # Each distinct answer's votes, and the earliest sample that gave it; the best of them wins.
    winners = (
        lines.filter(pl.col(_ANSWER).is_not_null())
        .group_by(ROW, _ANSWER)
        .agg(pl.len().alias(_VOTES), pl.col(SAMPLE).min().alias(_FIRST))
        .group_by(ROW)
        .agg(
            pl.col(_FIRST).sort_by([_VOTES, _FIRST], descending=[True, False]).first().alias(_WINNER),
            pl.col(_VOTES).max().alias(_WIN_VOTES),
        )
    )
    per_row = lines.group_by(ROW).agg(
        *(pl.when(pl.col(c).is_not_null().any()).then(pl.col(c).sum()).alias(c) for c in SUMMED),
        pl.col(SAMPLE).filter(status == "error").min().alias(_FIRST_ERROR),
        pl.col(SAMPLE).filter(status == "invalid").min().alias(_FIRST_INVALID),
        pl.col(_ANSWER).sort_by(SAMPLE).alias(SAMPLE_ANSWERS),
    )
    # The sample that speaks for the row: the first failed one, else the winner, else the first invalid.
    chosen = (
        per_row.join(winners, on=ROW, how="left")
        .with_columns(pl.coalesce(_FIRST_ERROR, _WINNER, _FIRST_INVALID, pl.lit(0, pl.Int64)).alias(_PICK))
        .with_columns((pl.col(_WIN_VOTES) / samples).alias(AGREEMENT))
    )
    speaker = lines.drop(*SUMMED, _ANSWER)
    voted = speaker.join(
        chosen.select(ROW, _PICK, *SUMMED, AGREEMENT, SAMPLE_ANSWERS),
        left_on=[ROW, SAMPLE],
        right_on=[ROW, _PICK],
        how="inner",
    )
    failed_sample = pl.format("sample {} of {}: {}", pl.col(SAMPLE) + 1, pl.lit(samples), pl.col("error_message"))
    return voted.with_columns(
        pl.when(status == "error").then(failed_sample).otherwise(pl.col("error_message")).alias("error_message"),
        *(pl.col(c).cast(dtype) for c, dtype in _SUMMED_TYPES.items()),
    ).drop(SAMPLE)
