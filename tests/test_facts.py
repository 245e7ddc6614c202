"""The facts file: what doctor or a run learned about an endpoint and model, read back by later runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runner.job.facts import Facts, facts_key, load_facts, record_facts
from tests.conftest import cli, sample_rows


def test_nothing_known_is_all_none() -> None:
    assert load_facts("https://open.bigmodel.cn/api/anthropic", "glm-4.6") == Facts()


def test_a_recorded_fact_is_read_back_for_the_same_endpoint_and_model_only() -> None:
    record_facts("https://open.bigmodel.cn/api/anthropic/", "glm-4.6", source="run", forced_tool_choice=False)
    got = load_facts("https://open.bigmodel.cn/api/anthropic", "glm-4.6")
    assert got.forced_tool_choice is False
    assert got.source == "run"
    assert load_facts("https://open.bigmodel.cn/api/anthropic", "glm-4.5-air").forced_tool_choice is None


def test_facts_merge_and_never_keep_credentials_in_the_key() -> None:
    record_facts("https://user:sk-secret@api.z.ai/api/anthropic?k=1", "glm-4.7", source="doctor", concurrency=3)
    record_facts("https://api.z.ai/api/anthropic", "glm-4.7", source="run", forced_tool_choice=True)
    got = load_facts("https://api.z.ai/api/anthropic", "glm-4.7")
    assert (got.concurrency, got.forced_tool_choice) == (3, True)
    assert "sk-secret" not in facts_key("https://user:sk-secret@api.z.ai/api/anthropic", "m")


def test_an_unreadable_facts_file_is_an_empty_one(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "torn.json"
    path.write_text('{"half', encoding="utf-8")
    monkeypatch.setenv("GLM_BATCH_FACTS", str(path))
    assert load_facts("http://127.0.0.1:1", "glm-4.6") == Facts()
    record_facts("http://127.0.0.1:1", "glm-4.6", source="run", batch_eligible=True)
    assert load_facts("http://127.0.0.1:1", "glm-4.6").batch_eligible is True


def test_the_in_process_simulator_has_one_key_for_doctor_and_runs_alike() -> None:
    """`model.endpoint: simulator` has no base URL (its port changes per run): what doctor records there
    is what a run reads there, and it stays apart from any real endpoint."""
    record_facts(None, "glm-4.6", source="doctor", forced_tool_choice=False)
    assert load_facts(None, "glm-4.6").forced_tool_choice is False
    assert load_facts("https://open.bigmodel.cn/api/anthropic", "glm-4.6").forced_tool_choice is None


def test_a_facts_path_that_names_another_file_never_writes_over_it(make_job, sim, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """$GLM_BATCH_FACTS set to a job's input, spec or manifest by mistake: the run still falls back to
    tool_choice auto and finishes, and the file is left byte for byte (a CSV input was overwritten with
    the facts' JSON)."""
    job = make_job(rows=sample_rows(3), output={"labels": ["positive", "negative"]})
    assert cli("run", str(job.spec)).exit_code == 0  # a manifest to point at
    manifest = job.output.parent / ".glm-batch" / "job" / "manifest.json"
    sim.configure(forced_tool_choice="refuse")
    for victim in (job.input, job.spec, manifest):
        before = victim.read_bytes()
        monkeypatch.setenv("GLM_BATCH_FACTS", str(victim))
        assert cli("run", str(job.spec), "--fresh").exit_code == 0
        if victim != manifest:  # the run itself adds to its manifest
            assert victim.read_bytes() == before
        assert "forced_tool_choice" not in victim.read_text(encoding="utf-8")


def test_a_facts_path_that_is_not_a_regular_file_is_never_read(make_job, sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """$GLM_BATCH_FACTS naming a FIFO blocked the run forever (and /dev/zero ended it with a MemoryError,
    exit 70): the facts file is read only when it is a regular file of a sane size."""
    job = make_job(rows=sample_rows(2))
    fifo = tmp_path / "facts.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "GLM_BATCH_FACTS": str(fifo)}
    run = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(job.spec)], env=env, capture_output=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
