"""Hostile specs and inputs: data loss, absurd numbers, nulls, nested values, duplicate ids, unwritable
destinations and empty inputs. Each is refused in one line with exit 2 and nothing sent, or (an empty
input) ends with exit 0 and "nothing to do"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from runner.simulator.answers import answer_for
from tests.conftest import cli, sample_rows
from tests.test_bad_input import assert_refused


def write_parquet(path: Path, frame: pl.DataFrame) -> Path:
    """Write a Parquet input under the test's data folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return path


def parquet_rows(n: int = 5) -> pl.DataFrame:
    """n rows with an id and a text, as a DataFrame."""
    return pl.DataFrame(sample_rows(n))


# --- 1. an output or state directory that would destroy (or be read as) input ----------------------


def test_an_output_path_equal_to_the_input_is_refused_and_the_input_kept(make_job, tmp_path: Path, sim) -> None:
    data = write_parquet(tmp_path / "data" / "in.parquet", parquet_rows())
    before = data.read_bytes()
    job = make_job(input={"paths": ["data/in.parquet"]}, output={"path": "data/in.parquet"})

    assert_refused(cli("run", str(job.spec)), "output.path", "would overwrite the input", "in.parquet")
    assert data.read_bytes() == before
    assert sim.stats()["requests"] == 0


DESTINATIONS = {
    "state_dir is the input file": ({"output": {"state_dir": "data/job.csv"}}, ["output.state_dir", "overwrite"]),
    "state_dir inside the input file": (
        {"output": {"state_dir": "data/job.csv/state"}},
        ["output.state_dir", "overwrite"],
    ),
    "output matching an input glob": (
        {"input": {"paths": ["data/*.parquet"]}, "output": {"path": "data/out.parquet"}},
        ["output.path", "'data/*.parquet'", "its own output"],
    ),
    "state_dir an input glob reaches into": (
        {"input": {"paths": ["data/*/*.parquet"]}, "output": {"state_dir": "data/state"}},
        ["output.state_dir", "'data/*/*.parquet'"],
    ),
}


@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_a_destination_that_is_an_input_is_refused(make_job, tmp_path: Path, case: str) -> None:
    write_parquet(tmp_path / "data" / "a" / "in.parquet", parquet_rows())
    write_parquet(tmp_path / "data" / "in.parquet", parquet_rows())
    change, fragments = DESTINATIONS[case]
    job = make_job(**change)

    assert_refused(cli("validate", str(job.spec)), str(job.spec), *fragments)


def test_an_output_path_equal_to_the_spec_is_refused(make_job, tmp_path: Path) -> None:
    job = make_job(output={"path": "job.parquet"})
    spec = job.spec.rename(tmp_path / "job.parquet")
    before = spec.read_bytes()

    assert_refused(cli("run", str(spec)), "output.path", "the job spec itself")
    assert spec.read_bytes() == before


# --- 2. every number is bounded, finite and not a bool --------------------------------------------

BOUNDS: dict[str, tuple[str, Any, list[str]]] = {
    "concurrency a billion": ("run.concurrency", 10**9, ["4096"]),
    "max_concurrency": ("run.max_concurrency", 100_000, ["4096"]),
    "requests_per_minute": ("run.requests_per_minute", 1e12, ["1000000000"]),
    "tokens_per_minute": ("run.tokens_per_minute", 1e12, ["1000000000"]),
    "max_attempts": ("run.max_attempts", 1000, ["100"]),
    "timeout_s nan": ("run.timeout_s", ".nan", ["finite"]),
    "timeout_s huge": ("run.timeout_s", 1e9, ["86400"]),
    "timeout_s zero": ("run.timeout_s", 0, ["greater than 0"]),
    "backoff_initial_s": ("run.backoff_initial_s", 1e6, ["3600"]),
    "backoff_max_s negative": ("run.backoff_max_s", -1, ["greater than 0"]),
    "checkpoint_rows": ("run.checkpoint_rows", 10**9, ["10000000"]),
    "checkpoint_seconds inf": ("run.checkpoint_seconds", ".inf", ["finite"]),
    "max_cost inf": ("run.max_cost", ".inf", ["finite"]),
    "max_cost negative": ("run.max_cost", -5, ["greater than 0"]),
    "grace_s": ("run.grace_s", -0.5, ["greater than or equal to 0"]),
    "input.limit": ("input.limit", 10**13, ["1000000000000"]),
    "max_tokens": ("model.max_tokens", 10**9, ["1000000"]),
    "top_k": ("model.top_k", 10**6, ["1000"]),
    "temperature nan": ("model.temperature", ".nan", ["finite"]),
    "max_repairs": ("output.max_repairs", 1000, ["10"]),
    "a yes is not a number": ("run.concurrency", "yes", ["expected a number, got true"]),
    "price inf": ("model.prices", "{input: .inf, output: 1}", ["model.prices.input", "finite"]),
}


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_an_absurd_number_is_refused_naming_its_bound(make_job, sim, case: str) -> None:
    key, value, fragments = BOUNDS[case]
    job = make_job()

    result = cli("validate", str(job.spec), "--set", f"{key}={value}")

    assert_refused(result, str(job.spec), key.split(".prices")[0], *fragments)
    assert sim.stats()["requests"] == 0


