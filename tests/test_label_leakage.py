"""Label leakage and `init`'s escaping: a starter job never puts a gold-like column in its prompt, a
prompt that reads the eval's gold column is refused (exit 2, one line), and any column name, however
odd (a newline, quotes, YAML or Jinja syntax), gives a starter job that parses to the same spec shape
and references its columns as they are."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli.scaffold import starter_job
from runner.errors import UsageError
from runner.job.resolve import load_job
from tests.conftest import cli

GOLD_NAMES = ["gold", "label", "answer", "target", "y", "ground_truth", "Gold_Label", "true_label"]
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: not any(g in s for g in ("gold", "label", "answer", "target", "truth")) and s not in ("y", "gt")
)
GOLD = st.sampled_from(GOLD_NAMES)
TOP_KEYS = {"version", "name", "input", "prompt", "model", "run", "output"}


def labeled_spec(tmp: Path, columns: list[str], gold: str, reads: list[str], where: str) -> Path:
    """A labeling job over `columns` scored against `gold`, whose prompt reads `reads` in `where`."""
    pl.DataFrame({c: ["x", "y"] for c in ["id", *columns, gold]}).write_csv(tmp / "in.csv")
    text = " ".join(f"{{{{ {c} }}}}" for c in reads) or "Classify."
    prompt = {"template": "Classify."} if where == "system" else {"template": text}
    if where == "system":
        prompt["system"] = text
    spec = {
        "version": 1,
        "input": {"paths": ["in.csv"], "id_column": "id"},
        "prompt": prompt,
        "model": {"name": "glm-4.6", "endpoint": "simulator", "max_tokens": 16},
        "output": {"path": "out/x.parquet", "labels": ["x", "y"]},
        "eval": {"gold_column": gold},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@settings(max_examples=40)
@given(
    columns=st.lists(IDENT, min_size=1, max_size=4, unique=True),
    gold=GOLD,
    data=st.data(),
    where=st.sampled_from(["template", "system"]),
)
def test_a_prompt_is_refused_exactly_when_it_reads_the_gold_column(
    columns: list[str], gold: str, data: st.DataObject, where: str
) -> None:
    reads = data.draw(st.lists(st.sampled_from([*columns, gold]), max_size=3, unique=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = labeled_spec(Path(tmp), columns, gold, reads, where)
        if gold in reads:
            with pytest.raises(UsageError, match=f"reads {{{{ {gold} }}}}, a gold column of eval"):
                load_job(path)
        else:
            assert gold not in load_job(path).prompt_variables


def test_validate_and_run_refuse_a_leaking_prompt_in_one_line(tmp_path: Path) -> None:
    path = labeled_spec(tmp_path, ["text"], "gold", ["text", "gold"], "template")
    for command in ("validate", "run"):
        result = cli(command, str(path))
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "take it out of the prompt" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


NAME = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.one_of(NAME, GOLD, IDENT), min_size=1, max_size=6, unique=True), text=IDENT)
def test_init_writes_any_column_names_safely_and_leaves_gold_out(names: list[str], text: str) -> None:
    columns = {n: "String" for n in [*names, text]}
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "jobs" / "x.yaml"
        source = Path(tmp) / "in.parquet"
        written = starter_job(source, target, columns, dict.fromkeys(columns, "a\nb: c"))
        spec = yaml.safe_load(written)
    assert set(spec) == TOP_KEYS  # no name can inject a key (the eval hint is a comment)
    used = spec["input"]["columns"]
    assert set(used) <= set(columns) and not set(used) & set(GOLD_NAMES)
    assert spec["output"]["keep_columns"][0] in columns
    assert all(f"{{{{ {c} }}}}" in spec["prompt"]["template"] for c in used)
    assert spec["input"]["paths"] == ["../in.parquet"]


def test_init_with_a_newline_and_a_key_in_a_csv_header_writes_a_job_that_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = 'note\nmodel: {endpoint: "http://evil.example"}\n#'
    pl.DataFrame({"id": ["1", "2"], "text": ["fine", "bad"], hostile: ["a", "b"], "label": ["pos", "neg"]}).write_csv(
        tmp_path / "in.csv"
    )

    made = cli("init", "in.csv", "--output", "job.yaml")

    assert made.exit_code == 0, made.stderr
    spec = yaml.safe_load((tmp_path / "job.yaml").read_text(encoding="utf-8"))
    assert set(spec) == TOP_KEYS and spec["model"]["endpoint"] == "simulator"
    assert spec["input"]["columns"] == ["text"]  # the label stays out; the odd name cannot be a variable
    assert "# eval: {gold_column: label}" in (tmp_path / "job.yaml").read_text(encoding="utf-8")
    checked = cli("validate", "job.yaml", "--rows", "1")
    assert checked.exit_code == 0, checked.stderr
    assert "pos" not in checked.stdout and "fine" in checked.stdout
