"""Gold labels checked against the label set before scoring: a gold value that differs from a label in
case or spaces counts as that label with a note; one outside the set counts as "(other)" with a note
naming a few; and a free-text column named as gold gives a bounded report (a matrix over the label set
plus "(other)", a capped number of printed lines), quickly."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest

from runner.observe.quality import OTHER, label_metrics
from tests.conftest import cli

LABELS = {"labels": ["positive", "negative"], "keep_columns": []}
REVIEWS = [
    {"id": "1", "text": "Great phone, I love it", "gold": "Positive"},
    {"id": "2", "text": "Terrible battery, broke in a week", "gold": " NEGATIVE "},
    {"id": "3", "text": "The best purchase this year", "gold": "positive"},
    {"id": "4", "text": "Awful support and a bad screen", "gold": "negativ"},
]


def test_gold_labels_in_another_case_are_scored_as_their_label_with_a_note(make_job, tmp_path: Path) -> None:
    job = make_job(REVIEWS, output=LABELS, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0
    page = tmp_path / "r.html"

    result = cli("report", str(job.spec), "--html", str(page))

    assert result.exit_code == 0, result.stderr
    assert "accuracy 0.7500 on 4 rows" in result.stdout  # 3 of 4: "negativ" is no label at all
    assert "2 gold values match a label only with case or spaces normalised" in result.stdout
    assert "'Positive' -> 'positive'" in result.stdout
    assert f"1 gold values are not in the label set, counted as {OTHER}: 'negativ' (1)" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert "match a label only with case or spaces normalised" in html and "negativ" in html
    from_file = cli("report", str(job.output))  # the output alone: the label set comes from its summary
    assert "accuracy 0.7500 on 4 rows" in from_file.stdout


def test_a_free_text_gold_column_gives_a_bounded_matrix_quickly() -> None:
    n = 200_000
    frame = pl.DataFrame(
        {
            "gold": [f"free text answer {i:06d}" for i in range(n)],
            "label": ["positive", "negative"] * (n // 2),
            "status": ["ok"] * n,
        }
    )
    started = time.perf_counter()

    metrics = label_metrics(frame, predicted="label", gold="gold", labels=["positive", "negative"])

    assert time.perf_counter() - started < 10  # hundreds of seconds before, over every distinct value
    assert list(metrics.confusion) == ["positive", "negative", OTHER]
    assert list(metrics.per_label) == ["positive", "negative"]
    assert metrics.accuracy == 0.0
    assert metrics.gold_notes == (
        f"{n} gold values are not in the label set, counted as {OTHER}: 'free text answer 000000' (1), "
        "'free text answer 000001' (1), 'free text answer 000002' (1), 'free text answer 000003' (1), "
        f"'free text answer 000004' (1) and {n - 5} more distinct values; is the gold column the right one?",
    )


def test_the_printed_report_of_a_free_text_gold_column_stays_short(make_job) -> None:
    rows = [{"id": str(i), "text": f"fine review {i}", "notes": f"a note that is free text {i}"} for i in range(120)]
    job = make_job(rows, output={**LABELS, "keep_columns": ["notes"]})
    assert cli("run", str(job.spec)).exit_code == 0

    result = cli("report", str(job.output), "--gold", "notes")

    assert result.exit_code == 0, result.stderr
    assert "120 gold values are not in the label set" in result.stdout
    assert len(result.stdout.splitlines()) < 40


# The shared sentiment data's shape: the gold column is named `label`, like a labels job's answer field.
NEWCOMER_LABELS = {"labels": ["positive", "negative"], "keep_columns": None}
SENTENCES = [
    {"id": "a-1", "text": "Good case, Excellent value.", "label": "positive"},
    {"id": "a-2", "text": "No way to plug it in here unless I buy a converter.", "label": "negative"},
    {"id": "a-3", "text": "Great for the price.", "label": "positive"},
    {"id": "a-4", "text": "It broke on the second day.", "label": "negative"},
]


def test_a_gold_column_named_like_the_answer_is_carried_as_its_gold_and_scored(make_job) -> None:
    # keep_columns left to its default (the prompt's columns), as a newcomer's job has it
    job = make_job(SENTENCES, output=NEWCOMER_LABELS, eval={"gold_column": "label"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert {"text", "label", "label_gold"} <= set(out.columns)
    assert out.get_column("label_gold").to_list() == [r["label"] for r in SENTENCES]
    assert set(out.get_column("label").to_list()) <= {"positive", "negative"}  # the answer, not the gold
    accuracy = (out.get_column("label") == out.get_column("label_gold")).mean()
    for report in (cli("report", str(job.spec)), cli("report", str(job.output))):  # the spec's, the file's
        assert report.exit_code == 0, report.stderr
        assert f"accuracy {accuracy:.4f} on 4 rows" in report.stdout
    wrong = cli("report", str(job.output), "--gold", "label")  # the answer column, named as its own gold
    assert wrong.exit_code == 2 and "label_gold" in wrong.stderr


def test_a_gold_column_carried_under_a_name_the_input_has_is_refused_naming_both(make_job, sim) -> None:
    rows = [{**r, "label_gold": "x"} for r in SENTENCES]
    job = make_job(rows, output=NEWCOMER_LABELS, eval={"gold_column": "label"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 2
    assert "eval: the gold column 'label'" in result.stderr and "'label_gold'" in result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize(("labels", "matrix_printed"), [(11, True), (40, False)])
def test_the_terminal_shows_at_most_30_labels_and_a_matrix_of_at_most_12_columns(
    make_job, labels: int, matrix_printed: bool
) -> None:
    """The matrix is over the label set plus (other): 11 labels make 12 columns, still printed."""
    names = [f"topic{i:02d}" for i in range(labels)]
    rows = [{"id": str(i), "text": f"review {i}", "gold": names[i % labels]} for i in range(labels)]
    job = make_job(rows, output={"labels": names, "keep_columns": []}, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0

    shown = cli("report", str(job.spec)).stdout

    assert ("confusion matrix:" not in shown) is matrix_printed
    assert ("too wide to print; see it with --html FILE" in shown) is not matrix_printed
    printed = [name for name in names if f"│ {name} " in shown or f"┃ {name} " in shown]
    assert len(printed) == min(labels, 30)
    assert ("... and 10 more labels (all of them: --html FILE)" in shown) is (labels == 40)
