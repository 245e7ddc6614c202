"""The prompt model and the run's preview: `prompt.messages` (few-shot conversations), JSONL input,
labeling outputs keeping the prompt's columns, `estimate --fresh` and `run --dry-run`.

Every job runs against the real simulator on loopback (conftest), through the real CLI.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from runner.job.prompts import RequestBuilder
from runner.job.resolve import load_job
from runner.send.batch.native_request import chat_body
from runner.simulator.simulator import SimulatorThread
from runner.state.lock import JobLock
from tests.conftest import JobFiles, cli, deep_merge, sample_rows

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}
FEW_SHOT = [
    {"role": "user", "content": "Summarise: the battery died in a day"},
    {"role": "assistant", "content": "Poor battery."},
    {"role": "user", "content": "Summarise: {{ text }}"},
]
ROW = {"id": "r1", "text": "hello world", "_row": 0, "_id": "r1"}


def _write(tmp_path: Path, name: str, spec: dict[str, Any]) -> Path:
    """Write a spec (and its one-row input, data/in.csv) under tmp_path; return the spec's path."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "in.csv").write_text("id,text\nr1,hello world\n", encoding="utf-8")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _spec(name: str, prompt: dict[str, Any], output: dict[str, Any] | None = None, **model: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "input": {"paths": ["data/in.csv"], "id_column": "id"},
        "prompt": prompt,
        "model": {"name": "glm-4.6", "endpoint": "simulator", "max_tokens": 64, **model},
        "output": output or {"path": f"out/{name}.parquet"},
    }


