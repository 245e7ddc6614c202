"""Bad specs and inputs: one clear line naming the file and key, exit code 2, and no request sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows, write_csv


def assert_refused(result, *fragments: str) -> None:
    """Exit 2, a single `glm-batch: error:` line, no traceback, and every fragment in it."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("glm-batch: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


CASES = {
    "unknown key": ({"run": {"concurency": 4}}, ["run.concurency", "unknown key"]),
    "unknown top-level key": ({"outptu": {}}, ["outptu", "unknown key"]),
    "template uses a missing column": ({"prompt": {"template": "{{ title }}"}}, ["title", "input columns are"]),
    "template syntax error": ({"prompt": {"template": "{{ text "}}, ["prompt.template", "syntax error"]),
    "unknown model": ({"model": {"name": "glm-9"}}, ["model.name", "glm-9"]),
    "non-positive concurrency": ({"run": {"concurrency": 0}}, ["run.concurrency", "greater than 0"]),
    "missing input file": ({"input": {"paths": ["data/nope.csv"]}}, ["nope.csv", "does not exist"]),
    "glob matching nothing": ({"input": {"paths": ["data/*.parquet"]}}, ["matches no file"]),
    "wrong version": ({"version": 2}, ["version"]),
    "max_tokens over the model's limit": ({"model": {"max_tokens": 10**6}}, ["model.max_tokens", "exceeds"]),
    "both template and template_file": ({"prompt": {"template_file": "x.j2"}}, ["exactly one"]),
    "kept column missing": ({"output": {"keep_columns": ["nope"]}}, ["output.keep_columns", "nope"]),
    "id column missing": ({"input": {"id_column": "uid"}}, ["input.id_column", "uid"]),
    "bad output placeholder": ({"output": {"path": "out/{when}.parquet"}}, ["output.path", "{when}"]),
    "unknown endpoint": ({"model": {"endpoint": "openai"}}, ["model.endpoint", "openai"]),
    "two stop words for the Batch API": (
        {"model": {"name": "glm-4-air-250414", "stop_sequences": ["END", "STOP"]}, "run": {"mode": "batch"}},
        ["model.stop_sequences", "single stop word", "run.mode: online"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_spec_is_refused_before_anything_is_sent(make_job, sim: SimulatorThread, case: str) -> None:
    change, fragments = CASES[case]
    job = make_job(**change)

    assert_refused(cli("run", str(job.spec)), str(job.spec), *fragments)
    assert_refused(cli("validate", str(job.spec)), *fragments)
    assert sim.stats()["requests"] == 0


def test_invalid_yaml_names_the_line(tmp_path: Path, sim) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("version: 1\ninput:\n  paths: [a.csv\n", encoding="utf-8")

    assert_refused(cli("run", str(spec)), "invalid YAML", "line")


def test_a_spec_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "list.yaml"
    spec.write_text("- 1\n- 2\n", encoding="utf-8")

    assert_refused(cli("validate", str(spec)), "YAML mapping")


def test_a_missing_spec_file_is_refused(tmp_path: Path) -> None:
    assert_refused(cli("run", str(tmp_path / "nope.yaml")), "no such job spec")


def test_an_empty_input_is_nothing_to_do(make_job, sim) -> None:
    job = make_job(rows=[])

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert "no rows; nothing to do" in result.stdout + result.stderr
    assert sim.stats()["requests"] == 0


def test_a_corrupt_parquet_input_is_refused(make_job, tmp_path: Path, sim) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    job = make_job(input={"paths": ["data/bad.parquet"]})

    assert_refused(cli("run", str(job.spec)), "cannot read", "bad.parquet")
    assert sim.stats()["requests"] == 0


def test_a_jsonl_line_that_is_not_json_is_named_by_file_and_line(make_job, tmp_path: Path, sim) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    lines = '{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n{"id": "c", "text" "z"}\n'
    (tmp_path / "data" / "rows.jsonl").write_text(lines, encoding="utf-8")
    job = make_job(input={"paths": ["data/rows.jsonl"]})

    assert_refused(cli("run", str(job.spec)), "rows.jsonl, line 4")
    assert sim.stats()["requests"] == 0


def test_inputs_with_different_columns_are_refused(make_job, tmp_path: Path) -> None:
    write_csv(tmp_path / "data" / "other.csv", [{"id": "x", "body": "y"}])
    job = make_job(input={"paths": ["data/job.csv", "data/other.csv"]})

    assert_refused(cli("run", str(job.spec)), "same columns")


def test_a_row_without_an_id_is_refused(make_job) -> None:
    job = make_job(rows=[{"id": "a", "text": "x"}, {"id": "", "text": "y"}])

    assert_refused(cli("run", str(job.spec)), "input.id_column", "1 rows have no id")


def test_a_missing_key_is_refused_for_a_real_endpoint(make_job, monkeypatch, sim) -> None:
    monkeypatch.delenv("ZHIPUAI_API_KEY")
    job = make_job(model={"endpoint": "zhipu"})

    assert_refused(cli("run", str(job.spec)), "ZHIPUAI_API_KEY")


def test_a_bad_override_is_refused(make_job) -> None:
    job = make_job()

    assert_refused(cli("run", str(job.spec), "--set", "run.concurrency"), "--set", "key.path=value")
    assert_refused(cli("run", str(job.spec), "--set", "run.concurrency=-1"), "run.concurrency")


def test_overrides_change_the_spec(make_job, sim) -> None:
    job = make_job(sample_rows(5))

    result = cli("validate", str(job.spec), "--set", "run.concurrency=3", "--set", "model.name=glm-4.5-air")

    assert result.exit_code == 0
    assert "concurrency 3" in result.stdout and "glm-4.5-air" in result.stdout
    assert sim.stats()["requests"] == 0


def test_validate_renders_the_first_rows_and_sends_nothing(make_job, sim) -> None:
    job = make_job(sample_rows(5))

    result = cli("validate", str(job.spec), "--rows", "2")

    assert result.exit_code == 0
    assert "Summarise: review number 0" in result.stdout
    assert "Summarise: review number 1" in result.stdout
    assert "review number 2" not in result.stdout
    assert "Nothing was sent" in result.stdout
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("name", ["_row", "_id"])
def test_a_template_may_not_read_the_runners_own_names(make_job, sim: SimulatorThread, name: str) -> None:
    """An input column named `_row` or `_id` would be shadowed by the runner's own: refused, rename it."""
    rows = [{**row, name: "mine"} for row in sample_rows(3)]
    job = make_job(rows, prompt={"template": f"{{{{ {name} }}}}: {{{{ text }}}}"})

    assert_refused(cli("run", str(job.spec)), f"reads '{name}'", "rename the column in the input")
    assert sim.stats()["requests"] == 0
