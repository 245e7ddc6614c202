"""Rules that live in one place, pinned where their users must agree: which answers settle a request
(a run and its estimate), and how a side file that is torn or foreign reads back (as none)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from runner.files import read_manifest
from runner.job.prompts import RequestBuilder
from runner.job.resolve import load_job
from runner.output.sinks import ParquetSink
from runner.records import Result, result_to_json
from runner.state.rowmap import RowMap
from runner.state.store import Store
from tests.conftest import cli, sample_rows, write_csv


def answered_already(spec: Path, *flags: str) -> int:
    """How many rows `run --dry-run` (the estimate of exactly that run) counts as answered already."""
    found = re.search(r"\(([\d,]+) already answered\)", cli("run", str(spec), "--dry-run", *flags).stdout)
    assert found is not None
    return int(found.group(1).replace(",", ""))


def test_a_run_and_its_estimate_settle_the_same_rows_with_or_without_retry_failed(make_job, sim) -> None:
    """Answered ok, or failed for good unless --retry-failed: in the answer files and in a journal a
    killed run left, the estimate counts exactly the rows the run then does not send."""
    rows = sample_rows(6) + [{"id": f"bad{i}", "text": f"BAD row {i}"} for i in range(2)]
    job = make_job(rows, run={"max_attempts": 1})
    sim.configure(faults=("400_1261",), fault_attempts=99, fault_match="BAD")  # failed for good
    assert cli("run", str(job.spec)).exit_code == 1
    new = sample_rows(2, start=100)
    write_csv(job.input, rows + new)
    spec = load_job(job.spec)
    key = RequestBuilder(spec).build(new[0]).key
    killed = Result(key=key, status="ok", attempts=1, latency_ms=1.0, finished_at=dt.datetime.now(dt.UTC))
    (spec.state_dir / "journal-killed.jsonl").write_text(result_to_json(killed) + "\n", encoding="utf-8")

    assert answered_already(job.spec, "--retry-failed") == 7  # 6 ok + the journalled one
    assert answered_already(job.spec) == 9  # and the 2 that failed for good
    assert cli("run", str(job.spec)).exit_code == 1
    assert json.loads(job.summary.read_text())["rows_settled_before"] == 9

    assert answered_already(job.spec, "--retry-failed") == 8
    assert cli("run", str(job.spec), "--retry-failed").exit_code == 1
    assert json.loads(job.summary.read_text())["rows_settled_before"] == 8


@pytest.mark.parametrize("content", [b"", b"{torn", b"[1, 2]", b'"a string"', b"\xff\xfe{}"])
def test_a_torn_or_foreign_side_file_reads_as_none(tmp_path: Path, content: bytes) -> None:
    """The row map's seal, the output's record, the kept estimate and the manifest: each is a JSON
    object glm-batch wrote, or nothing (then it is rebuilt or ignored), never a crash."""
    state = tmp_path / "state"
    (state / "rows").mkdir(parents=True)
    for name in ("rows/fingerprint.json", "estimate.json", "output.json", "manifest.json"):
        (state / name).write_bytes(content)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"")

    assert RowMap(state / "rows").fingerprint() is None
    assert Store(state, run_id="r").read_estimate() is None
    assert ParquetSink(output, state).current_counts({}) is None
    assert read_manifest(state) == {"runs": []}


def test_a_manifest_that_is_there_but_does_not_read_is_never_replaced(tmp_path: Path) -> None:
    """An absent or torn manifest reads as no runs; one that cannot be read at all raises, so a run
    never records itself over a history it could not read."""
    assert read_manifest(tmp_path) == {"runs": []}
    (tmp_path / "manifest.json").mkdir()  # is a directory: it does not read
    with pytest.raises(IsADirectoryError):
        read_manifest(tmp_path)
