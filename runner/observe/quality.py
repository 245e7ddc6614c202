"""Quality against gold labels: accuracy, per-label precision/recall/F1, a confusion matrix, invalid rate.

    metrics = label_metrics(frame, predicted="label", gold="gold")
    report = summarise(job, shape)                  # after a run, from the job's spec
    report = summarise_file(output_path, gold=None) # from an output file alone

Rows without a gold label are left out. A row whose answer was invalid (or failed) counts as wrong
and appears in the confusion matrix under "(invalid)", so the figures never flatter a job that
failed to answer.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from runner.errors import UsageError
from runner.job.resolve import Job
from runner.job.structured import AnswerShape
from runner.output.columns import OUTPUT_COLUMNS, SAMPLE_ANSWERS, VOTE_COLUMNS

INVALID = "(invalid)"


def label_metrics(frame: pl.DataFrame, *, predicted: str, gold: str) -> dict[str, Any]:
    """Metrics of a single-label column against a gold column."""
    rows = frame.filter(pl.col(gold).is_not_null()).select(
        pl.col(gold).cast(pl.String).alias("gold"),
        pl.when(pl.col("status") == "ok").then(pl.col(predicted).cast(pl.String)).otherwise(None).alias("pred"),
    )
    n = rows.height
    golds = rows.get_column("gold").to_list()
    preds = rows.get_column("pred").to_list()
    labels = sorted({*golds, *(p for p in preds if p is not None)})
    per_label = {}
    for label in labels:
        tp = sum(1 for g, p in zip(golds, preds, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(golds, preds, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(golds, preds, strict=True) if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
        }
    columns = [*labels, INVALID]
    confusion = {g: dict.fromkeys(columns, 0) for g in labels}
    for g, p in zip(golds, preds, strict=True):
        confusion[g][p if p is not None else INVALID] += 1
    correct = sum(1 for g, p in zip(golds, preds, strict=True) if g == p)
    invalid = sum(1 for p in preds if p is None)
    return {
        "rows_with_gold": n,
        "accuracy": round(correct / n, 4) if n else None,
        "invalid_rate": round(invalid / n, 4) if n else None,
        "per_label": per_label,
        "confusion": confusion,
        "predicted_distribution": {c: sum(row[c] for row in confusion.values()) for c in columns},
    }


def field_exact_match(frame: pl.DataFrame, gold_fields: dict[str, str]) -> dict[str, Any]:
    """Per answer field: the share of rows with a gold value whose answer equals it exactly.

    Values are compared as text (a gold CSV column is text); invalid or failed rows count as misses.
    """
    rates: dict[str, Any] = {}
    for field, gold in gold_fields.items():
        rows = frame.filter(pl.col(gold).is_not_null())
        answer = pl.when(pl.col("status") == "ok").then(pl.col(field).cast(pl.String)).otherwise(None)
        hits = rows.select((answer == pl.col(gold).cast(pl.String)).fill_null(False).sum()).item()
        rates[field] = {
            "rows_with_gold": rows.height,
            "exact_match": round(hits / rows.height, 4) if rows.height else None,
        }
    return rates


def summarise(job: Job, shape: AnswerShape) -> dict[str, Any]:
    """The quality section of a finished structured run: validity, repairs and, with gold, metrics."""
    evaluation = job.spec.eval
    return summarise_output(
        job.output_path,
        label_field=shape.label_field,
        gold=evaluation.gold_column if evaluation else None,
        gold_fields=evaluation.gold_fields if evaluation else {},
        samples=samples_in(job.output_path),
    )


def samples_in(path: Path) -> int:
    """How many samples each row of an output had: as many as its longest `sample_answers` list, or 1.

    Read from the file, never from a spec, so that a report from the spec and one from the output file
    agree even when the run raised `output.samples` with --set."""
    if SAMPLE_ANSWERS not in pl.read_parquet_schema(path):
        return 1
    longest = pl.scan_parquet(path).select(pl.col(SAMPLE_ANSWERS).list.len().max()).collect().item()
    return max(1, int(longest or 1))


def summarise_file(path: Path, gold: str | None) -> dict[str, Any]:
    """The quality of an output file on its own (no spec at hand): the label column, the samples and
    (unless `gold` names one) the gold column are read from the file and the summary beside it."""
    try:
        columns = pl.read_parquet_schema(path)
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise UsageError(f"{path}: cannot read it as Parquet ({exc}); give a glm-batch output or a job spec") from None
    if not {"status", "repairs", "error_type"} <= columns.keys():
        raise UsageError(f"{path}: not a glm-batch output (no status column); give its job spec instead")
    beside: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        beside = json.loads(path.with_suffix(".summary.json").read_text(encoding="utf-8"))
    gold = gold or (beside.get("quality") or {}).get("gold_column")
    if gold is not None and gold not in columns:
        kept = ", ".join(c for c in columns if c not in (*OUTPUT_COLUMNS, *VOTE_COLUMNS)) or "none"
        raise UsageError(f"{path}: --gold {gold}: no such column; the columns other than glm-batch's: {kept}")
    label_field = next((c for c in ("label", "labels") if c in columns), None)
    report = summarise_output(path, label_field=label_field, gold=gold, gold_fields={}, samples=samples_in(path))
    rates = (beside.get("quality") or {}).get("field_exact_match")
    if rates:  # per-field rates need the spec's gold_fields: the ones the run computed are beside the file
        report["field_exact_match"] = rates
    return report


def summarise_output(
    path: Path, *, label_field: str | None, gold: str | None, gold_fields: dict[str, str], samples: int
) -> dict[str, Any]:
    """The quality of a structured output file: validity, repairs, and metrics against what is gold."""
    wanted = ["status", "repairs", "error_type"]
    if gold and label_field == "label":
        wanted += ["label", gold]
    wanted += [c for pair in gold_fields.items() for c in pair if c not in wanted]
    if samples > 1:
        wanted.append("agreement")
    frame = pl.read_parquet(path, columns=wanted)
    report: dict[str, Any] = {
        "rows": frame.height,
        "valid": int((frame.get_column("status") == "ok").sum()),
        "invalid": int((frame.get_column("status") == "invalid").sum()),
        "truncated": int((frame.get_column("error_type") == "truncated").sum()),
        "repaired": int((frame.get_column("repairs").fill_null(0) > 0).sum()),
        "label_field": label_field,
        "gold_column": gold,
    }
    if gold and label_field == "label":
        report["metrics"] = label_metrics(frame, predicted="label", gold=gold)
    if gold_fields:
        report["field_exact_match"] = field_exact_match(frame, gold_fields)
    if samples > 1:
        report["voting"] = agreement_summary(frame, samples, gold if label_field == "label" else None)
    return report


def agreement_summary(frame: pl.DataFrame, samples: int, gold: str | None) -> dict[str, Any]:
    """How much a sampled job's samples agreed: the mean agreement, the share of unanimous rows and,
    with gold labels, accuracy on unanimous rows against split ones (is low agreement worth a look?)."""
    agreement = frame.get_column("agreement")
    voted = agreement.drop_nulls()
    report: dict[str, Any] = {
        "samples_per_row": samples,
        "mean_agreement": round(float(voted.mean()), 4) if voted.len() else None,  # type: ignore[arg-type]
        "unanimous_rows": int((voted == 1.0).sum()),
        "split_rows": int((voted < 1.0).sum()),
        # rows by how many samples gave the winning answer: "3 of 3", "2 of 3", ...; no valid answer last
        "agreement_distribution": {
            **{f"{v} of {samples}": int(((voted * samples).round() == v).sum()) for v in range(samples, 0, -1)},
            "no answer": agreement.null_count(),
        },
    }
    if gold is not None:
        for name, rows in (
            ("accuracy_unanimous", frame.filter(pl.col("agreement") == 1.0)),
            ("accuracy_split", frame.filter(pl.col("agreement") < 1.0)),
        ):
            report[name] = label_metrics(rows, predicted="label", gold=gold)["accuracy"]
    return report


def voting_line(voting: dict[str, Any]) -> str:
    """One sentence on how a sampled job's samples agreed (for the terminal and the HTML page)."""
    line = (
        f"{voting['samples_per_row']} samples a row: mean agreement {voting['mean_agreement']}; "
        f"{voting['unanimous_rows']} rows unanimous, {voting['split_rows']} split"
    )
    if "accuracy_unanimous" in voting:
        unanimous, split = (
            voting[k] if voting[k] is not None else "n/a" for k in ("accuracy_unanimous", "accuracy_split")
        )
        line += f"; accuracy {unanimous} when unanimous, {split} when split"
    return line


