"""`glm-batch report`: what a finished run did and, with gold labels, how good its answers were (the HTML
page: runner.observe.report_html)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from runner.columns import AGREEMENT, OUTPUT_COLUMNS, VOTE_COLUMNS
from runner.job.resolve import Job
from runner.observe import quality
from runner.observe.runstats import open_output, run_figures
from runner.observe.summary import Quality, Summary

EXAMPLES_SHOWN = 50  # wrong answers listed on the page; the count says how many there are in all
REPAIRED_MEANS = (
    "repaired: the first answer did not validate against the job's schema (or labels), so it was asked "
    "again in a follow-up turn quoting what was wrong; every turn's tokens are counted"
)


@dataclass(frozen=True)
class Section:
    """A part of the report worded above this layer (a cascade's: runner.cascade.record): its lines,
    and counts drawn as bars on the page."""

    lines: list[str]
    bars: dict[str, int]


@dataclass
class Report:
    """Everything `glm-batch report` shows about one output: the run, and quality when it has any."""

    name: str
    output: Path
    summary: Summary  # the summary beside the output
    run: dict[str, Any]  # runner.observe.runstats.run_figures
    quality: Quality | None  # None: a free-text job (no labels, no schema)
    examples: dict[str, Any] | None  # the wrong answers with their context; None without gold
    cascade: Section | None = None  # a cascade's part (runner.cascade.record.report_section)


def load_report(output: Path, *, job: Job | None = None, gold: str | None = None) -> Report:
    """The report of an output file, with its job's spec when there is one (for the schema's fields
    and `eval.gold_fields`). `gold` names the gold column of an output given alone (else the summary's)."""
    opened = open_output(output)
    columns, beside = opened.columns, opened.summary
    figures = run_figures(opened)
    found: Quality | None = None
    fields: tuple[str, ...] = ()
    gold_fields: dict[str, str] = {}
    if job is not None and job.shape is not None:
        found = quality.summarise(job, job.shape)
        fields = tuple(job.shape.fields)
        gold_fields = {f: job.gold_columns[c] for f, c in job.spec.eval.gold_fields.items()} if job.spec.eval else {}
    elif job is None and ({"label", "labels"} & set(columns) or gold or beside.quality):
        found = quality.summarise_file(opened, gold)
        fields = (found.label_field,) if found.label_field else ()
    name = job.name if job is not None else output.stem
    return Report(name, output, beside, figures, found, _examples(output, columns, found, fields, gold_fields))


def _examples(
    output: Path, columns: list[str], found: Quality | None, fields: tuple[str, ...], gold_fields: dict[str, str]
) -> dict[str, Any] | None:
    """The rows whose answer differs from the gold one (or is invalid), with the kept input columns."""
    if found is None:
        return None
    pairs = dict(gold_fields)
    if found.gold_column and found.label_field == "label":
        pairs["label"] = found.gold_column
    if not pairs:
        return None
    golds = set(pairs.values())
    ours = {*OUTPUT_COLUMNS, *VOTE_COLUMNS, "status", "error_type", *fields, *pairs, *golds}
    context = [c for c in columns[1:] if c not in ours]
    wrong = pl.lit(False)
    for answer, truth in pairs.items():
        given: pl.Expr = pl.when(pl.col("status") == "ok").then(pl.col(answer).cast(pl.String))
        if answer == "label":  # compared as the metrics compare them: case and spaces normalised
            given, expected = _normalised(given), _normalised(pl.col(truth).cast(pl.String))
        else:
            expected = pl.col(truth).cast(pl.String)
        wrong = wrong | (pl.col(truth).is_not_null() & (given != expected).fill_null(True))
    keep = [columns[0], *context, *(c for pair in pairs.items() for c in pair), "status", "error_type"]
    if AGREEMENT in columns:
        keep.append(AGREEMENT)
    frame = pl.scan_parquet(output).select(*dict.fromkeys(keep)).filter(wrong).collect()
    return {
        "total": frame.height,
        "id_column": columns[0],
        "context": context,
        "pairs": pairs,
        "rows": frame.head(EXAMPLES_SHOWN).to_dicts(),
    }


LABELS_SHOWN = 30  # rows of the per-label table printed on a terminal (the HTML page has every label)
MATRIX_COLUMNS_SHOWN = 12  # a wider confusion matrix is drawn only in the HTML page


def print_report(found: Report, console: Console) -> None:
    """The report on a terminal: the run in a few lines, then quality as `glm-batch report` always printed it."""
    run = found.run
    tokens = run["tokens"]
    cost = "no prices" if run["cost"] is None else f"{run['cost']:.6f} {run['currency'] or ''}".rstrip()
    latency = run["latency"]
    console.print(
        f"{found.name}: model {run['model']}, run {run['run_id']} ({run['date']}); "
        f"{run['rows']} rows: " + ", ".join(f"{n} {status}" for status, n in run["by_status"].items())
    )
    console.print(
        f"tokens {tokens['input']:,} in / {tokens['output']:,} out; cost {cost}; latency p50 "
        f"{_ms(latency['p50'])}, p99 {_ms(latency['p99'])}"
    )
    if run["errors"]:
        console.print("errors: " + ", ".join(f"{kind} {n}" for kind, n in run["errors"].items()))
    if found.cascade is not None:
        for line in found.cascade.lines:
            console.print(line, soft_wrap=True)
    scores = found.quality  # the quality report (runner.observe.quality)
    if scores is None:
        return
    console.print(
        f"{found.name}: {scores.rows} rows, {scores.valid} valid, {scores.invalid} invalid "
        f"({scores.truncated} truncated), {scores.repaired} repaired"
    )
    if scores.voting is not None:
        console.print(quality.voting_line(scores.voting))
    for field, rate in (scores.field_exact_match or {}).items():
        if rate.exact_match is not None:
            console.print(f"{field}: exact match {rate.exact_match:.4f} on {rate.rows_with_gold} rows with gold")
    metrics = scores.metrics
    if metrics is None:
        if not scores.field_exact_match:
            console.print(
                "no gold labels: set eval.gold_column (and output.labels) or eval.gold_fields (output.schema), "
                "or pass --gold COLUMN with an output file, for accuracy and F1"
            )
        return
    accuracy = "n/a" if metrics.accuracy is None else f"{metrics.accuracy:.4f}"
    console.print(f"accuracy {accuracy} on {metrics.rows_with_gold} rows with a gold label")
    for note in metrics.gold_notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    per_label = list(metrics.per_label.items())
    table = Table("label", "precision", "recall", "F1", "support")
    for label, m in per_label[:LABELS_SHOWN]:
        table.add_row(label, f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.f1:.3f}", str(m.support))
    console.print(table)
    if len(per_label) > LABELS_SHOWN:
        console.print(f"... and {len(per_label) - LABELS_SHOWN} more labels (all of them: --html FILE)")
    columns = list(next(iter(metrics.confusion.values()), {}))
    if len(columns) > MATRIX_COLUMNS_SHOWN:
        console.print(f"confusion matrix: {len(columns)} columns, too wide to print; see it with --html FILE")
        return
    matrix = Table("gold \\ predicted", *columns, title="confusion matrix")
    for truth, row in metrics.confusion.items():
        matrix.add_row(truth, *(str(row[c]) for c in columns))
    console.print(matrix)


def _normalised(text: pl.Expr) -> pl.Expr:
    """Text as runner.observe.quality compares labels: lower case, runs of white space as one, trimmed."""
    return text.str.replace_all(r"\s+", " ").str.strip_chars().str.to_lowercase()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
