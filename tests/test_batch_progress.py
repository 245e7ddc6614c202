"""While batches run, the progress a run shows comes from the Batch API's `request_counts`: a batch job
whose answers are all still at Zhipu does not sit at `0/N rows` with nothing moving."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import runner
from runner.observe.progress import LineReporter
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, sample_rows
from tests.test_batch_mode import BATCH_MODEL, FAST_POLL


def progress_lines(files: JobFiles) -> list[dict[str, object]]:
    """The job run through the Python API with a JSON-lines reporter ticking every 50 ms: its progress lines."""
    stream = io.StringIO()
    runner.run_job(str(files.spec), reporter=LineReporter(stream, as_json=True, interval_s=0.05))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [e for e in events if e["event"] == "progress"]


def test_progress_lines_count_the_lines_a_running_batch_has_done(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_lines_per_s=400)  # one batch of 400 lines: about a second at Zhipu
    files = make_job(rows=sample_rows(400), model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    while_running = [p for p in progress_lines(files) if p["ok"] == 0 and "batch_lines" in p]
    done = [p["batch_lines"]["completed"] for p in while_running]  # type: ignore[index]
    assert any(0 < n < 400 for n in done), done  # seen part way, before a single answer was back
    assert done == sorted(done)
    assert all(p["batch_lines"]["open"] == 400 for p in while_running)  # type: ignore[index]


def test_progress_lines_show_the_wait_for_room_in_a_full_queue(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_queue_cap=100, batch_lines_per_s=500)
    files = make_job(
        rows=sample_rows(300), model=BATCH_MODEL, run={"mode": "batch", "batch": {**FAST_POLL, "max_requests": 100}}
    )
    queued = [p["batch_queue"] for p in progress_lines(files) if "batch_queue" in p]
    assert queued and all(q["refused"] > 0 for q in queued)  # type: ignore[index]
    waited = [q["waited_s"] for q in queued]  # type: ignore[index]
    assert waited[-1] > 0 and waited == sorted(waited)