def html_report(title: str, metrics: dict[str, Any], quality: dict[str, Any]) -> str:
    """A small self-contained HTML page: the headline figures, the confusion matrix drawn as a heat
    map, the predicted-label distribution drawn as bars and, for sampled jobs, how many samples agreed
    (inline SVG, no scripts, no network). `glm-batch report` draws the whole run: runner.observe.report_html."""
    parts = [confusion_svg(metrics)]
    agreement = ""
    if "voting" in quality:
        agreement = "<h2>Samples agreeing with the vote</h2>" + bars_svg(
            "agreement", quality["voting"]["agreement_distribution"], "rgb(44,160,44)"
        )
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td><td>{m['f1']:.3f}</td>"
        f"<td>{m['support']}</td></tr>"
        for label, m in metrics["per_label"].items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head>
<body><h1>{esc(title)}</h1>
<p id="headline">accuracy <b>{metrics["accuracy"]:.4f}</b> on {metrics["rows_with_gold"]} rows with a gold label;
invalid answers {100 * metrics["invalid_rate"]:.2f}%; answers repaired {quality.get("repaired", 0)};
truncated {quality.get("truncated", 0)}.</p>
{f'<p id="voting">{esc(voting_line(quality["voting"]))}.</p>' if "voting" in quality else ""}
<h2>Per label</h2><table id="per-label"><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th>
<th>support</th></tr>{rows}</table>
<h2>Confusion matrix</h2>{"".join(parts)}
<h2>Predicted labels</h2>{bars_svg("distribution", metrics["predicted_distribution"], "rgb(255,127,14)")}
{agreement}
</body></html>
"""


def confusion_svg(metrics: dict[str, Any]) -> str:
    """The confusion matrix as an inline SVG heat map: gold down, predicted across, darker for more;
    the counts in white on the dark cells and in black on the light ones."""
    confusion: dict[str, dict[str, int]] = metrics["confusion"]
    golds = list(confusion)
    columns = list(next(iter(confusion.values()))) if confusion else []
    top = max([v for row in confusion.values() for v in row.values()] + [1])
    cell, left, head = 70, 110, 40
    parts = [
        f'<svg id="confusion" xmlns="http://www.w3.org/2000/svg" width="{left + cell * len(columns) + 10}" '
        f'height="{head + cell * len(golds) + 30}" font-family="sans-serif" font-size="13">',
        f'<text x="{left}" y="14">predicted &#8594;</text>',
    ]
    for j, c in enumerate(columns):
        parts.append(f'<text x="{left + j * cell + cell / 2}" y="{head - 8}" text-anchor="middle">{esc(c)}</text>')
    for i, g in enumerate(golds):
        y = head + i * cell
        parts.append(f'<text x="{left - 8}" y="{y + cell / 2 + 4}" text-anchor="end">{esc(g)}</text>')
        for j, c in enumerate(columns):
            n = confusion[g][c]
            shade = 0.08 + 0.85 * n / top
            parts.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="rgb(31,119,180)" fill-opacity="{shade:.2f}"><title>gold {esc(g)}, '
                f"predicted {esc(c)}: {n}</title></rect>"
            )
            ink = "#fff" if shade > 0.5 else "#000"  # white on the dark cells, black on the light ones
            parts.append(
                f'<text x="{left + j * cell + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" '
                f'fill="{ink}">{n}</text>'
            )
    parts.append(f'<text x="4" y="{head + cell * len(golds) + 20}">gold &#8595;</text></svg>')
    return "".join(parts)


def bars_svg(svg_id: str, counts: dict[str, int], colour: str) -> str:
    """A horizontal bar chart as inline SVG: one labelled bar per count, the longest 360 px."""
    biggest = max([*counts.values(), 1])
    bars = [
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="520" height="{28 * len(counts) + 10}" '
        'font-family="sans-serif" font-size="13">'
    ]
    for i, (label, n) in enumerate(counts.items()):
        width = 360 * n / biggest
        bars.append(
            f'<text x="100" y="{28 * i + 19}" text-anchor="end">{esc(label)}</text>'
            f'<rect x="108" y="{28 * i + 6}" width="{width:.1f}" height="18" fill="{colour}"/>'
            f'<text x="{114 + width:.1f}" y="{28 * i + 19}">{n}</text>'
        )
    return "".join(bars) + "</svg>"


def esc(text: object) -> str:
    """Text made safe inside HTML: element content and attribute values."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
