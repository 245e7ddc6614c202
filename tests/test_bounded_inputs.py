"""A hostile world, by class: nulls inside cells, templates and specs without limits, secrets and keys,
and messages that must name the key. Each defence is checked through the real CLI; a refusal is one
line, exit 2, nothing sent."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from runner.simulator.answers import answer_for
from tests.conftest import API_KEY, CliResult, cli
from tests.test_bad_input import assert_refused

BOUND_S = 60  # what "never returns" is turned into: far above anything these cases take when defended


def cli_within(*args: str) -> CliResult:
    """`cli(*args)`, failing the test (instead of hanging it) when the command does not end in BOUND_S.
    (In a thread: for commands that render and read but do not run, which sets signal handlers.)"""
    done: list[CliResult] = []
    thread = threading.Thread(target=lambda: done.append(cli(*args)), daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert done, f"glm-batch {' '.join(args)} did not end within {BOUND_S} s"
    return done[0]


def parquet_job(
    make_job: Callable[..., Any], tmp_path: Path, frame: pl.DataFrame, input: dict[str, Any] | None = None, **spec: Any
) -> Any:
    """A job over `frame`, written as Parquet (nested values survive, unlike CSV)."""
    path = tmp_path / "data" / "nested.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return make_job(input={"paths": ["data/nested.parquet"], **(input or {})}, output={"keep_columns": []}, **spec)


NESTED = pl.DataFrame(
    {
        "id": ["full", "holey"],
        "tags": [["a", "b"], ["a", None]],
        "s": [{"a": 1, "b": "x"}, {"a": 2, "b": None}],
    }
)
NESTED_TEMPLATE = '{{ tags | join(", ") }}|{{ s.b | upper }}|{{ tags | tojson }}|{{ s }}'


# --- 4. nulls inside a cell follow input.nulls, through every filter -------------------------------


def test_a_null_inside_a_list_or_struct_is_refused_under_the_default_nulls_error(make_job, tmp_path, sim) -> None:
    job = parquet_job(make_job, tmp_path, NESTED, prompt={"template": NESTED_TEMPLATE})

    for command in ("validate", "run"):
        assert_refused(cli(command, str(job.spec)), "input.nulls", "1 rows", "inside", "'s' in 1", "'tags' in 1")
    assert sim.stats()["requests"] == 0


def test_with_nulls_skip_a_row_with_a_null_inside_is_skipped_unsent(make_job, tmp_path, sim) -> None:
    job = parquet_job(make_job, tmp_path, NESTED, prompt={"template": NESTED_TEMPLATE}, input={"nulls": "skip"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr  # a skipped row is a decision, not a failure
    out = pl.read_parquet(job.output).sort("id")
    assert out.get_column("status").to_list() == ["ok", "skipped"]
    assert out.get_column("error_type").to_list() == [None, "null_input"]
    assert "inside column 's', 'tags'" in out.get_column("error_message").to_list()[1]
    assert sim.stats()["requests"] == 1


def test_with_nulls_empty_a_null_inside_prints_as_nothing_and_stays_null_in_json(make_job, tmp_path, sim) -> None:
    job = parquet_job(make_job, tmp_path, NESTED, prompt={"template": NESTED_TEMPLATE}, input={"nulls": "empty"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output).sort("id")
    holey = 'a, ||["a", null]|{"a": 2, "b": null}'
    assert out.get_column("response_text").to_list()[1] == answer_for(f"Be brief.\n{holey}")
    assert "None" not in holey


def test_tojson_prints_nan_as_null_and_bytes_as_text(make_job, tmp_path, sim) -> None:
    frame = pl.DataFrame({"id": ["a"], "x": [[1.5, float("nan")]], "b": [b"caf\xc3\xa9"]})
    job = parquet_job(make_job, tmp_path, frame, prompt={"template": "{{ x | tojson }} {{ b | tojson }}"})

    result = cli("validate", str(job.spec), "--rows", "1")

    assert result.exit_code == 0, result.stderr
    assert '[1.5, null] "café"' in result.stdout


@pytest.mark.parametrize("private", ["_id", "_row"])
def test_an_input_column_named_like_the_runners_own_is_refused_not_replaced(make_job, tmp_path, sim, private) -> None:
    frame = pl.DataFrame({"id": ["a", "b"], private: ["mine-1", "mine-2"]})
    job = parquet_job(make_job, tmp_path, frame, prompt={"template": f"{{{{ {private} }}}}"})

    assert_refused(cli("run", str(job.spec)), "prompt", repr(private), "rename the column")
    assert sim.stats()["requests"] == 0


# --- 5. templates and specs have limits -------------------------------------------------------------

RUNAWAY_TEMPLATES = {
    "a huge power": "{{ 10 ** (10 ** 10) }}",
    "a huge repetition": "{{ 'a' * 10 ** 10 }}",
    "a 10^10-step loop": "{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}",
    "doubling in a loop": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "a huge width": "{{ text | center(10 ** 10) }}",
    "a huge format width": "{{ '{:>10000000000}'.format(text) }}",
    "a huge % width": "{{ '%10000000000s' % text }}",
    "a huge str method": "{{ text.ljust(10 ** 10) }}",
    "a huge lorem ipsum": "{{ lipsum(1000000) }}",
    "a lorem ipsum of huge paragraphs": "{{ lipsum(1, max=10 ** 9) }}",
}


@pytest.mark.parametrize("template", RUNAWAY_TEMPLATES.values(), ids=RUNAWAY_TEMPLATES.keys())
def test_a_template_over_a_render_limit_on_every_row_is_refused(make_job, sim, template) -> None:
    job = make_job(prompt={"template": template})

    assert_refused(cli_within("validate", str(job.spec)), "prompt", "render_limit", "fix the template")


def test_a_run_refuses_a_template_over_a_render_limit_before_sending(make_job, sim) -> None:
    job = make_job(prompt={"template": RUNAWAY_TEMPLATES["a huge power"]})

    assert_refused(cli("run", str(job.spec)), "prompt", "render_limit", "fix the template")
    assert sim.stats()["requests"] == 0


def test_a_row_over_a_render_limit_fails_as_render_limit_and_the_others_are_sent(make_job, sim) -> None:
    rows = [{"id": f"r{i}", "text": "5"} for i in range(30)] + [{"id": "big", "text": "1000000000000"}]
    job = make_job(rows, prompt={"template": "{{ 'x' * (text | int) }}"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 1, result.stderr
    out = pl.read_parquet(job.output)
    assert out.filter(pl.col("id") == "big").get_column("error_type").item() == "render_limit"
    assert out.filter(pl.col("id") != "big").get_column("status").unique().to_list() == ["ok"]
    assert sim.stats()["requests"] == 1  # the 30 others share one prompt


def test_an_unknown_filter_is_one_line_naming_the_file_and_key(make_job, sim) -> None:
    job = make_job(prompt={"template": None, "messages": [{"role": "user", "content": "{{ text | no_such_filter }}"}]})

    for command in ("validate", "run"):
        assert_refused(cli(command, str(job.spec)), "prompt.messages.0.content", "No filter named 'no_such_filter'")
    assert sim.stats()["requests"] == 0


def template_file_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """template_file targets that are no text file of the user's, and what the refusal says."""
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "huge.j2").write_bytes(b"{{ text }}" + b" " * 3_000_000)
    return {
        "/dev/zero": ("/dev/zero", "system file"),
        "a FIFO": (str(fifo), "not a regular file"),
        "a directory": (str(tmp_path / "a-directory"), "directory"),
        "a huge file": (str(tmp_path / "huge.j2"), "over 2,000,000"),
        "the process environment": ("/proc/self/environ", "system file"),
    }


