"""What a job's earlier answers say about its next requests: the input-token calibration and the
output-token model an estimate uses (a real endpoint's estimate never learns from simulated answers)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from runner.files import recorded_runs
from runner.job.resolve import Job
from runner.job.thinking import ASSUMED_REASONING_TOKENS
from runner.money.tokens import Calibration
from runner.records import RESULT_SCHEMA, scan_results

MIN_SAMPLES = 5  # answers needed before measured output lengths replace the assumption


@dataclass(frozen=True)
class OutputModel:
    """Output tokens per request: an expected value with a low/high band, and what it rests on."""

    low: float
    expected: float
    high: float
    basis: str
    latency_s: float | None


def earlier_answers(parts: list[Path], job: Job) -> pl.DataFrame:
    """Ok answers this job already has for this model from this endpoint (runs the manifest records as
    sent there): a real endpoint's estimate never learns from the simulator's, nor the reverse."""
    recorded = recorded_runs(job.state_dir, RecordedRun)
    runs = [run.run_id for run in recorded if run.endpoint == job.endpoint_name and run.run_id is not None]
    if not parts or not runs:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    return (
        scan_results(parts)
        .filter(pl.col("status") == "ok", pl.col("model") == job.spec.model.name, pl.col("run_id").is_in(runs))
        .select("input_tokens", "cache_read_input_tokens", "output_tokens", "est_input_tokens", "latency_ms")
        .collect()
    )


@dataclass(frozen=True)
class RecordedRun:
    """What an estimate reads of a run the manifest records (the fields of its runner.observe.summary.Summary)."""

    run_id: str | None = None
    endpoint: str | None = None


def calibration_from(answers: pl.DataFrame) -> Calibration | None:
    measured = answers.filter(pl.col("est_input_tokens") > 0)
    if measured.height < MIN_SAMPLES:
        return None
    return Calibration.measured(measured, measured.height, "this job")


def output_model(answers: pl.DataFrame, max_tokens: int, thinks: bool = False) -> OutputModel:
    """Output tokens per request, from earlier answers when there are enough (their reasoning included),
    else an assumption: half of max_tokens, plus ASSUMED_REASONING_TOKENS when the model will think."""
    if answers.height >= MIN_SAMPLES:
        out = [float(v) for v in answers.get_column("output_tokens").to_list()]
        mean = statistics.fmean(out)
        half_width = 1.96 * statistics.stdev(out) / math.sqrt(len(out))
        latency = answers.get_column("latency_ms").drop_nulls()
        return OutputModel(
            low=max(0.0, mean - half_width),
            expected=mean,
            high=min(float(max_tokens), mean + half_width),
            basis=f"mean of {len(out)} measured answers, 95% interval of the mean",
            latency_s=float(latency.median()) / 1000 if latency.len() else None,  # type: ignore[arg-type]
        )
    expected, basis = max_tokens / 2, "assumed: half of max_tokens (no answers yet; run with --pilot N to measure)"
    if thinks:  # reasoning is billed as output, and counts against max_tokens
        expected = min(float(max_tokens), expected + ASSUMED_REASONING_TOKENS)
        basis = (
            f"assumed: half of max_tokens plus {ASSUMED_REASONING_TOKENS} reasoning tokens, at most "
            "max_tokens (the model thinks; no answers yet; run with --pilot N to measure)"
        )
    return OutputModel(low=0.0, expected=expected, high=float(max_tokens), basis=basis, latency_s=None)
