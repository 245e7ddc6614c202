"""No batch of a job runs unowned: a create whose answer was lost lands whenever it lands (after the job's
last run, from an input file since deleted), and the job still pays each line once.

The simulator holds a create (`batch_create_lands_after_s`, read while it is held) until the test lets
it land; a run is killed with kill -9 while its create is held, so its answer is lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from runner.send.batch.api import BatchAPI
from runner.send.batch.book import BatchBook
from runner.send.batch.duplicates import Twins, tag
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, JobFiles, cli, eventually, sample_rows, until
from tests.test_batch_api_client import write_batch_files
from tests.test_batch_billing import KILLED_MID_CREATE
from tests.test_batch_doc_facts import batch_requests
from tests.test_batch_mode import BATCH_MODEL, FAST_POLL, assert_paid_once, crash_env, expected

HELD = 3600.0  # a create held this long lands only when the test says so


def _killed_mid_create(files: JobFiles, sim: SimulatorThread, tmp_path: Path) -> None:
    """A run of `files` killed (kill -9) while its create is on the wire: the batch lands later, unheard."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_CREATE)
    killed = subprocess.run(
        [sys.executable, str(script), str(files.spec), sim.url], env=crash_env(tmp_path), capture_output=True
    )
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert "batch_created" not in sim.stats()["outcomes"]  # still on its way


# What the docs leave open (real-wire.md [U]) and the lookups depend on: the list's order, the timestamps' unit.
OLDEST_FIRST_IN_SECONDS = {"batch_list_order": "oldest", "batch_timestamps": "s"}


@pytest.mark.parametrize(
    ("look", "lands_as", "world"),
    [
        ("run", "validating", {}),  # the next run, with nothing left to send, cancels it before a line runs
        ("status", "validating", {}),  # so does `status`
        ("run", "completed", {}),  # it already ran: billed twice, reported, nothing taken from it
        ("run", "validating", OLDEST_FIRST_IN_SECONDS),
    ],
)
def test_a_lost_create_that_lands_after_the_jobs_last_run_is_cancelled_or_reported_by_the_next_look(
    make_job: Callable[..., JobFiles],
    sim: SimulatorThread,
    tmp_path: Path,
    look: str,
    lands_as: str,
    world: dict[str, str],
) -> None:
    """kill -9 mid-create; the resumed run finishes the job with a batch of its own; only then does the
    lost create land. The next run (nothing to send) or `status` finds the batch tagged for the job
    that its book does not keep and cancels it; one that already ran is reported and not harvested."""
    sim.configure(batch_create_lands_after_s=HELD, **world)
    rows = sample_rows(60)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    _killed_mid_create(files, sim, tmp_path)
    resumed = cli("run", str(files.spec))
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert sim.stats()["billed"]["batch"] == len(rows)
    output = pl.read_parquet(files.output)

    sim.configure(batch_create_lands_after_s=0.0, batch_validating_s=0.0 if lands_as == "completed" else HELD)
    eventually(lambda: sim.stats()["outcomes"].get("batch_created") == 2)  # the lost create lands now
    looked = cli(look, str(files.spec))
    assert looked.exit_code == 0, looked.stderr[-2000:]
    stats = sim.stats()
    if lands_as == "validating":
        assert stats["outcomes"]["batch_cancel"] == 1
        assert stats["batches"] == {"completed": 1, "cancelled": 1}
        assert stats["billed"]["batch"] == len(rows)  # each line billed once
        assert_paid_once(sim)
        said = "cancelled before any line ran"
    else:
        assert "batch_cancel" not in stats["outcomes"]  # nothing left to cancel
        assert stats["billed"]["batch"] == 2 * len(rows)
        said = f"they had completed {len(rows)} lines, billed twice and not collected"
    where = looked.stderr if look == "run" else looked.stdout
    assert said in where, where[-2000:]
    assert pl.read_parquet(files.output).equals(output)  # nothing taken from the stray

    again = cli("status", str(files.spec))  # said once, shown after
    assert again.exit_code == 0 and said not in again.stdout
    assert "made twice for round-0000-0000 (a create whose answer was lost landed late)" in again.stdout
    assert sim.stats()["outcomes"].get("batch_cancel", 0) == stats["outcomes"].get("batch_cancel", 0)


def test_a_lost_create_whose_input_was_deleted_and_uploaded_again_is_known_by_its_content(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """kill -9 mid-create; the resumed run's create keeps failing (503), so its input file is deleted and
    the chunk will be uploaded again under a new file id. The lost create then lands. The next run knows
    that batch by the chunk's content (its digest in the tag), not by a file id it no longer has: it
    collects it, uploading and creating nothing, and each line is billed once."""
    sim.configure(batch_create_lands_after_s=HELD)
    rows = sample_rows(60)
    run = {"mode": "batch", "backoff_initial_s": 0.01, "backoff_max_s": 0.02, "batch": FAST_POLL}
    files = make_job(rows=rows, model=BATCH_MODEL, run=run)
    _killed_mid_create(files, sim, tmp_path)
    sim.configure(batch_create_status=503)
    failed = cli("run", str(files.spec))
    assert failed.exit_code == 3, failed.stderr[-2000:]
    assert sim.stats()["files"] == 0  # the input the failed create named is deleted

    sim.configure(batch_create_status=None, batch_create_lands_after_s=0.0)
    eventually(lambda: sim.stats()["outcomes"].get("batch_created") == 1)  # made from the deleted file
    result = cli("run", str(files.spec), "--log-format", "json")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["outcomes"]["batch_created"] == 1 and stats["outcomes"]["file_uploaded"] == 1
    assert stats["billed"]["batch"] == len(rows)
    assert_paid_once(sim)
    events = [json.loads(line).get("event") for line in result.stderr.splitlines() if line.startswith("{")]
    assert "batch_duplicate" not in events


async def test_a_late_batch_from_an_earlier_upload_of_the_chunk_is_its_twin_and_kept_when_further_along(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    """One chunk, uploaded twice (the first input deleted after a failed create): a batch from the first
    upload, running, and the book's from the second, still validating. The sweep knows both as the
    chunk's by their digest, keeps the one further along (recording it) and cancels the other."""
    [written] = write_batch_files(batch_requests(50), tmp_path / "in")
    book = BatchBook(tmp_path / "book")
    chunk = book.record("c", path=str(written.path), requests="", model=BATCH_MODEL["name"], lines=50, round=0)
    chunk = book.record("c", digest=written.digest)
    sim.configure(batch_lines_per_s=5)
    async with BatchAPI(sim.native_url, API_KEY) as api:
        first = await api.upload(written.path)
        earlier = await api.create(first.id, metadata=tag("job", chunk))
        await until(lambda: sim.stats()["batch_lines_processed"] > 0)  # it runs: lines are billed
        sim.configure(batch_validating_s=HELD)
        second = await api.upload(written.path)
        mine = await api.create(second.id, metadata=tag("job", chunk))
        book.record("c", status="created", file_id=second.id, uploaded_at=first.created_at, batch_id=mine.id)
        assert await Twins("job").sweep(api, book, ["c"]) == {"c"}
        assert book.chunks["c"].batch_id == earlier.id  # the running one is kept
        assert (await api.retrieve(mine.id)).status == "cancelled" and list(book.strays) == [mine.id]