def test_a_run_with_an_absurd_concurrency_sends_nothing(make_job, sim) -> None:
    job = make_job(run={"concurrency": 1_000_000_000})

    assert_refused(cli("run", str(job.spec)), "run.concurrency", "less than or equal to 4096")
    assert sim.stats()["requests"] == 0


def test_numbers_given_as_text_are_read_as_numbers(make_job, sim) -> None:
    job = make_job(run={"concurrency": "8", "timeout_s": "30"}, model={"max_tokens": "64"})

    result = cli("validate", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert "concurrency 8" in result.stdout


# --- 3. nulls in the columns the prompt reads -----------------------------------------------------


def null_rows() -> list[dict[str, str]]:
    """Four rows; the second has no text (an empty CSV field is a null)."""
    rows = sample_rows(4)
    rows[1]["text"] = ""
    return rows


def test_a_null_in_a_prompt_column_is_refused_by_default(make_job, sim) -> None:
    job = make_job(null_rows(), prompt={"system": "Be brief.", "template": "{{ id }}: {{ text }}"})

    for command in ("validate", "run"):
        assert_refused(
            cli(command, str(job.spec)),
            "input.nulls: 1 rows have a null",
            "'text' in 1",
            "input.nulls: skip",
            "input.nulls: empty",
        )
    assert sim.stats()["requests"] == 0


def test_nulls_skip_records_the_row_as_skipped_and_sends_the_rest(make_job, sim) -> None:
    job = make_job(null_rows(), input={"nulls": "skip"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert sim.stats()["requests"] == 3
    out = pl.read_parquet(job.output)
    skipped = out.row(1, named=True)
    assert skipped["status"] == "skipped" and skipped["error_type"] == "null_input"
    assert "'text'" in skipped["error_message"] and "null" in skipped["error_message"]
    assert skipped["response_text"] is None
    assert out.get_column("status").to_list() == ["ok", "skipped", "ok", "ok"]


def test_nulls_skip_records_error_type_null_input(make_job) -> None:
    job = make_job(null_rows(), input={"nulls": "skip"})

    cli("run", str(job.spec))

    assert pl.read_parquet(job.output).row(1, named=True)["error_type"] == "null_input"


def test_nulls_empty_renders_an_empty_string_never_none(make_job, sim) -> None:
    job = make_job(null_rows(), input={"nulls": "empty"}, prompt={"template": "Summarise: {{ text | upper }}"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    answers = pl.read_parquet(job.output).get_column("response_text").to_list()
    assert answers[1] == answer_for("Be brief.\nSummarise: ")


# --- 4. structs and lists print as JSON -------------------------------------------------------------


def test_structs_and_lists_render_as_json(make_job, tmp_path: Path, sim) -> None:
    frame = pl.DataFrame({"id": ["a"], "item": [{"name": "café", "n": 2}], "tags": [["x", "ü"]]})
    write_parquet(tmp_path / "data" / "nested.parquet", frame)
    job = make_job(
        input={"paths": ["data/nested.parquet"]},
        prompt={"template": "{{ item }}|{{ item.name }}|{{ tags }}"},
        output={"keep_columns": []},
    )

    result = cli("validate", str(job.spec), "--rows", "1")

    assert result.exit_code == 0, result.stderr
    assert '{"name": "café", "n": 2}|café|["x", "ü"]' in result.stdout
    assert sim.stats()["requests"] == 0


def test_binary_cells_render_as_their_text_and_nan_inside_a_struct_as_null(make_job, tmp_path: Path, sim) -> None:
    frame = pl.DataFrame(
        {"id": ["a", "b"], "blob": [b"caf\xc3\xa9", b"\xff\xfe"], "item": [{"x": float("nan")}, {"x": 1.5}]}
    )
    write_parquet(tmp_path / "data" / "odd.parquet", frame)
    job = make_job(
        input={"paths": ["data/odd.parquet"]}, prompt={"template": "{{ blob }}|{{ item }}"}, output={"keep_columns": []}
    )

    result = cli("run", str(job.spec))

    assert result.exit_code == 1, result.stderr  # a row failed: never sent as b'...'
    out = pl.read_parquet(job.output).sort("id")
    assert out.get_column("response_text").to_list()[0] == answer_for('Be brief.\ncafé|{"x": null}')
    assert out.get_column("error_type").to_list() == [None, "render_error"]
    assert "not UTF-8 text" in out.get_column("error_message").to_list()[1]
    assert sim.stats()["requests"] == 1


# --- 5. duplicate ids --------------------------------------------------------------------------------


def test_duplicate_ids_are_refused(make_job, sim) -> None:
    rows = [{"id": i, "text": f"t{n}"} for n, i in enumerate(["a", "b", "a", "c", "c", "c", "d"])]
    job = make_job(rows)

    for command in ("validate", "run"):
        assert_refused(
            cli(command, str(job.spec)), "input.id_column", "2 id values appear on more than one row", "'a', 2 times"
        )
    assert sim.stats()["requests"] == 0


def test_integer_ids_are_written_as_text(make_job, tmp_path: Path, sim) -> None:
    write_parquet(tmp_path / "data" / "ints.parquet", pl.DataFrame({"id": [1, 2], "text": ["x", "y"]}))
    job = make_job(input={"paths": ["data/ints.parquet"]})

    assert cli("run", str(job.spec)).exit_code == 0

    ids = pl.read_parquet(job.output).get_column("id")
    assert ids.dtype == pl.String and sorted(ids.to_list()) == ["1", "2"]


def test_ids_of_mixed_types_are_compared_as_text(make_job, tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "a.parquet", pl.DataFrame({"id": [1, 2], "text": ["x", "y"]}))
    write_parquet(tmp_path / "data" / "b.parquet", pl.DataFrame({"id": ["3", "4"], "text": ["z", "w"]}))
    job = make_job(input={"paths": ["data/a.parquet", "data/b.parquet"]})

    assert cli("validate", str(job.spec)).exit_code == 0

    write_parquet(tmp_path / "data" / "b.parquet", pl.DataFrame({"id": ["3", "1"], "text": ["z", "w"]}))
    assert_refused(cli("validate", str(job.spec)), "input.id_column", "'1', 2 times")


# --- 6. an output or state directory that cannot be written ----------------------------------------


def test_an_output_directory_that_is_a_file_is_refused(make_job, tmp_path: Path, sim) -> None:
    (tmp_path / "blocker").write_text("a file\n", encoding="utf-8")
    job = make_job(output={"path": "blocker/out.parquet"})

    assert_refused(cli("run", str(job.spec)), "output.path", "blocker is a file")
    assert sim.stats()["requests"] == 0


def test_a_state_dir_that_is_a_file_is_refused(make_job, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file\n", encoding="utf-8")
    job = make_job(output={"state_dir": "blocker"})

    assert_refused(cli("validate", str(job.spec)), "output.state_dir", "blocker is a file")


def test_an_output_path_that_is_a_directory_is_refused(make_job, tmp_path: Path) -> None:
    (tmp_path / "out" / "job.parquet").mkdir(parents=True)
    job = make_job()

    assert_refused(cli("validate", str(job.spec)), "output.path", "is a directory")


def test_an_unwritable_output_directory_is_refused(make_job, tmp_path: Path, sim) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked
        try:  # root writes anywhere on a writable mount; /proc/1 refuses even root
            (locked / "probe").touch()
            (locked / "probe").unlink()
            target = Path("/proc/1")
        except PermissionError:
            pass
        if not target.is_dir():
            pytest.skip("no unwritable directory to test with")
        job = make_job(output={"path": str(target / "out.parquet")})

        assert_refused(cli("run", str(job.spec)), "output.path", f"cannot write in {target}")
        assert sim.stats()["requests"] == 0
    finally:
        locked.chmod(0o755)


# --- 7. an input with no rows is nothing to do -------------------------------------------------------


@pytest.mark.parametrize("content", ["header only", "0 bytes"])
def test_an_empty_input_is_nothing_to_do(make_job, sim, content: str) -> None:
    job = make_job(rows=[])
    if content == "0 bytes":
        job.input.write_bytes(b"")

    for command in ("run", "validate"):
        result = cli(command, str(job.spec))
        assert result.exit_code == 0, result.stderr
        assert "nothing to do" in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    assert sim.stats()["requests"] == 0
    assert not job.output.exists()


def test_nothing_to_do_leaves_standard_output_to_the_json_a_command_prints(make_job, sim) -> None:
    """The notice is for the person or the cron log (stderr); a script reading `estimate --json` gets
    JSON or nothing on stdout, never the notice."""
    job = make_job(rows=[])
    result = cli("estimate", "--json", str(job.spec))
    assert result.exit_code == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert result.stdout.strip() == "" or json.loads(result.stdout) is not None, result.stdout
    assert sim.stats()["requests"] == 0


# --- and the rest a hostile user tries --------------------------------------------------------------


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(make_job, tmp_path: Path) -> None:
    job = make_job(sample_rows(3))
    job.input.write_bytes(b"\xef\xbb\xbf" + job.input.read_bytes())

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(job.output).get_column("id").to_list() == ["r000000", "r000001", "r000002"]


CSV_HEADERS = {
    "a column named twice": (b"id,text,text\nr1,first,second\n", "'text' twice"),
    "UTF-16 text": ("id,text\nr1,first\n".encode("utf-16"), "UTF-16"),
    "UTF-16 without its mark": ("id,text\nr1,first\n".encode("utf-16-le"), "NUL bytes"),
}


@pytest.mark.parametrize("raw,why", CSV_HEADERS.values(), ids=CSV_HEADERS.keys())
def test_a_csv_whose_header_would_be_misread_is_refused(make_job, sim, raw: bytes, why: str) -> None:
    """Polars renames a second `text` to `text_duplicated_0` and reads UTF-16 as garbled UTF-8, NULs
    and all: the prompt would read the first column silently, or garbage."""
    job = make_job(sample_rows(1))
    job.input.write_bytes(raw)

    for command in ("validate", "run"):
        assert_refused(cli(command, str(job.spec)), str(job.input), why)
    assert sim.stats()["requests"] == 0


def test_a_csv_header_may_repeat_empty_names(make_job, sim) -> None:
    job = make_job(sample_rows(1))
    job.input.write_text("id,text,,\nr1,first,,\n", encoding="utf-8")  # a spreadsheet's trailing commas

    assert cli("run", str(job.spec)).exit_code == 0


@pytest.mark.parametrize("used", ["all columns", "some columns"])
def test_a_ragged_csv_row_is_refused_naming_the_file(make_job, sim, used: str) -> None:
    job = make_job(sample_rows(3))
    with job.input.open("a", encoding="utf-8") as f:
        f.write("r9,hello, world\n")  # an unquoted comma: a field more than the header
    if used == "some columns":  # polars reads a projection of the file without noticing the extra field
        data = yaml.safe_load(job.spec.read_text(encoding="utf-8"))
        data["output"]["keep_columns"] = []
        del data["input"]["id_column"]
        data["prompt"]["template"] = "{{ text }}"
        job.spec.write_text(yaml.safe_dump(data), encoding="utf-8")

    assert_refused(cli("run", str(job.spec)), str(job.input), "more fields than the header")
    assert sim.stats()["requests"] == 0


def test_a_column_name_with_a_space_is_explained(make_job) -> None:
    job = make_job(
        rows=[{"id": "a", "my text": "x"}], prompt={"template": "{{ my_text }}"}, output={"keep_columns": []}
    )

    assert_refused(cli("validate", str(job.spec)), "my_text", "'my text' is not a template variable")

    job = make_job(
        rows=[{"id": "a", "my text": "x"}], prompt={"template": "{{ my text }}"}, output={"keep_columns": []}
    )
    assert_refused(cli("validate", str(job.spec)), "prompt.template", "syntax error")


def test_set_of_an_unknown_key_says_it_came_from_set(make_job) -> None:
    job = make_job()

    assert_refused(
        cli("validate", str(job.spec), "--set", "run.concurency=4"),
        "run.concurency",
        "unknown key (from --set run.concurency=4)",
    )


def test_a_spec_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jobs.yaml").mkdir()

    assert_refused(cli("validate", str(tmp_path / "jobs.yaml")), "cannot read the job spec")


def test_a_job_still_pickles(make_job) -> None:
    import pickle

    from runner.job.resolve import load_job

    job = load_job(make_job(input={"nulls": "empty"}).spec)

    assert pickle.loads(pickle.dumps(job)).template.render({"text": {"a": 1}}) == 'Summarise: {"a": 1}'


def test_a_prompt_over_the_context_window_fails_its_row_and_is_never_sent(make_job, sim) -> None:
    """A 2 MB cell (about half a million tokens, over glm-4.6's window) is refused locally at run
    time: its row fails with the reason, the other rows are answered, and the endpoint never sees it."""
    rows = [*sample_rows(3), {"id": "huge", "text": "word " * 400_000}]
    job = make_job(rows=rows)
    result = cli("run", str(job.spec))
    assert result.exit_code == 1
    out = pl.read_parquet(job.output)
    huge = out.filter(pl.col("id") == "huge")
    assert huge.get_column("error_type").item() == "over_context"
    assert "context window" in huge.get_column("error_message").item()
    assert out.filter(pl.col("id") != "huge").get_column("status").to_list() == ["ok"] * 3
    assert sim.stats()["requests"] == 3
