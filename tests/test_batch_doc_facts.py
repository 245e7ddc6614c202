"""Zhipu's documented Batch API facts (shared/reference/batch.md, real-wire.md), each held by the simulator
by default and met by our client and runs: limits, the cancel answer, metadata bounds, file API codes,
and every status a batch passes through. Real HTTP against the simulator throughout."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
import polars as pl
import pytest

from runner.send import job_tag
from runner.send.batch.api import BatchAPI
from runner.send.batch.book import BatchBook, Chunk
from runner.send.batch.duplicates import tag
from runner.send.batch.errors import BatchAbort, BatchStatusError
from runner.simulator.config import BATCH_QUEUE_CAPS, SimConfig
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, JobFiles, cli, sample_rows
from tests.test_batch_api_client import write_batch_files
from tests.test_batch_mode import BATCH_MODEL, FAST_POLL, expected


def batch_requests(n: int, text: str = "t") -> list[tuple[str, dict[str, object]]]:
    body = {"model": "glm-4-air-250414", "max_tokens": 8}
    return [(f"r{i}", {**body, "messages": [{"role": "user", "content": f"{text}{i}"}]}) for i in range(n)]


def test_the_simulators_limits_are_zhipus_documented_ones_by_default() -> None:
    """50,000 lines and 100 MB a file, 1,000 files an account, the per-model queue caps."""
    config = SimConfig()
    assert (config.batch_max_lines, config.batch_max_bytes, config.batch_file_cap) == (50_000, 100 * 1024**2, 1000)
    assert config.batch_queue_cap is None  # none given: each model's documented cap holds
    assert BATCH_QUEUE_CAPS["glm-4-plus"] == BATCH_QUEUE_CAPS["glm-4-air-250414"] == 2_000_000
    assert (BATCH_QUEUE_CAPS["glm-4"], BATCH_QUEUE_CAPS["glm-4-long"], BATCH_QUEUE_CAPS["glm-4v-plus"]) == (
        500_000,
        200_000,
        10_000,
    )


async def test_a_cancel_answers_cancelling_and_a_later_look_says_cancelled(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.configure(batch_validating_s=3600.0)
    [written] = write_batch_files(batch_requests(3), tmp_path)
    async with BatchAPI(sim.native_url, API_KEY) as api:
        made = await api.create((await api.upload(written.path)).id)
        assert made.status == "validating" and made.request_counts.total == 0  # counts are nulls while validating
        assert (await api.cancel(made.id)).status == "cancelling"
        assert (await api.retrieve(made.id)).status == "cancelled"


async def test_metadata_past_its_documented_bounds_is_refused_and_our_tags_fit(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    """At most 16 keys, a key of 64 characters, a value of 512: past any, a 400; the tag a run gives a
    batch (job, chunk, content digest) is within them, for the longest state folder path."""
    [written] = write_batch_files(batch_requests(2), tmp_path)
    async with BatchAPI(sim.native_url, API_KEY, max_attempts=1) as api:
        file_id = (await api.upload(written.path)).id
        for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
            with pytest.raises(BatchStatusError) as refused:
                await api.create(file_id, metadata=metadata)
            assert refused.value.status == 400 and "metadata" in refused.value.message
        book = BatchBook(tmp_path / "b")
        chunk = book.record("round-0019-9999", path=str(written.path), requests="", model="m", lines=2, round=19)
        chunk = book.record(chunk.id, digest=written.digest)
        deep = tmp_path / ("d" * 200) / ("e" * 200)
        made = await api.create(file_id, metadata=tag(job_tag(deep), chunk))
        assert made.metadata["glm_batch_digest"] == written.digest and isinstance(chunk, Chunk)


async def test_the_list_takes_a_limit_of_1_to_100_and_the_client_keeps_within_it(sim: SimulatorThread) -> None:
    async with BatchAPI(sim.native_url, API_KEY, max_attempts=1) as api:
        assert (await api.list(limit=500)).data == ()  # asked as 100
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for limit in ("0", "101"):
            async with http.get(f"{sim.native_url}/batches", params={"limit": limit}) as answer:
                assert answer.status == 400 and "limit" in (await answer.json())["error"]["message"]


async def test_a_file_over_the_size_limit_is_refused_with_the_file_apis_435(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.configure(batch_max_bytes=500)
    [written] = write_batch_files(batch_requests(20, "x" * 50), tmp_path)
    async with BatchAPI(sim.native_url, API_KEY, max_attempts=1) as api:
        with pytest.raises(BatchStatusError) as refused:
            await api.upload(written.path)
    assert refused.value.status == 435 and not isinstance(refused.value, BatchAbort)


def test_a_file_api_closed_to_the_account_stops_the_run_at_once_saying_so(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """434 (no permission: the file API is in closed beta for the account): every later upload would get
    it too, so the run stops at the first, in one line, without blaming the job's file limits."""
    sim.configure(batch_upload_status=434)
    files = make_job(rows=sample_rows(5), model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "434" in last and "may not use Zhipu's file API" in last and "max_requests" not in last, last
    assert sim.stats()["outcomes"].get("upload_434_434", 0) == 1  # not retried
    assert "batch_created" not in sim.stats()["outcomes"]


def test_uploads_refused_as_too_frequent_are_retried(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    """429 at upload (too frequent), past the client's retries: waited out like a full queue, then sent."""
    sim.configure(batch_upload_status=429)
    files = make_job(rows=sample_rows(5), model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    opens = threading.Timer(0.5, lambda: sim.configure(batch_upload_status=None))
    opens.start()
    result = cli("run", str(files.spec))
    opens.join()
    assert result.exit_code == 0, result.stderr[-2000:]
    assert sim.stats()["outcomes"].get("upload_429_429", 0) >= 1


def test_a_run_follows_a_batch_through_every_status_to_completed(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """validating (counts of nulls) -> in_progress -> finalizing -> completed, each seen by the run's
    looks and kept in its book, and the answers collected once it completes."""
    sim.configure(batch_validating_s=0.4, batch_lines_per_s=100, batch_finalizing_s=0.4)
    rows = sample_rows(40)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    [book] = files.spec.parent.rglob("batches/book.jsonl")
    lines = [json.loads(x) for x in book.read_text().splitlines()]
    seen = [x["batch_status"] for x in lines if "batch_status" in x]
    assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s] == [
        "validating",
        "in_progress",
        "finalizing",
        "completed",
    ], seen


def test_a_create_right_after_the_upload_that_finds_no_file_asks_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A file just uploaded can be unknown to the batch service for a moment (404 "input file not found",
    GenAI-Showcase#175): the create is asked again a little later, and one batch is made."""
    sim.configure(batch_file_visible_after_s=0.1)
    rows = sample_rows(10)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    outcomes = sim.stats()["outcomes"]
    assert outcomes.get("batch_create_404_404", 0) >= 1 and outcomes["batch_created"] == 1
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)


@pytest.mark.parametrize("shape", ["response", "error"])
def test_transient_line_errors_in_either_error_file_shape_are_sent_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, shape: str
) -> None:
    """The error file's line format is not documented: a 500 or 429 line, given as a `response` with its
    status or as an `error` whose code is the status, is sent again in the next round, never failed."""
    sim.configure(batch_error_rate=0.3, batch_error_line_shape=shape)
    rows = sample_rows(30)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": {**FAST_POLL, "max_rounds": 10}})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["outcomes"]["batch_created"] > 1  # some lines went to a later round