def _edit(job: JobFiles, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a written spec in place (e.g. remove a key, which deep_merge cannot)."""
    spec = yaml.safe_load(job.spec.read_text(encoding="utf-8"))
    change(spec)
    job.spec.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


# ---- prompt.messages ------------------------------------------------------------------------------


def test_template_jobs_keep_the_request_keys_and_spec_hash_they_had(tmp_path: Path) -> None:
    """Keys captured on main before prompt.messages existed: earlier answers stay reusable; and a plain
    job's row-map fingerprint (spec_hash) is pinned, so a later field with a default cannot move it."""
    labeled = _spec(
        "keyjob",
        {"system": "Be brief about {{ text | length }}.", "template": "Summarise: {{ text }}"},
        {"path": "out/keyjob.parquet", "labels": ["a", "b"]},
        temperature=0.3,
    )
    plain = _spec("keyjob2", {"template": "Summarise: {{ text }}"})
    job = load_job(_write(tmp_path, "job", labeled))
    assert RequestBuilder(job).build(ROW).key == "6cb2a0a90a6b4a4dc463629cad53c76e"
    job2 = load_job(_write(tmp_path, "job2", plain))
    assert RequestBuilder(job2).build(ROW).key == "4b8b354498a1f399da2c1f1811994601"
    # The spec hash leaves out values at their defaults: a field added to the spec later (run.engine,
    # run.mode, ...) does not change the hash of a job that does not use it.
    assert job2.spec_hash == "1926debcb2347634"


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "https://open.bigmodel.cn/api/anthropic"},
        {"name": "glm-4.5"},
        {"max_tokens": 65},
        {"temperature": 0.3},
        {"top_p": 0.9},
        {"top_k": 5},
        {"stop_sequences": ["END"]},
        {"thinking": {"type": "enabled", "budget_tokens": 32}},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_model_setting_that_shapes_the_answer_is_in_the_key_and_the_row_is_not(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """README (Resume): answers are keyed by everything that determines them, not by row."""
    prompt = {"system": "Be brief.", "template": "Summarise: {{ text }}"}
    base = RequestBuilder(load_job(_write(tmp_path, "base", _spec("k", prompt))))
    changed = RequestBuilder(load_job(_write(tmp_path, "changed", deep_merge(_spec("k", prompt), {"model": change}))))
    assert changed.build(ROW).key != base.build(ROW).key
    # Another row with the same text is the same request: one answer serves both.
    assert base.build({**ROW, "id": "r2", "_row": 1, "_id": "r2"}).key == base.build(ROW).key


def test_messages_render_per_row_and_every_turn_is_in_the_key(tmp_path: Path) -> None:
    few_shot = load_job(_write(tmp_path, "a", _spec("a", {"system": "Be brief.", "messages": FEW_SHOT})))
    request = RequestBuilder(few_shot).build(ROW)
    assert request.params["system"] == "Be brief."
    assert request.params["messages"] == [
        {"role": "user", "content": "Summarise: the battery died in a day"},
        {"role": "assistant", "content": "Poor battery."},
        {"role": "user", "content": "Summarise: hello world"},
    ]

    def key(messages: list[dict[str, str]], system: str | None = "Be brief.") -> str:
        prompt: dict[str, Any] = {"messages": messages}
        if system is not None:
            prompt["system"] = system
        job = load_job(_write(tmp_path, "b", _spec("b", prompt)))
        return RequestBuilder(job).build(ROW).key

    keys = {
        request.key,
        key([{**FEW_SHOT[0], "content": "Summarise: the battery died"}, *FEW_SHOT[1:]]),  # another example
        key([FEW_SHOT[0], {**FEW_SHOT[1], "content": "Poor battery!"}, FEW_SHOT[2]]),  # another answer
        key([{"role": "assistant", "content": FEW_SHOT[0]["content"]}, FEW_SHOT[0], FEW_SHOT[2]]),  # roles
        key(FEW_SHOT[2:]),  # no examples
        key(FEW_SHOT, system=None),
        # the same texts split differently between turns never run together into one key
        key([{**FEW_SHOT[0], "content": "Summarise: the battery died in a dayPoor battery."}, FEW_SHOT[2]]),
    }
    assert len(keys) == 7
    # A list with only the row's turn is the request a template makes: the same key, one answer for both.
    template = load_job(_write(tmp_path, "c", _spec("c", {"system": "Be brief.", "template": "Summarise: {{ text }}"})))
    assert key(FEW_SHOT[2:]) == RequestBuilder(template).build(ROW).key


def test_validate_prints_every_turn_under_its_role(tmp_path: Path) -> None:
    result = cli("validate", str(_write(tmp_path, "a", _spec("a", {"messages": FEW_SHOT}))))
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert text.index("user:") < text.index("the battery died") < text.index("assistant:") < text.index("Poor battery.")
    assert text.index("Poor battery.") < text.rindex("user:") < text.index("Summarise: hello world")


def test_a_messages_job_pickles_and_plans_the_same_requests(tmp_path: Path) -> None:
    job = load_job(_write(tmp_path, "a", _spec("a", {"messages": FEW_SHOT})))
    copy = pickle.loads(pickle.dumps(job))
    assert copy == job and copy.history == job.history
    assert all(tpl._compiled is None for _, tpl in copy.history)  # only sources travel; compiled on first use
    assert RequestBuilder(copy).build(ROW) == RequestBuilder(job).build(ROW)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{{ text }}"}]},
            "job.yaml: prompt.messages.1.role: the last message must be role user",
        ),
        ({"messages": [{"role": "system", "content": "hi"}]}, "job.yaml: prompt.messages.0.role: Input should be"),
        ({"messages": [{"role": "user"}]}, "job.yaml: prompt.messages.0.content: required key is missing"),
        ({"messages": []}, "job.yaml: prompt.messages: List should have at least 1 item"),
        (
            {"template": "x", "messages": [{"role": "user", "content": "hi"}]},
            "job.yaml: prompt: give exactly one of prompt.template, prompt.template_file or prompt.messages",
        ),
        (
            {"messages": [{"role": "user", "content": "{{ text"}]},
            "job.yaml: prompt.messages.0.content: template syntax error on line 1",
        ),
        (
            {"messages": [{"role": "user", "content": "{{ nope }}"}, {"role": "user", "content": "{{ text }}"}]},
            "job.yaml: prompt: the template uses nope, which the input does not have",
        ),
    ],
)
def test_a_bad_message_list_is_refused_naming_its_key(tmp_path: Path, prompt: dict[str, Any], expected: str) -> None:
    path = _write(tmp_path, "job", _spec("job", prompt))
    result = cli("validate", str(path))
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith(f"glm-batch: error: {path}: ")


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_few_shot_job_runs_online_and_in_batch_mode(
    mode: str, make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The whole conversation reaches the endpoint on both wires: the simulator bills its earlier turns."""
    rows = sample_rows(6)
    few = make_job(rows=rows, name="few", prompt={"template": None, "messages": FEW_SHOT})
    _edit(few, lambda s: s["prompt"].pop("template"))
    bare = make_job(rows=rows, name="bare", prompt={"template": FEW_SHOT[2]["content"]})
    batch = ["run.mode=batch", f"run.batch={json.dumps(FAST_POLL)}", "model.name=glm-4-air-250414"]  # an eligible model
    extra = [arg for item in batch for arg in ("--set", item)] if mode == "batch" else []
    for job in (few, bare):
        result = cli("run", str(job.spec), *extra)
        assert result.exit_code == 0, result.stderr
    a, b = pl.read_parquet(few.output), pl.read_parquet(bare.output)
    assert a.height == 6 and (a.get_column("status") == "ok").all()
    assert (a.get_column("api") == mode).all()
    assert (a.get_column("input_tokens") > b.get_column("input_tokens")).all()
    # The native Batch API body carries every turn, in order, after the system prompt.
    body = chat_body(RequestBuilder(load_job(few.spec)).build({**rows[0], "_row": 0, "_id": "r0"}).params)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]


# ---- JSONL input ----------------------------------------------------------------------------------


def test_a_jsonl_starter_job_validates_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lines = [{"id": i, "question": f"Why {i}?", "meta": {"n": i}} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert cli("init", "in.jsonl", "--output", "q.yaml").exit_code == 0
    checked = cli("validate", "q.yaml")
    assert checked.exit_code == 0, checked.stderr
    ran = cli("run", "q.yaml")
    assert ran.exit_code == 0, ran.stderr
    out = pl.read_parquet(tmp_path / "out" / "q.parquet")
    assert out.height == 5 and (out.get_column("status") == "ok").all()
    assert sorted(out.get_column("id").to_list()) == ["0", "1", "2", "3", "4"]


def test_ndjson_input_is_read_with_types_from_every_line(make_job: Callable[..., JobFiles], tmp_path: Path) -> None:
    """A field that is an integer on the first 100 lines and a float later reads as one type, lazily."""
    records = [{"id": f"r{i}", "text": f"text {i}", "score": i if i < 150 else i + 0.5} for i in range(200)]
    data = tmp_path / "data" / "many.ndjson"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    job = make_job(name="nd", input={"paths": ["data/many.ndjson"]}, prompt={"template": "{{ text }} {{ score }}"})
    result = cli("run", str(job.spec))
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(job.output).height == 200


def test_other_input_suffixes_are_refused(make_job: Callable[..., JobFiles], tmp_path: Path) -> None:
    (tmp_path / "data" / "x.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "x.json").write_text("[]", encoding="utf-8")
    job = make_job(name="js", input={"paths": ["data/x.json"]})
    result = cli("validate", str(job.spec))
    assert result.exit_code == 2
    assert "input.paths: x.json: only .parquet, .csv and .jsonl (.ndjson) inputs are read" in result.stderr


# ---- keep_columns for labeling --------------------------------------------------------------------


def test_labeling_outputs_keep_the_prompt_columns_unless_told_otherwise(make_job: Callable[..., JobFiles]) -> None:
    labeled = make_job(name="lab", output={"labels": ["positive", "negative"]})
    _edit(labeled, lambda s: s["output"].pop("keep_columns"))
    none_kept = make_job(name="none", output={"labels": ["positive", "negative"], "keep_columns": []})
    plain = make_job(name="plain")
    _edit(plain, lambda s: s["output"].pop("keep_columns"))
    for job in (labeled, none_kept, plain):
        assert cli("run", str(job.spec)).exit_code == 0
    out = pl.read_parquet(labeled.output)
    assert out.get_column("text").to_list() == [r["text"] for r in sample_rows(20)]
    assert "label" in out.columns
    assert "text" not in pl.read_parquet(none_kept.output).columns
    assert "text" not in pl.read_parquet(plain.output).columns


def test_a_default_kept_column_never_clashes_with_an_answer_field(make_job: Callable[..., JobFiles]) -> None:
    """A template column named like an answer field is left out of the default, not refused."""
    rows = [{"id": f"r{i}", "label": f"text {i}"} for i in range(3)]
    job = make_job(rows=rows, name="clash", prompt={"template": "{{ label }}"}, output={"labels": ["a", "b"]})
    _edit(job, lambda s: s["output"].pop("keep_columns"))
    assert load_job(job.spec).keep_columns == ()
    assert cli("run", str(job.spec)).exit_code == 0


# ---- estimate --fresh and run --dry-run -----------------------------------------------------------


def test_estimate_fresh_prices_a_full_rerun_of_a_finished_job(make_job: Callable[..., JobFiles]) -> None:
    job = make_job()
    assert cli("run", str(job.spec)).exit_code == 0
    again = json.loads(cli("estimate", str(job.spec), "--json").stdout)
    assert again["requests_to_send"] == 0 and again["rows_answered_already"] == 20
    fresh = json.loads(cli("estimate", str(job.spec), "--json", "--fresh").stdout)
    assert fresh["requests_to_send"] == 20 and fresh["rows_answered_already"] == 0
    assert fresh["fresh"] is True and fresh["cost"]["expected"] > 0
    # Earlier answers still calibrate it: their measured output length, not the max_tokens guess.
    assert fresh["output_tokens"]["basis"].startswith("mean of 20 measured answers")


def _state_files(state_dir: Path) -> dict[str, tuple[int, int]]:
    if not state_dir.exists():
        return {}
    return {str(p.relative_to(state_dir)): (p.stat().st_mtime_ns, p.stat().st_size) for p in state_dir.rglob("*")}


def test_dry_run_says_what_a_run_would_send_and_writes_nothing(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    job = make_job()
    state_dir = load_job(job.spec).state_dir
    first = cli("run", str(job.spec), "--dry-run")
    assert first.exit_code == 0, first.stderr
    assert "dry run: would send 20 requests for 20 rows (0 already answered), expected" in first.stdout
    assert "ceiling" in first.stdout and "nothing was sent" in first.stdout
    assert not state_dir.exists() and not job.output.exists() and sim.stats()["requests"] == 0

    assert cli("run", str(job.spec), "--limit", "5").exit_code == 0
    limited = job.output.with_name("job.limit-5.parquet")
    output = limited.stat().st_mtime_ns
    held = JobLock(state_dir / "lock")
    held.acquire()  # a run in progress: a dry run neither waits for nor takes the lock
    before = _state_files(state_dir)
    try:
        later = cli("run", str(job.spec), "--dry-run")
        fresh = cli("run", str(job.spec), "--dry-run", "--fresh")
        after = _state_files(state_dir)
    finally:
        held.release()
    assert later.exit_code == 0, later.stderr
    assert "would send 15 requests for 20 rows (5 already answered)" in later.stdout
    assert fresh.exit_code == 0 and "would send 20 requests for 20 rows (0 already answered)" in fresh.stdout
    assert after == before and limited.stat().st_mtime_ns == output and not job.output.exists()
    assert sim.stats()["requests"] == 5


def test_a_field_at_its_default_does_not_move_the_spec_hash(tmp_path: Path) -> None:
    """Saying a default out loud (run.engine: local, run.mode: online) hashes like leaving it out."""
    plain = _spec("keyjob2", {"template": "Summarise: {{ text }}"})
    said = _spec("keyjob2", {"template": "Summarise: {{ text }}"})
    said.setdefault("run", {}).update({"engine": "local", "mode": "online"})
    assert load_job(_write(tmp_path, "a", plain)).spec_hash == load_job(_write(tmp_path, "b", said)).spec_hash
