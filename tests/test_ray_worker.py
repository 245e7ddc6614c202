"""What a sending actor of a Ray run hands back per block and what it holds, checked without starting
Ray: the block's row-map lines, its report on the first line; the keys this run answered, in 16 bytes a
key. Skipped where ray is not installed, except in CI.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import tracemalloc
from pathlib import Path

import polars as pl

from runner.distributed.worker import REPORT, RunAnswers, block_output
from runner.records import KEY


def test_a_blocks_report_travels_once_not_once_per_row() -> None:
    """A 500-line block with a 360 KB report: the report is on the first line and null on the rest, and
    the block's Arrow buffers hold it once, so what goes to the object store and the driver stays under
    the lines plus twice the report (a report broadcast to every row made such a block 178 MB)."""
    lines = pl.DataFrame({"_row": range(500), "request_key": [f"{i:032x}" for i in range(500)]})
    report = json.dumps({"results": [["x" * 700, None]] * 500})

    table = block_output(lines, report)

    back = pl.from_arrow(table)
    assert isinstance(back, pl.DataFrame)
    assert back.get_column(REPORT).to_list() == [report] + [None] * 499
    assert back.drop(REPORT).equals(lines)
    assert table.nbytes < lines.estimated_size() + 2 * len(report)


def test_an_actors_answered_keys_take_about_sixteen_bytes_a_key(tmp_path: Path) -> None:
    """An actor looks a block's keys up in every answer this run wrote (a retried block must not pay
    twice). 400,000 answered keys in four parts, measured: the Python objects the actor keeps (traced
    by tracemalloc) plus the sorted runs' buffers come to at most 20 bytes a key, where a set of str
    took ~130 (over 1 GB an actor at 10M rows). The newest keys, under 200,000, wait as strings until
    they make a run, so 400,000 is a whole number of runs."""
    rng = random.Random(5)
    keys = [f"{rng.getrandbits(128):032x}" for _ in range(400_000)]
    results = tmp_path / "results"
    results.mkdir()
    for n in range(4):
        part = pl.DataFrame({KEY: keys[n * 100_000 : (n + 1) * 100_000]})
        part.write_parquet(results / f"part-run1-actor-{n:06d}.parquet")
    answers = RunAnswers(tmp_path, "run1")
    unknown = [f"{rng.getrandbits(128):032x}" for _ in range(1_000)]
    probe = rng.sample(keys, 1_000) + unknown

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        found = answers.among(probe)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(found)  # the answer is the caller's
    finally:
        tracemalloc.stop()

    assert found == set(probe[:1_000])
    per_key = (kept + answers.held_bytes) / len(keys)
    assert answers.held_bytes >= 16 * len(keys)  # the runs hold every key (this measures them, not nothing)
    assert per_key <= 20, f"{per_key:.1f} bytes a key"
