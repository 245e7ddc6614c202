"""`status`: how many rows are answered ok, failed or pending. After a finished run it reads the counts
the output was written with (a small JSON record) instead of joining the row map with the answers;
the two must always agree, and anything that changed since (new input rows, new answers) is counted
the long way."""

from __future__ import annotations

from collections.abc import Callable

from runner.job.resolve import Job, load_job
from runner.runs import fingerprint
from runner.state.store import Store
from tests.conftest import JobFiles, cli, sample_rows, write_csv


def both_counts(job: Job) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """What the output's record says, and what joining the row map with the answers says."""
    store = Store(job.state_dir, run_id="test")
    parts = [p.name for p in store.result_parts()]
    recorded = store.rows.recorded_progress(job.state_dir / "output.json", parts, fingerprint(job))
    return recorded, store.progress(job.spec.output.samples)


def test_a_finished_job_with_failed_rows_is_counted_the_same_from_its_record(
    make_job: Callable[..., JobFiles],
) -> None:
    # Two rows fail without being sent: a null the prompt reads (input.nulls: skip) and a prompt over
    # the context window.
    rows = [*sample_rows(6), {"id": "empty", "text": None}, {"id": "huge", "text": "word " * 180_000}]
    files = make_job(rows, input={"nulls": "skip"})
    assert cli("run", str(files.spec)).exit_code == 1

    recorded, joined = both_counts(load_job(files.spec))

    assert recorded == joined == {"ok": 6, "failed": 1, "skipped": 1, "pending": 0}
    printed = cli("status", str(files.spec)).stdout
    assert "6 rows answered ok, 1 failed, 1 skipped (input.nulls: skip), 0 pending" in printed


def test_rows_added_to_the_input_after_a_run_are_pending(make_job: Callable[..., JobFiles]) -> None:
    files = make_job(sample_rows(5))
    assert cli("run", str(files.spec)).exit_code == 0
    assert both_counts(load_job(files.spec)) == ({"ok": 5, "failed": 0, "skipped": 0, "pending": 0},) * 2

    write_csv(files.input, sample_rows(8))  # the record was written from the old input: not used

    recorded, _ = both_counts(load_job(files.spec))
    assert recorded is None
    assert "5 rows answered ok, 0 failed, 3 pending" in cli("status", str(files.spec)).stdout


def test_answers_added_since_the_output_was_written_are_counted(make_job: Callable[..., JobFiles]) -> None:
    """A later run that added answers but wrote no output (stopped by its budget, say) leaves the
    record of the earlier output behind; its answer files are no longer the record's."""
    files = make_job(sample_rows(4))
    assert cli("run", str(files.spec)).exit_code == 0
    job = load_job(files.spec)
    extra = job.state_dir / "results" / "part-later-000.parquet"
    first = sorted((job.state_dir / "results").glob("*.parquet"))[0]
    extra.write_bytes(first.read_bytes())  # the same answers under a new name: a new answer file

    recorded, joined = both_counts(job)
    assert recorded is None
    assert joined == {"ok": 4, "failed": 0, "skipped": 0, "pending": 0}
    assert "4 rows answered ok, 0 failed, 0 pending" in cli("status", str(files.spec)).stdout


def test_status_only_reads_so_an_unwritable_destination_does_not_stop_it(
    make_job: Callable[..., JobFiles], tmp_path
) -> None:
    (tmp_path / "blocker").write_text("a file where the output's folder would be\n", encoding="utf-8")
    files = make_job(sample_rows(2), output={"path": "blocker/out.parquet"})

    assert cli("validate", str(files.spec)).exit_code == 2  # a run would write there: refused
    shown = cli("status", str(files.spec))

    assert shown.exit_code == 0, shown.stderr
    assert "never run" in shown.stdout
