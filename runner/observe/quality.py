"""Quality against gold labels: accuracy, per-label precision/recall/F1, a confusion matrix, invalid rate.
Rows without gold are left out; an invalid or failed answer counts as wrong (under "(invalid)")."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import polars as pl

from runner.columns import GOLD_SUFFIX, OUTPUT_COLUMNS, SAMPLE_ANSWERS, VOTE_COLUMNS
from runner.errors import UsageError
from runner.job.resolve import Job
from runner.job.structured import AnswerShape
from runner.jsonrecord import ABSENT
from runner.observe.runstats import OutputFile
from runner.observe.summary import FieldMatch, LabelScore, Metrics, Quality, Voting

INVALID = "(invalid)"
OTHER = "(other)"  # gold values outside the label set, as one row of the confusion matrix
NOTE_VALUES = 5  # gold values named in a note, at most


def _norm(text: str) -> str:
    """A label as compared after normalising: case folded, runs of white space as one space, trimmed."""
    return " ".join(text.split()).casefold()


def label_metrics(frame: pl.DataFrame, *, predicted: str, gold: str, labels: Sequence[str] | None = None) -> Metrics:
    """Metrics of a single-label column against a gold column, over the label set (`labels`, else the
    labels predicted): gold that matches a label after normalising case and space counts as it, other
    gold as OTHER, each with a note. The matrix is at most (labels + 1) x (labels + 2)."""
    rows = frame.filter(pl.col(gold).is_not_null()).select(
        pl.col(gold).cast(pl.String).alias("gold"),
        pl.when(pl.col("status") == "ok").then(pl.col(predicted).cast(pl.String)).otherwise(None).alias("pred"),
    )
    n = rows.height
    known = list(labels) if labels else sorted(rows.get_column("pred").drop_nulls().unique().to_list())
    exact, by_norm = set(known), dict[str, str]()
    for label in known:
        by_norm.setdefault(_norm(label), label)
    mapping: dict[str, str] = {}
    normalised: list[tuple[str, str, int]] = []
    unmatched: list[tuple[str, int]] = []
    for value, count in rows.group_by("gold").len().sort(["len", "gold"], descending=[True, False]).iter_rows():
        if value in exact:
            mapping[value] = value
        elif _norm(value) in by_norm:
            mapping[value] = by_norm[_norm(value)]
            normalised.append((value, mapping[value], count))
        else:
            mapping[value] = OTHER
            unmatched.append((value, count))
    pred = pl.col("pred")
    counted = (
        rows.select(
            pl.col("gold").replace_strict(mapping, return_dtype=pl.String),
            pl.when(pred.is_null())
            .then(pl.lit(INVALID))
            .when(pred.is_in(known))
            .then(pred)
            .otherwise(pl.lit(OTHER))
            .alias("pred"),
        )
        .group_by("gold", "pred")
        .len()
    )
    golds = [*known, *([OTHER] if unmatched else [])]
    columns = [*known, *([OTHER] if OTHER in counted.get_column("pred").to_list() else []), INVALID]
    confusion = {g: dict.fromkeys(columns, 0) for g in golds}
    for g, p, count in counted.iter_rows():
        confusion[g][p] += count
    per_label = {}
    for label in known:
        tp = confusion[label][label]
        support = sum(confusion[label].values())
        predicted_as = sum(row[label] for row in confusion.values())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = LabelScore(round(precision, 4), round(recall, 4), round(f1, 4), support)
    correct = sum(confusion[label][label] for label in known)
    invalid = sum(row[INVALID] for row in confusion.values())
    return Metrics(
        rows_with_gold=n,
        accuracy=round(correct / n, 4) if n else None,
        invalid_rate=round(invalid / n, 4) if n else None,
        per_label=per_label,
        confusion=confusion,
        predicted_distribution={c: sum(row[c] for row in confusion.values()) for c in columns},
        gold_notes=_gold_notes(normalised, unmatched),
    )


def _gold_notes(normalised: list[tuple[str, str, int]], unmatched: list[tuple[str, int]]) -> tuple[str, ...]:
    """What did not match the label set as written: one line each, naming the commonest few values."""
    notes = []
    if normalised:
        shown = ", ".join(f"{g!r} -> {label!r}" for g, label, _ in normalised[:NOTE_VALUES])
        more = f" and {len(normalised) - NOTE_VALUES} more" if len(normalised) > NOTE_VALUES else ""
        rows = sum(count for *_, count in normalised)
        notes.append(
            f"{rows} gold values match a label only with case or spaces normalised ({shown}{more}); counted as it"
        )
    if unmatched:
        shown = ", ".join(f"{g[:40]!r} ({count})" for g, count in unmatched[:NOTE_VALUES])
        more = f" and {len(unmatched) - NOTE_VALUES} more distinct values" if len(unmatched) > NOTE_VALUES else ""
        rows = sum(count for _, count in unmatched)
        notes.append(
            f"{rows} gold values are not in the label set, counted as {OTHER}: {shown}{more}; "
            "is the gold column the right one?"
        )
    return tuple(notes)


def field_exact_match(frame: pl.DataFrame, gold_fields: dict[str, str]) -> dict[str, FieldMatch]:
    """Per answer field: the share of rows with gold whose answer equals it, compared as text (invalid
    or failed rows miss)."""
    rates: dict[str, FieldMatch] = {}
    for field, gold in gold_fields.items():
        rows = frame.filter(pl.col(gold).is_not_null())
        answer = pl.when(pl.col("status") == "ok").then(pl.col(field).cast(pl.String)).otherwise(None)
        hits = rows.select((answer == pl.col(gold).cast(pl.String)).fill_null(False).sum()).item()
        rates[field] = FieldMatch(rows.height, round(hits / rows.height, 4) if rows.height else None)
    return rates


def summarise(job: Job, shape: AnswerShape) -> Quality:
    """The quality section of a finished structured run: validity, repairs and, with gold, metrics."""
    evaluation = job.spec.eval
    return summarise_output(
        job.output_path,
        label_field=shape.label_field,
        labels=job.spec.output.labels,
        gold=job.gold_columns[evaluation.gold_column] if evaluation and evaluation.gold_column else None,
        gold_fields={f: job.gold_columns[c] for f, c in evaluation.gold_fields.items()} if evaluation else {},
        samples=samples_in(job.output_path),
    )


def samples_in(path: Path, columns: Collection[str] | None = None) -> int:
    """How many samples each row of an output had (its longest `sample_answers`, or 1), read from the
    file so that a report from the spec and one from the output agree."""
    if SAMPLE_ANSWERS not in (pl.read_parquet_schema(path) if columns is None else columns):
        return 1
    longest = pl.scan_parquet(path).select(pl.col(SAMPLE_ANSWERS).list.len().max()).collect().item()
    return max(1, int(longest or 1))


def summarise_file(output: OutputFile, gold: str | None) -> Quality:
    """The quality of an output file on its own (no spec at hand): the label column, the samples and
    (unless `gold` names one) the gold column are read from the file and the summary beside it."""
    path, columns, beside = output.path, output.columns, output.summary
    if not {"repairs", "error_type"} <= set(columns):
        raise UsageError(f"{path}: not a glm-batch output (no status column); give its job spec instead")
    recorded = beside.quality or Quality()  # the quality the run recorded, with gold labels
    gold = gold or recorded.gold_column
    if gold is not None and gold not in columns:
        kept = ", ".join(c for c in columns if c not in (*OUTPUT_COLUMNS, *VOTE_COLUMNS)) or "none"
        raise UsageError(f"{path}: --gold {gold}: no such column; the columns other than glm-batch's: {kept}")
    label_field = next((c for c in ("label", "labels") if c in columns), None)
    if gold is not None and gold == label_field:
        raise UsageError(
            f"{path}: --gold {gold}: that is the answer column; a gold column named like it is carried as "
            f"{gold}{GOLD_SUFFIX}"
        )
    report = summarise_output(  # with the job's label set as its run recorded it
        path,
        label_field=label_field,
        gold=gold,
        gold_fields={},
        samples=samples_in(path, columns),
        labels=recorded.labels,
    )
    if recorded.field_exact_match:  # they need the spec's gold_fields: the ones the run computed are beside the file
        report = replace(report, field_exact_match=recorded.field_exact_match)
    return report


def summarise_output(
    path: Path,
    *,
    label_field: str | None,
    gold: str | None,
    gold_fields: dict[str, str],
    samples: int,
    labels: Sequence[str] | None = None,
) -> Quality:
    """The quality of a structured output file: validity, repairs, and metrics against what is gold."""
    wanted = ["status", "repairs", "error_type"]
    if gold and label_field == "label":
        wanted += ["label", gold]
    wanted += [c for pair in gold_fields.items() for c in pair if c not in wanted]
    if samples > 1:
        wanted.append("agreement")
    frame = pl.read_parquet(path, columns=wanted)
    scored = gold if label_field == "label" else None
    return Quality(
        rows=frame.height,
        valid=int((frame.get_column("status") == "ok").sum()),
        invalid=int((frame.get_column("status") == "invalid").sum()),
        truncated=int((frame.get_column("error_type") == "truncated").sum()),
        repaired=int((frame.get_column("repairs").fill_null(0) > 0).sum()),
        label_field=label_field,
        gold_column=gold,
        labels=tuple(labels) if labels is not None else None,
        metrics=label_metrics(frame, predicted="label", gold=scored, labels=labels) if scored else None,
        field_exact_match=field_exact_match(frame, gold_fields) if gold_fields else None,
        voting=agreement_summary(frame, samples, scored, labels) if samples > 1 else None,
    )


def agreement_summary(
    frame: pl.DataFrame, samples: int, gold: str | None, labels: Sequence[str] | None = None
) -> Voting:
    """How much a sampled job's samples agreed: the mean agreement, the share of unanimous rows and,
    with gold labels, accuracy on unanimous rows against split ones (is low agreement worth a look?)."""
    agreement = frame.get_column("agreement")
    voted = agreement.drop_nulls()
    report = Voting(
        samples_per_row=samples,
        mean_agreement=round(float(voted.mean()), 4) if voted.len() else None,  # type: ignore[arg-type]
        unanimous_rows=int((voted == 1.0).sum()),
        split_rows=int((voted < 1.0).sum()),
        # rows by how many samples gave the winning answer: "3 of 3", "2 of 3", ...; no valid answer last
        agreement_distribution={
            **{f"{v} of {samples}": int(((voted * samples).round() == v).sum()) for v in range(samples, 0, -1)},
            "no answer": agreement.null_count(),
        },
    )
    if gold is None:
        return report
    unanimous, split = (
        label_metrics(frame.filter(agreed), predicted="label", gold=gold, labels=labels).accuracy
        for agreed in (pl.col("agreement") == 1.0, pl.col("agreement") < 1.0)
    )
    return replace(report, accuracy_unanimous=unanimous, accuracy_split=split)


def voting_line(voting: Voting) -> str:
    """One sentence on how a sampled job's samples agreed (for the terminal and the HTML page)."""
    line = (
        f"{voting.samples_per_row} samples a row: mean agreement {voting.mean_agreement}; "
        f"{voting.unanimous_rows} rows unanimous, {voting.split_rows} split"
    )
    if voting.accuracy_unanimous is not ABSENT:
        unanimous, split = ("n/a" if a is None else a for a in (voting.accuracy_unanimous, voting.accuracy_split))
        line += f"; accuracy {unanimous} when unanimous, {split} when split"
    return line


def confusion_svg(metrics: Metrics) -> str:
    """The confusion matrix as an inline SVG heat map: gold down, predicted across, darker for more;
    the counts in white on the dark cells and in black on the light ones."""
    confusion = metrics.confusion
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
