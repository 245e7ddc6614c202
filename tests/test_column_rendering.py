"""Planning as columns (issue 23): a faster planner must make the very requests, keys and files it made.

A template that only substitutes columns is rendered for a whole batch by one polars expression
(RequestBuilder.key_batch); the batch files and the request bodies are written by orjson; batch
answers are held for their part without a journal line each. None of it may change a key (a changed
key is a row paid again) or a byte sent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.job.inputs import open_input
from runner.job.prompts import RequestBuilder
from runner.job.resolve import load_job
from runner.job.sandbox import RenderError
from runner.money.tokens import estimate_request
from runner.plan import plan
from runner.records import KEY, Request, Result
from runner.send.batch.files import BatchFileWriter
from runner.send.batch.native_request import chat_body
from runner.state.settled import SettledKeys
from runner.state.store import BATCH_PART_ROWS, Store

ROWS = {
    "id": ["a", "b", "c", "d", "e", "f", "g"],
    "text": ["hello world", "ünïcödé — 日本語 🎉", "", 'quotes " and \\ back\nnew line\ttab', None, "same", "same"],
    "n": [1, -2, 0, 10**12, 7, None, 3],
}
# Keys computed with the planner of main at c2ece13 (row by row, through Jinja), before planning as
# columns existed: a regression pin, not an expected result worked out by hand. A change here means
# every earlier answer of such a job would be paid for again.
PINNED = {
    "plain": ["fcee60630ae71e2377b08be283211620", "901c607acdbaeeda5855549cd8e63735",
              "8d52f821e485eb0f2e7ea2ee31fd1f30", "b5a00aea0fbc0d1390f4a02cc720a9eb",
              "8d52f821e485eb0f2e7ea2ee31fd1f30", "ee64f35229b562680d42d9532bbbb362",
              "ee64f35229b562680d42d9532bbbb362"],
    "two": ["bee04a63dee1984c9cac81d658d1dec5", "d9dbe2aa7eea3d52881cc4d5c1f79695",
            "9779b3ca038ba80f94cd6a72e2c00492", "c3b3672a47d0bd4fcb8bdf4284e67ada",
            "8b613077eeed3ba2977355cc8ca81fe9", "ec046f4c6e5f908f620054204486ab1b",
            "c5351e937c4a2effd7e97ddcfa4a129a"],
    "skip": ["fcee60630ae71e2377b08be283211620", "901c607acdbaeeda5855549cd8e63735",
             "8d52f821e485eb0f2e7ea2ee31fd1f30", "b5a00aea0fbc0d1390f4a02cc720a9eb", "render-e",
             "ee64f35229b562680d42d9532bbbb362", "ee64f35229b562680d42d9532bbbb362"],
}  # fmt: skip
PROMPTS = {
    "plain": ({"system": "Be brief.", "template": "Summarise: {{ text }}"}, "empty"),
    "two": ({"template": "{{ text }} / {{ n }} stars"}, "empty"),
    "skip": ({"system": "Be brief.", "template": "Summarise: {{ text }}"}, "skip"),
}


def _job(tmp_path: Path, name: str, prompt: dict[str, Any], nulls: str, rows: dict[str, list[Any]] = ROWS) -> Any:
    """A job over `rows` (a Parquet input) with this prompt; loaded."""
    (tmp_path / "data").mkdir(exist_ok=True)
    schema = {"id": pl.String, "text": pl.String, "n": pl.Int64}
    pl.DataFrame(rows, schema=schema).write_parquet(tmp_path / "data" / f"{name}.parquet")
    spec = {
        "version": 1,
        "name": name,
        "input": {"paths": [f"data/{name}.parquet"], "id_column": "id", "nulls": nulls},
        "prompt": prompt,
        "model": {"name": "glm-4.6", "endpoint": "simulator", "max_tokens": 64},
        "output": {"path": f"out/{name}.parquet"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return load_job(path)


def _planned_keys(job: Any) -> list[str]:
    nothing = SettledKeys(pl.Series(KEY, [], dtype=pl.String))
    return [row.key for batch in plan(job, open_input(job), nothing) for row in batch.rows]


def column_requests(builder: RequestBuilder, frame: pl.DataFrame) -> list[Request | RenderError] | None:
    """Each row's request (or its RenderError) as the planner makes it from a batch rendered as columns
    (a row the columns cannot make goes through `build`); None when the batch is not rendered as columns."""
    keyed = builder.key_batch(frame)
    if keyed is None:
        return None
    made: list[Request | RenderError] = []
    for index, (key, prompt) in enumerate(zip(*keyed, strict=True)):
        if key is None:
            made += [rendered for _, _, rendered in builder.render([frame.row(index, named=True)])]
        else:
            made.append(builder.column_request(key, prompt))
    return made


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_planner_gives_the_keys_it_gave_before_planning_as_columns(tmp_path: Path, name: str) -> None:
    """Text with unicode, quotes and newlines, an empty text, integers, nulls blanked or skipped, and two
    rows sharing a prompt: each row keyed as main keyed it (see PINNED)."""
    prompt, nulls = PROMPTS[name]
    job = _job(tmp_path, name, prompt, nulls)
    assert column_requests(RequestBuilder(job), next(open_input(job).batches(10))) is not None  # the column path ran
    assert _planned_keys(job) == PINNED[name]


TEMPLATES = [
    "Summarise: {{ text }}",
    "{{ text }}{{ n }}",
    "  {{- text -}}  \n{{ n }} stars\n",
    "{{text}}{{ text }}",
]
texts = st.one_of(st.none(), st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
numbers = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(texts, numbers), min_size=1, max_size=12),
    template=st.sampled_from(TEMPLATES),
    system=st.sampled_from([None, "Be brief.", "Réponds en français: 简短"]),
    nulls=st.sampled_from(["empty", "skip"]),
)
def test_rendering_as_columns_makes_each_request_as_rendering_row_by_row_does(
    tmp_path: Path, rows: list[tuple[str | None, int | None]], template: str, system: str | None, nulls: str
) -> None:
    """Any text (unicode, empty, nulls) and any 64-bit integer: the same key, the same parameters and the
    same failure for every row as Jinja row by row."""
    data = {"id": [f"r{i}" for i in range(len(rows))], "text": [t for t, _ in rows], "n": [n for _, n in rows]}
    prompt = {"template": template} | ({"system": system} if system is not None else {})
    job = _job(tmp_path, "fuzz", prompt, nulls, data)
    builder = RequestBuilder(job)
    frame = next(open_input(job).batches(100))
    made = column_requests(builder, frame)
    assert made is not None
    for row, request in zip(frame.iter_rows(named=True), made, strict=True):
        try:
            expected: Request | RenderError = builder.build(row)
        except RenderError as exc:
            expected = exc
        if isinstance(expected, RenderError):
            assert isinstance(request, type(expected)) and str(request) == str(expected)
        else:
            assert isinstance(request, Request)
            assert (request.key, request.params) == (expected.key, expected.params)
            assert chat_body(request.params) == chat_body(expected.params)


@pytest.mark.parametrize("template", ["{{ text | upper }}", "{% if text %}{{ text }}{% endif %}", "{{ n + 1 }}"])
def test_a_template_that_does_more_than_substitute_renders_row_by_row(tmp_path: Path, template: str) -> None:
    job = _job(tmp_path, "jinja", {"template": template}, "empty")
    assert column_requests(RequestBuilder(job), next(open_input(job).batches(10))) is None


def test_batch_files_hold_the_bytes_json_would_write(tmp_path: Path) -> None:
    """The input lines (written by orjson) are byte for byte what json.dumps wrote before; a body orjson
    cannot write (an integer over 64 bits) is written by json, as before."""
    bodies = [
        {"model": "glm-4-air", "messages": [{"role": "user", "content": 'ünïcödé — 日本語 🎉 "q" \\ \n'}]},
        {"model": "glm-4-air", "messages": [], "max_tokens": 64, "temperature": 0.3, "top_p": 1.0},
        {"model": "glm-4-air", "messages": [], "seed": 2**70},
    ]
    with BatchFileWriter(tmp_path) as writer:
        for index, body in enumerate(bodies):
            writer.add(f"k{index}", body)
    written = writer.files[0].path.read_bytes()
    expected = "".join(
        json.dumps(
            {"custom_id": f"k{index}", "method": "POST", "url": "/v4/chat/completions", "body": body},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        + "\n"
        for index, body in enumerate(bodies)
    )
    assert written == expected.encode("utf-8")


def _result(key: str, api: str) -> Result:
    now = dt.datetime.now(dt.UTC)
    return Result(key=key, status="ok", attempts=1, latency_ms=None, finished_at=now, response_text="x", api=api)


def test_batch_answers_are_held_for_their_part_and_online_ones_journalled_at_once(tmp_path: Path) -> None:
    """A batch answer is held for the next part without a journal line (its downloaded result file and
    the batch book hold it until then) and counts toward checkpoint_rows only once BATCH_PART_ROWS are
    held; an online answer is
    written at once; a flush keeps all of them in a part, a lone surrogate in a batch answer as U+FFFD."""
    store = Store(tmp_path / "state", run_id="run")
    store.open()
    try:
        journal = next((tmp_path / "state").glob("journal-*.jsonl"))
        store.add(_result("b1", "batch"))
        store.add(dataclasses.replace(_result("b2", "batch"), response_text="cut \ud800 here"))
        assert journal.read_bytes() == b"" and store.buffered == 0
        store.add(_result("o1", "online"))
        assert [json.loads(line)["key"] for line in journal.read_text().splitlines()] == ["o1"]
        assert store.buffered == 1
        store.flush()
        assert journal.read_bytes() == b"" and store.buffered == 0
        kept = pl.read_parquet(store.result_parts()).sort(KEY)
        assert kept.get_column(KEY).to_list() == ["b1", "b2", "o1"]
        assert kept.get_column("response_text").to_list() == ["x", "cut \ufffd here", "x"]
        for index in range(BATCH_PART_ROWS):  # enough held: they count, and the engine writes their part
            store.add(_result(f"h{index}", "batch"))
        assert store.buffered == BATCH_PART_ROWS
    finally:
        store.close()


def test_the_settled_lookup_finds_exactly_the_keys_a_set_holds() -> None:
    """SettledKeys.contains looks keys up by their first 64 bits first: it must still answer, for every
    kind of key, what membership in the set of settled keys answers (null for a null key)."""
    hexes = [f"{(index * 0x9E3779B97F4A7C15 + 7) % 2**128:032x}" for index in range(2000)]
    twin = hexes[2][:16] + "0" * 16  # the same first 64 bits as a settled key, another key
    odd = ["render-a", "", "Z" * 32, hexes[1].upper(), hexes[2][:16], f"{hexes[4]}-s1"]
    settled = SettledKeys(pl.Series(KEY, sorted({*hexes[::2], *odd[:3], odd[5]})))
    asked = [*hexes[:200], twin, *odd, f"{hexes[4]}-s2", None, "render-b"]
    held = set(settled.series().to_list())
    got = settled.contains(pl.Series(KEY, asked, dtype=pl.String)).to_list()
    assert got == [None if key is None else key in held for key in asked]
    assert got.count(True) == 100 + 4  # half the hex keys; render-a, "", the Z key, the sample key


@pytest.mark.parametrize(
    "prompt",
    [
        {"system": "Réponds en français: 简短", "template": "Summarise: {{ text }}"},
        {"template": "{{ text }} / {{ n }} stars"},
        {"system": "Be brief.", "template": "日本語: {{ text }}"},
    ],
)  # fmt: skip
def test_a_request_planned_as_columns_is_estimated_as_a_whole_request_is(
    tmp_path: Path, prompt: dict[str, Any]
) -> None:
    """The planner estimates a column-rendered request from its prompt alone (the turns before it summed
    once): the same raw estimate, to the last token, as estimate_request over its parameters; what a
    budget reserves and each row's est_input_tokens do not change. (The row with a null goes through
    `build`, and is estimated whole when sent.)"""
    job = _job(tmp_path, "estimate", prompt, "empty", ROWS | {"text": [t * 40 if t else t for t in ROWS["text"]]})
    nothing = SettledKeys(pl.Series(KEY, [], dtype=pl.String))
    rows = [row for batch in plan(job, open_input(job), nothing) for row in batch.rows if row.estimate is not None]
    assert len(rows) >= 5  # a null goes through `build` (row e's text; row f's n where the prompt reads it)
    assert [row.estimate for row in rows] == [estimate_request(row.requests[0].params) for row in rows]
    assert len({row.estimate for row in rows}) > 3  # the texts differ in length and script
