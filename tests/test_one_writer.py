"""One way to write a file (issue 25, class 3): what a command writes where the user points it
(`report --html`, `schema -o`, `init -o`) goes through runner.files.write_text, which never
writes over the job's own files (symlinks resolved, --force or not), never replaces a file glm-batch did
not write without --force, writes all or nothing, and says in one line (exit 2) why a target cannot be
written. An output under a symlink into the input folder is refused at load.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.test_bad_input import assert_refused
from tests.test_broken_state import small_disk

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def finished(make_job, sim):
    """A job that has run: its input, spec, output and summary all exist."""
    job = make_job()
    assert cli("run", str(job.spec)).exit_code == 0
    return job


def _contents(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "--force"])
def test_report_html_never_writes_over_a_file_of_the_job(finished, tmp_path: Path, force: list[str]) -> None:
    job = finished
    state = job.output.parent / ".glm-batch" / "job" / "manifest.json"
    before = _contents(job.input, job.spec, job.output, job.summary, state)
    link = tmp_path / "innocent.html"
    link.symlink_to(job.input)  # a name that looks harmless, resolving to the input

    for target, what in [
        (job.input, "an input of the job"),
        (job.spec, "the job spec"),
        (job.output, "the job's output"),
        (job.summary, "the job's summary"),
        (state, "the job's state directory"),
        (link, "an input of the job"),
    ]:
        assert_refused(cli("report", str(job.spec), "--html", str(target), *force), "--html", what)
        # Given the output file alone, the job's files are found through the summary beside it.
        assert_refused(cli("report", str(job.output), "--html", str(target), *force), "--html")

    assert _contents(job.input, job.spec, job.output, job.summary, state) == before


def test_report_html_replaces_its_own_page_but_another_file_only_with_force(finished, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert cli("report", str(finished.spec), "--html", str(page)).exit_code == 0
    assert cli("report", str(finished.spec), "--html", str(page)).exit_code == 0  # its own: replaced
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>", encoding="utf-8")

    assert_refused(cli("report", str(finished.spec), "--html", str(notes)), "glm-batch did not write it", "--force")
    assert notes.read_text(encoding="utf-8") == "<p>my notes</p>"
    assert cli("report", str(finished.spec), "--html", str(notes), "--force").exit_code == 0
    assert "glm-batch report" in notes.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # nothing half-written left


def test_schema_o_replaces_its_own_schema_but_another_file_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "job.schema.json"
    assert cli("schema", "-o", str(target)).exit_code == 0
    assert cli("schema", "-o", str(target)).exit_code == 0
    mine = tmp_path / "data.csv"
    mine.write_text("id,text\n1,precious\n", encoding="utf-8")

    assert_refused(cli("schema", "-o", str(mine)), "-o", "glm-batch did not write it")
    assert mine.read_text(encoding="utf-8") == "id,text\n1,precious\n"
    assert cli("schema", "-o", str(mine), "--force").exit_code == 0


def test_schema_o_never_writes_over_a_job_output_or_state_even_with_force(finished) -> None:
    manifest = finished.output.parent / ".glm-batch" / "job" / "manifest.json"
    before = _contents(finished.output, manifest)

    assert_refused(cli("schema", "-o", str(finished.output), "--force"), "a job's output")
    assert_refused(cli("schema", "-o", str(manifest), "--force"), "a job's state directory")
    assert _contents(finished.output, manifest) == before


def test_no_named_file_is_written_over_a_job_spec_even_with_force(finished, tmp_path: Path) -> None:
    """`schema -o` knows no job, and `report --html` only the one it reports: a job spec is still
    never replaced (it is found by what it is, a YAML with top-level input and prompt), nor through a link."""
    other = tmp_path / "other.yml"
    other.write_text(finished.spec.read_text(encoding="utf-8"), encoding="utf-8")
    link = tmp_path / "link.yaml"
    link.symlink_to(finished.spec)
    before = _contents(finished.spec, other)

    for target in (finished.spec, other, link):
        assert_refused(cli("schema", "-o", str(target), "--force"), "-o", "a job spec")
    assert_refused(cli("report", str(finished.spec), "--html", str(other), "--force"), "--html", "a job spec")
    assert _contents(finished.spec, other) == before


def test_init_never_writes_over_its_input_or_any_file(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("id,text\n1,precious\n", encoding="utf-8")
    link = tmp_path / "job.yaml"
    link.symlink_to(data)

    assert_refused(cli("init", str(data), "-o", str(data)), "already exists")
    assert_refused(cli("init", str(data), "-o", str(link)), "already exists")
    assert data.read_text(encoding="utf-8") == "id,text\n1,precious\n"


TARGETS = {
    "a directory": (lambda tmp: tmp, "directory"),
    "a missing folder": (lambda tmp: tmp / "no" / "such" / "folder" / "x.out", "does not exist"),
    "/dev/full": (lambda tmp: Path("/dev/full"), "not a regular file"),
    "a file as a folder": (lambda tmp: tmp / "plain.txt" / "x.out", "not a folder"),
}


@pytest.mark.parametrize("case", sorted(TARGETS))
def test_a_target_that_cannot_be_written_is_one_line_and_exit_2(finished, tmp_path: Path, case: str) -> None:
    if case == "/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    (tmp_path / "plain.txt").write_text("x", encoding="utf-8")
    make, why = TARGETS[case]
    target = str(make(tmp_path))

    assert_refused(cli("report", str(finished.spec), "--html", target), "--html", why)
    assert_refused(cli("schema", "-o", target), "-o", why)
    if case != "a missing folder":  # init makes the folder its job goes in
        assert_refused(cli("init", str(finished.input), "-o", target), "--output")


def test_a_read_only_folder_is_one_line_and_exit_2(finished, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user writes anywhere (root without a read-only mount)")
        assert_refused(cli("schema", "-o", str(folder / "s.json")), "-o", "permission denied")
    finally:
        folder.chmod(0o755)


def test_a_full_disk_is_exit_5_and_a_read_only_one_exit_2_naming_the_path(finished, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "16k") as disk:
        with contextlib.suppress(OSError), (disk / "filler").open("wb", buffering=0) as filler:
            while True:  # until the disk is full
                filler.write(b"x" * 4096)
        page = disk / "report.html"
        result = cli("report", str(finished.spec), "--html", str(page))
        assert result.exit_code == 5 and result.stderr.count("\n") == 1, result.stderr
        assert "no space left" in result.stderr and str(page) in result.stderr
        assert [p.name for p in disk.iterdir()] == ["filler"]  # no half-written page, no temporary file

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert_refused(cli("schema", "-o", str(disk / "s.json")), str(disk / "s.json"), "read-only")


def test_an_output_under_a_symlink_into_the_input_folder_is_refused(make_job, tmp_path: Path, sim) -> None:
    job = make_job(input={"paths": ["data/*"]}, output={"path": "out/{name}.parquet"})
    (tmp_path / "out").symlink_to(tmp_path / "data")  # out/job.parquet is data/job.parquet

    for command in ("validate", "run"):
        assert_refused(cli(command, str(job.spec)), "output.path", "'data/*'", str(tmp_path / "data" / "job.parquet"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["job.csv"]
    assert sim.stats()["requests"] == 0


def test_a_usage_ledger_in_the_input_folder_is_refused(make_job, tmp_path: Path, sim, monkeypatch) -> None:
    job = make_job(input={"paths": ["data/*"]})
    monkeypatch.setenv("GLM_BATCH_LEDGER", str(tmp_path / "data"))  # its files would be read as input

    assert_refused(cli("run", str(job.spec)), "GLM_BATCH_LEDGER", "'data/*'")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["job.csv"]
    assert sim.stats()["requests"] == 0


def test_an_output_folder_whose_rescue_journals_an_input_pattern_would_read_is_refused(make_job, tmp_path, sim) -> None:
    # The output itself is not matched by data/*.jsonl, but a rescue journal beside it would be.
    job = make_job(input={"paths": ["data/*.jsonl", "data/*.csv"]}, output={"path": "data/out.parquet"})
    (tmp_path / "data" / "more.jsonl").write_text('{"id": "x", "text": "one more"}\n', encoding="utf-8")

    assert_refused(cli("run", str(job.spec)), "output.path", "a rescue journal", "'data/*.jsonl'")
    assert sim.stats()["requests"] == 0


# Files written outside runner/files.py, each streamed to the job's own state or a temporary name
# (then moved with files.fsync_rename) or appended to the job's own journal: nothing the user names.
STREAMED = {
    "runner/output/assemble.py": "scratch row ranges in the state directory",
    "runner/output/sinks.py": "the output, streamed to a temporary name, moved by fsync_rename",
    "runner/plan.py": "a spill file of queued keys in the state directory",
    "runner/state/lock.py": "the job's lock",
    "runner/state/store.py": "the journal (append-only) and compacted parts (fsync_rename)",
    "runner/send/batch/executor.py": "batch request bodies in the state directory",
    "runner/send/batch/book.py": "the batch book (append-only) in the state directory",
    "runner/send/batch/files.py": "batch upload files, moved by fsync_rename",
    "runner/cli/boundary.py": "/dev/null held on a closed standard stream",
    "runner/send/batch/probe.py": "doctor's two-line upload file, in a TemporaryDirectory of its own",
}
WRITES = re.compile(
    r"\.write_text\(|\.write_bytes\(|write_parquet\(|sink_parquet\(|write_csv\(|write_ndjson\("
    r"|\bopen\([^)]*[\"'][wax]b?[\"']|\.open\([\"'][wax]|os\.open\([^)]*O_(WRONLY|RDWR|CREAT)"
)


def test_every_file_is_written_through_runner_state_files() -> None:
    found = set()
    for path in sorted((ROOT / "runner").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "runner/files.py" or rel.startswith("runner/simulator/"):
            continue
        if WRITES.search(path.read_text(encoding="utf-8")):
            found.add(rel)

    assert found <= set(STREAMED), f"write through runner.files instead: {sorted(found - set(STREAMED))}"
