"""Compaction keeps one result per key (an ok answer over an error, the newer over the older), in any
number of buckets, each split out of the parts in one pass."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import polars as pl
import pytest

from runner.records import KEY, Result, results_frame
from runner.state import store as store_module
from runner.state.store import Store

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _result(key: str, status: str, text: str, minute: int) -> Result:
    at = T0 + dt.timedelta(minutes=minute)
    if status == "ok":
        return Result(key=key, status="ok", attempts=1, latency_ms=None, finished_at=at, response_text=text)
    return Result(key=key, status="error", attempts=1, latency_ms=None, finished_at=at, error_type=text)


@pytest.mark.parametrize("bucket_rows", [100_000, 40, 7], ids=["one bucket", "several", "many, parts split"])
def test_compaction_keeps_the_ok_answer_over_an_error_and_the_newer_over_the_older(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket_rows: int
) -> None:
    monkeypatch.setattr(store_module, "BUCKET_ROWS", bucket_rows)
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(60)]
    parts: list[list[Result]] = [
        [_result(k, "error", "timeout", 1) for k in keys],  # every key failed first
        [_result(k, "ok", f"first {k}", 2) for k in keys[:40]],  # then 40 were answered
        [_result(k, "ok", f"second {k}", 3) for k in keys[:10]]  # 10 of them again, later
        + [_result(k, "error", "later failure", 4) for k in keys[10:20]],  # 10 failed after their answer
        [_result(k, "error", "newer failure", 5) for k in keys[40:50]],  # 10 failed twice
    ]
    store = Store(tmp_path / "state", run_id="run")
    store.results_dir.mkdir(parents=True)
    for index, results in enumerate(parts):
        results_frame(results, f"run-{index}").write_parquet(store.results_dir / f"part-{index:03d}.parquet")

    compacted = store.compact_results()

    assert all("-compact-" in path.name for path in compacted) and store.result_parts() == compacted
    assert len(compacted) == -(-(sum(map(len, parts))) // bucket_rows)
    assert not list((tmp_path / "state").glob("compacting-*"))  # its pieces are gone
    frame = pl.read_parquet(compacted)
    assert frame.height == len(keys) and frame.get_column(KEY).n_unique() == len(keys)
    got = {row[KEY]: (row["status"], row["response_text"] or row["error_type"]) for row in frame.iter_rows(named=True)}
    expected = {
        **{k: ("error", "timeout") for k in keys},
        **{k: ("error", "newer failure") for k in keys[40:50]},
        **{k: ("ok", f"first {k}") for k in keys[10:40]},
        **{k: ("ok", f"second {k}") for k in keys[:10]},
    }
    assert got == expected
    for path in compacted:  # each bucket file in key order
        assert pl.read_parquet(path).get_column(KEY).is_sorted()
    assert store.compact_results() == compacted  # already compact: nothing to do