@pytest.mark.parametrize("case", ["/dev/zero", "a FIFO", "a directory", "a huge file", "the process environment"])
def test_template_file_must_be_a_regular_text_file_of_bounded_size(make_job, tmp_path, sim, case) -> None:
    target, said = template_file_cases(tmp_path)[case]
    job = make_job(prompt={"template": None, "template_file": target})

    result = cli_within("validate", str(job.spec))

    assert_refused(result, "prompt.template_file", said)
    assert API_KEY not in result.stdout + result.stderr
    assert sim.stats()["requests"] == 0


def alias_bomb(levels: int = 9) -> str:
    """A YAML billion laughs: each level a list of nine aliases to the one before."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


YAML_CASES = {
    "an alias bomb in output.schema": (
        lambda spec: spec.replace("output:\n", "bomb:\n" + _indent(alias_bomb()) + "\noutput:\n  schema: *l8\n"),
        "aliases",
    ),
    "20,000-deep lists": (lambda spec: spec + "deep: " + "[" * 20_000 + "]" * 20_000 + "\n", "invalid YAML"),
    "20,000-deep mappings": (
        lambda spec: spec + "deep: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n",
        "invalid YAML",
    ),
    "a list as a key": (lambda spec: spec + "? [1, 2]\n: x\n", "a key is a list or mapping"),
}


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


@pytest.mark.parametrize("case", YAML_CASES.values(), ids=YAML_CASES.keys())
def test_hostile_yaml_is_refused_at_once(make_job, sim, case) -> None:
    edit, said = case
    job = make_job()
    job.spec.write_text(edit(job.spec.read_text(encoding="utf-8")), encoding="utf-8")

    assert_refused(cli_within("validate", str(job.spec)), said)


def test_a_spec_that_is_a_fifo_is_refused_without_waiting(tmp_path) -> None:
    os.mkfifo(tmp_path / "job.yaml")

    assert_refused(cli_within("validate", str(tmp_path / "job.yaml")), "not a regular file")


def test_an_alias_bomb_in_a_set_value_is_refused(make_job) -> None:
    job = make_job()
    bomb = "{" + alias_bomb().replace("\n", ", ") + "}"

    assert_refused(cli_within("validate", str(job.spec), "--set", f"simulator.faults={bomb}"), "--set", "aliases")


# --- 8. secrets and keys -------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\r\n", "\n", "  "])
def test_a_key_with_a_trailing_line_end_or_spaces_is_used_without_them(make_job, sim, monkeypatch, ending) -> None:
    monkeypatch.setenv("ZHIPUAI_API_KEY", API_KEY + ending)
    job = make_job([{"id": "a", "text": "hello"}])

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert sim.stats()["requests"] == 1


@pytest.mark.parametrize("command", ["run", "doctor"])
@pytest.mark.parametrize("key", [API_KEY[:10] + " " + API_KEY[10:], API_KEY[:10] + "\x07" + API_KEY[10:], "ключ"])
def test_a_key_with_whitespace_or_control_characters_inside_is_refused_naming_the_variable(
    make_job, sim, monkeypatch, key, command
) -> None:
    monkeypatch.setenv("ZHIPUAI_API_KEY", key)
    job = make_job()

    result = cli(command, str(job.spec))

    assert_refused(result, "$ZHIPUAI_API_KEY", "the API key has")
    assert "Connection error" not in result.stderr
    assert sim.stats()["requests"] == 0


def test_a_key_pasted_into_the_endpoint_urls_query_is_never_written(make_job, tmp_path, sim) -> None:
    """Whether or not the endpoint takes such a URL, the key in it never reaches a log line, the summary,
    the manifest, the ledger or any other file the run writes. (A key as the URL's user-info is refused
    at load: tests/test_error_shapes.py.)"""
    secret = "PASTEDSECRET0123456789"
    job = make_job(model={"endpoint": f"{sim.url}?key={secret}"})

    result = cli("run", str(job.spec))

    assert result.exit_code in (0, 1, 3), result.stderr  # answered, rows failed, or the endpoint refused
    assert secret not in result.stdout + result.stderr  # the log lines and the last line
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and job.summary.exists()
    for path in written:
        if path != job.spec:
            assert secret.encode() not in path.read_bytes(), path
    assert "***" in json.loads(job.summary.read_text(encoding="utf-8"))["endpoint"]


# --- 10. messages name the key as written, and where it came from -----------------------------------


def test_an_unknown_key_that_is_not_an_identifier_is_named_in_full(make_job) -> None:
    job = make_job(run={"max-attempts": 3})

    assert_refused(cli("validate", str(job.spec)), "run.max-attempts: unknown key")


def test_an_unknown_key_from_set_names_set(make_job) -> None:
    job = make_job()

    assert_refused(
        cli("validate", str(job.spec), "--set", "run.max-attempts=3"),
        "run.max-attempts: unknown key (from --set run.max-attempts=3)",
    )


def test_a_bad_value_from_set_names_set(make_job) -> None:
    job = make_job()

    assert_refused(
        cli("validate", str(job.spec), "--set", "run.max_attempts=many"), "(from --set run.max_attempts=many)"
    )


def test_a_name_too_long_is_said_to_be_too_long_not_a_permission_problem(make_job) -> None:
    job = make_job()
    job.spec.write_text(job.spec.read_text(encoding="utf-8").replace("name: job", "name: " + "n" * 300))

    result = cli("validate", str(job.spec))

    assert_refused(result, "too long")
    assert "permission" not in result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [("run.batch.max_rounds", "true"), ("run.batch.poll_initial_s", "yes"), ("simulator.seed", "on")],
)
def test_booleans_do_not_pass_as_numbers(make_job, key, value) -> None:
    job = make_job()

    assert_refused(cli("validate", str(job.spec), "--set", f"{key}={value}"), key, "expected a number")
