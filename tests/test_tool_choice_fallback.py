"""Structured output whichever way the route behaves: when the endpoint refuses a forced tool choice
("Tool choice must be auto", as Zhipu's native backend does), the job asks with tool_choice auto,
validates and repairs, says so once, and remembers it per endpoint and model (runner.job.facts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from runner.job.facts import load_facts
from tests.conftest import cli

SENTIMENT = Path("/work/shared/data/sentiment/yelp.csv")
if not SENTIMENT.exists():  # a checkout without the shared data: the same file beside the tests
    SENTIMENT = Path(__file__).parent.parent / "data" / "sentiment" / "yelp.csv"


def label_job(tmp_path: Path, url: str, name: str = "labels") -> Path:
    """A labeling job over the sentiment sentences, on the test's simulator."""
    spec: dict[str, Any] = {
        "version": 1,
        "name": name,
        "input": {"paths": [str(SENTIMENT)], "id_column": "id", "columns": ["text"]},
        "prompt": {"system": "You label the sentiment of review sentences.", "template": "{{ text }}"},
        "model": {"name": "glm-4.6", "endpoint": url, "max_tokens": 64},
        "run": {"concurrency": 8, "max_attempts": 3, "backoff_initial_s": 0.001, "backoff_max_s": 0.01},
        "output": {"path": f"out/{name}.parquet", "labels": ["positive", "negative"]},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def test_a_refused_forced_tool_choice_falls_back_to_auto_and_every_row_is_labeled(tmp_path: Path, sim) -> None:
    sim.configure(forced_tool_choice="refuse")
    spec = label_job(tmp_path, sim.url)

    first = cli("run", str(spec))

    assert first.exit_code == 0, first.stderr[-2000:]
    out = pl.read_parquet(tmp_path / "out" / "labels.parquet")
    assert out.height == 1000 and set(out.get_column("status")) == {"ok"}
    assert set(out.get_column("label")) == {"positive", "negative"}
    fallback = events(first.stderr, "tool_choice_fallback")
    assert len(fallback) == 1 and "Tool choice must be auto" in fallback[0]["endpoint_said"]
    summary = json.loads((tmp_path / "out" / "labels.summary.json").read_text())
    assert summary["tool_choice"].startswith("auto")
    refused = sim.stats()["outcomes"].get("400_1214", 0)
    assert 1 <= refused <= 8  # only the requests in flight when the first refusal came back
    assert load_facts(sim.url, "glm-4.6").forced_tool_choice is False

    # The next run on this endpoint and model starts in auto: not one request is refused.
    sim.reset_stats()
    second = cli("run", str(spec), "--fresh")
    assert second.exit_code == 0, second.stderr[-2000:]
    distinct = pl.read_csv(SENTIMENT).get_column("text").n_unique()  # rows with one prompt share a request
    assert sim.stats()["outcomes"].get("400_1214", 0) == 0 and sim.stats()["ok"] == distinct
    assert len(events(second.stderr, "tool_choice_auto")) == 1
    assert events(second.stderr, "tool_choice_fallback") == []


def test_an_endpoint_that_accepts_forced_tool_choice_changes_nothing(tmp_path: Path, sim) -> None:
    spec = label_job(tmp_path, sim.url)

    result = cli("run", str(spec), "--limit", "100")

    assert result.exit_code == 0, result.stderr[-2000:]
    assert events(result.stderr, "tool_choice_fallback") == [] and events(result.stderr, "tool_choice_auto") == []
    # a limited run writes beside the job's output, never over it
    summary = json.loads((tmp_path / "out" / "labels.limit-100.summary.json").read_text())
    assert "tool_choice" not in summary
    assert load_facts(sim.url, "glm-4.6").forced_tool_choice is None
    assert sim.stats()["outcomes"] == {"ok": 100}
