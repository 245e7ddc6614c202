"""Labeling: structured answers, validated and repaired, typed columns, quality against gold labels."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import polars as pl
import pytest

from runner.job.structured import extract_json
from runner.observe.quality import label_metrics
from runner.observe.summary import LabelScore
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows

REVIEWS = [
    {"id": "1", "text": "Great phone, I love it", "gold": "positive"},
    {"id": "2", "text": "Terrible battery, broke in a week", "gold": "negative"},
    {"id": "3", "text": "The best purchase this year", "gold": "positive"},
    {"id": "4", "text": "Awful support and a bad screen", "gold": "negative"},
    {"id": "5", "text": "Not what I hoped for", "gold": "positive"},  # the simulator's lexicon gets this wrong
]
LABELS = {"labels": ["positive", "negative"], "keep_columns": []}


def test_labels_land_in_a_typed_column_from_a_forced_tool_call(make_job, sim: SimulatorThread) -> None:
    job = make_job(REVIEWS, output=LABELS, eval={"gold_column": "gold"})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.schema["label"] == pl.String
    assert out.get_column("label").to_list() == ["positive", "negative", "positive", "negative", "negative"]
    assert out.get_column("stop_reason").to_list() == ["tool_use"] * 5
    assert json.loads(out.get_column("response_text")[0]) == {"label": "positive"}


def test_multi_labels_are_a_list_column(make_job) -> None:
    job = make_job(REVIEWS, output={"labels": ["positive", "negative"], "multi": True, "keep_columns": []})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.schema["labels"] == pl.List(pl.String)
    assert out.get_column("labels")[0].to_list() == ["positive"]


def test_schema_fields_become_typed_columns_lists_and_structs(make_job) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "integer"},
            "confidence": {"type": "number"},
            "sarcastic": {"type": "boolean"},
            "aspects": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "properties": {"lang": {"type": "string"}}},
        },
        "required": ["sentiment", "score"],
    }
    job = make_job(REVIEWS, output={"schema": schema, "keep_columns": []})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.schema["sentiment"] == pl.String
    assert out.schema["score"] == pl.Int64
    assert out.schema["confidence"] == pl.Float64
    assert out.schema["sarcastic"] == pl.Boolean
    assert out.schema["aspects"] == pl.List(pl.String)
    assert out.schema["meta"] == pl.Struct({"lang": pl.String})
    assert out.columns[1] == "sentiment"  # answer fields come right after the id and kept columns


def test_invalid_answers_are_repaired_within_the_limit_and_counted(make_job, sim: SimulatorThread) -> None:
    sim.configure(invalid_rate=1.0, invalid_turns=1)  # every first answer breaks the schema
    job = make_job(REVIEWS, output={**LABELS, "max_repairs": 2})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["ok"] * 5
    assert out.get_column("repairs").to_list() == [1] * 5
    assert sim.stats()["requests"] == 10
    # Both turns were paid for: the usage is the sum of the two.
    assert out.get_column("input_tokens").sum() == sim.stats()["input_tokens"]
    summary = json.loads(job.summary.read_text())
    assert summary["quality"]["repaired"] == 5


def test_rows_still_invalid_after_the_repairs_keep_the_raw_answer_and_the_error(make_job, sim) -> None:
    sim.configure(invalid_rate=1.0, invalid_turns=99)
    job = make_job(REVIEWS[:2], output={**LABELS, "max_repairs": 2})

    result = cli("run", str(job.spec))

    assert result.exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["invalid", "invalid"]
    assert out.get_column("error_type").to_list() == ["invalid", "invalid"]
    assert out.get_column("repairs").to_list() == [2, 2]
    assert "not-a-label" in out.get_column("response_text")[0]
    assert "is not one of ['positive', 'negative']" in out.get_column("error_message")[0]
    assert out.get_column("label").to_list() == [None, None]
    assert sim.stats()["requests"] == 6  # one ask and two repairs per row, no more


def test_a_truncated_answer_is_reported_as_truncated_and_not_asked_again(make_job, sim) -> None:
    job = make_job(REVIEWS[:3], model={"max_tokens": 4}, output={**LABELS, "mode": "text"})

    assert cli("run", str(job.spec)).exit_code == 1

    out = pl.read_parquet(job.output)
    assert out.get_column("error_type").to_list() == ["truncated"] * 3
    assert out.get_column("repairs").to_list() == [0] * 3
    assert sim.stats()["requests"] == 3


def test_text_mode_extracts_the_json_from_the_answer(make_job, sim) -> None:
    sim.configure(invalid_rate=1.0, invalid_turns=1)
    job = make_job(REVIEWS, output={**LABELS, "mode": "text"})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.get_column("label").to_list()[:2] == ["positive", "negative"]
    assert out.get_column("repairs").to_list() == [1] * 5
    assert out.get_column("response_text")[0].startswith("Here you are:\n```json")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('```json\n{"label": "positive"}\n```', {"label": "positive"}),
        ('Sure!\n```\n{"a": [1, 2]}\n```\nAnything else?', {"a": [1, 2]}),
        ('The answer is {"label": "negative"} as requested.', {"label": "negative"}),
        ('[{"x": 1}]', [{"x": 1}]),
    ],
)
def test_json_is_found_fenced_or_bare(text: str, value: object) -> None:
    assert extract_json(text) == value


@pytest.mark.parametrize(
    ("text", "problem"),
    [("no json here", "no JSON object found"), ('{"label": "positive",}', "invalid JSON"), ('{"a": ', "no JSON")],
)
def test_broken_json_is_an_error_that_says_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        extract_json(text)


def test_metrics_match_a_hand_computed_fixture() -> None:
    frame = pl.DataFrame(
        {
            "gold": ["a", "a", "b", "b", "b", None],
            "label": ["a", "b", "b", "b", None, "a"],
            "status": ["ok", "ok", "ok", "ok", "invalid", "ok"],
        }
    )

    m = label_metrics(frame, predicted="label", gold="gold")

    assert m.rows_with_gold == 5  # the row without gold is left out
    assert m.accuracy == 0.6
    assert m.invalid_rate == 0.2
    # a: tp 1, fp 0, fn 1 -> P 1, R .5, F1 .6667; b: tp 2, fp 1, fn 1 -> P R F1 .6667
    assert m.per_label["a"] == LabelScore(precision=1.0, recall=0.5, f1=0.6667, support=2)
    assert m.per_label["b"] == LabelScore(precision=0.6667, recall=0.6667, f1=0.6667, support=3)
    assert m.confusion == {"a": {"a": 1, "b": 1, "(invalid)": 0}, "b": {"a": 0, "b": 2, "(invalid)": 1}}
    assert m.predicted_distribution == {"a": 1, "b": 3, "(invalid)": 1}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        self.text.append(data)


def test_the_quality_report_runs_from_the_cli_and_draws_its_html(make_job, tmp_path) -> None:
    job = make_job(REVIEWS, output=LABELS, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0
    page = tmp_path / "report.html"

    result = cli("report", str(job.spec), "--html", str(page))

    assert result.exit_code == 0, result.stderr
    assert "accuracy 0.8000 on 5 rows" in result.stdout
    parsed = _Collect()
    parsed.feed(page.read_text())
    svgs = [attrs.get("id") for tag, attrs in parsed.tags if tag == "svg"]
    assert svgs == ["confusion", "distribution"]
    assert sum(1 for tag, _ in parsed.tags if tag == "rect") == 2 * 3 + 3  # 2x3 matrix cells, 3 bars
    assert "accuracy" in "".join(parsed.text) and "0.8000" in "".join(parsed.text)
    assert not any(tag == "script" for tag, _ in parsed.tags)


def test_the_html_report_escapes_label_names(make_job, tmp_path) -> None:
    hostile = "<script>alert(1)</script>"
    rows = [{**row, "gold": hostile if row["gold"] == "negative" else row["gold"]} for row in REVIEWS]
    job = make_job(rows, output={"labels": ["positive", hostile], "keep_columns": []}, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0
    page = tmp_path / "report.html"

    assert cli("report", str(job.spec), "--html", str(page)).exit_code == 0

    text = page.read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ({"labels": ["a"], "schema": {"type": "object"}}, "at most one of"),
        ({"schema": {"type": "object", "properties": {"x": {"type": "wrong"}}}}, "not a valid JSON Schema"),
        ({"schema": {"type": "array"}}, "must be `type: object`"),
        ({"labels": ["a", "a"]}, "distinct labels"),
        ({"labels": ["a"], "keep_columns": ["label"]}, "the output cannot hold both"),
    ],
)
def test_bad_structure_specs_are_refused(make_job, sim, output, fragment) -> None:
    rows = [{"id": "1", "text": "x", "label": "y"}]
    job = make_job(rows, output=output)

    result = cli("run", str(job.spec))

    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr
    assert sim.stats()["requests"] == 0


def test_changing_the_labels_changes_the_request(make_job, sim) -> None:
    job = make_job(sample_rows(4), output=LABELS)
    assert cli("run", str(job.spec)).exit_code == 0

    assert cli("run", str(job.spec), "--set", "output.labels=[positive, negative, neutral]").exit_code == 0
    assert sim.stats()["requests"] == 8


def test_schema_outputs_get_per_field_exact_match_rates(make_job, sim) -> None:
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}, "score": {"type": "integer"}},
        "required": ["sentiment", "score"],
    }
    # Gold sentiment matches the simulator's lexicon on rows 1-4 but not 5; no gold score is ever right.
    rows = [{**r, "gold_score": "1000"} for r in REVIEWS]
    job = make_job(
        rows,
        output={"schema": schema, "keep_columns": []},
        eval={"gold_fields": {"sentiment": "gold", "score": "gold_score"}},
    )

    assert cli("run", str(job.spec)).exit_code == 0

    rates = json.loads(job.summary.read_text())["quality"]["field_exact_match"]
    assert rates == {
        "sentiment": {"rows_with_gold": 5, "exact_match": 0.8},
        "score": {"rows_with_gold": 5, "exact_match": 0.0},
    }


def test_gold_fields_must_name_schema_fields(make_job, sim) -> None:
    schema = {"type": "object", "properties": {"sentiment": {"type": "string"}}}
    job = make_job(REVIEWS, output={"schema": schema, "keep_columns": []}, eval={"gold_fields": {"mood": "gold"}})

    result = cli("run", str(job.spec))

    assert result.exit_code == 2 and "'mood' is not a field of output.schema" in result.stderr
    assert sim.stats()["requests"] == 0


def test_the_report_reads_an_output_file_without_its_spec(make_job, tmp_path) -> None:
    job = make_job(REVIEWS, output=LABELS, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0
    job.spec.unlink()  # only the output and its summary are left
    beside_summary = cli("report", str(job.output))  # the summary names the gold column
    moved = tmp_path / "elsewhere.parquet"
    job.output.rename(moved)  # no summary beside it now: the gold column must be named

    without_gold = cli("report", str(moved))
    with_gold = cli("report", str(moved), "--gold", "gold")
    wrong_gold = cli("report", str(moved), "--gold", "truth")

    assert beside_summary.exit_code == 0 and "accuracy 0.8000 on 5 rows" in beside_summary.stdout
    assert without_gold.exit_code == 0 and "no gold labels" in without_gold.stdout
    assert with_gold.exit_code == 0 and "accuracy 0.8000 on 5 rows" in with_gold.stdout
    assert wrong_gold.exit_code == 2
    assert "--gold truth: no such column; the columns other than glm-batch's: id, gold, label" in wrong_gold.stderr


def test_gold_given_with_a_job_spec_is_refused_not_ignored(make_job) -> None:
    job = make_job(REVIEWS, output=LABELS)
    assert cli("run", str(job.spec)).exit_code == 0

    result = cli("report", str(job.spec), "--gold", "gold")

    assert result.exit_code == 2 and "eval.gold_column" in result.stderr
