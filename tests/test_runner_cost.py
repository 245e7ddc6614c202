"""The runner's own cost (issue 14): the compact set of queued keys, bounded latency counts, and the
summary saying whose time its latencies are."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.money.accounting import Distribution
from runner.plan import RequestKeys
from runner.records import Result, result_from_json, result_to_json
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows

hex_keys = st.binary(min_size=16, max_size=16).map(bytes.hex)
# Keys that share their first 64 bits (or 16) and differ after: the set must tell them apart.
twins = st.tuples(st.binary(min_size=8, max_size=8), st.lists(st.binary(min_size=8, max_size=8), max_size=6)).map(
    lambda t: [(t[0] + low).hex() for low in t[1]]
)
odd_keys = st.sampled_from(["render-1", "abc", "k1", "A" * 32, "0x" + "0" * 30, " " + "1" * 31, "g" * 32])


@settings(deadline=None)  # no timing in tests: the machine may be loaded
@given(
    st.lists(st.one_of(hex_keys, odd_keys, twins.map(lambda ks: ks[0] if ks else "x")), max_size=80),
    twins,
    st.booleans(),
)
def test_request_keys_behave_exactly_like_a_set(keys: list[str], same_high: list[str], spill: bool) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        # Small runs: most keys are looked up in runs (their low halves in files, when spilled).
        compact, plain = RequestKeys(Path(scratch) if spill else None, run_keys=7), set[str]()
        for key in [*keys, *same_high, *keys, *reversed(same_high)]:
            assert compact.add(key) == (key not in plain)  # a distinct key is never taken for a seen one
            plain.add(key)
            assert key in compact
        assert len(compact) == len(plain)
        for key in plain:
            assert key in compact
        assert "f" * 32 not in compact or "f" * 32 in plain
        compact.close()
        assert list(Path(scratch).iterdir()) == []  # its scratch files are gone


@pytest.mark.parametrize("spill", [False, True])
def test_request_keys_never_drop_a_distinct_key_among_many(spill: bool, tmp_path: Path) -> None:
    rng = random.Random(7)
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(50_000)]
    # A few hundred keys that collide on their first 64 bits with another key (only the low half differs).
    keys += [k[:16] + f"{rng.getrandbits(64):016x}" for k in keys[:300]]
    rng.shuffle(keys)
    compact = RequestKeys(tmp_path / "queued" if spill else None, run_keys=1000)
    batches = [keys[i : i + 2000] for i in range(0, len(keys), 2000)]
    assert all(all(compact.add_batch(batch)) for batch in batches)
    assert len(compact) == len(keys)
    assert not any(compact.add_batch(rng.sample(keys, 2000)))
    # Within one batch, only a key's first occurrence is new.
    again = [hashlib.sha256(b"a").hexdigest()[:32], "render-x", hashlib.sha256(b"a").hexdigest()[:32], "render-x"]
    assert compact.add_batch(again) == [True, True, False, False]
    assert hashlib.sha256(b"not added").hexdigest()[:32] not in compact


def test_distribution_percentiles_are_within_a_tenth_of_a_percent() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(3, 1.5) for _ in range(20_001)] + [0.0] * 5
    dist = Distribution()
    for v in values:
        dist.add(v)
    ordered = sorted(values)
    for q in (1, 50, 90, 99, 100):
        exact = ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]
        got = dist.percentile(q)
        assert got is not None and abs(got - exact) <= 0.001 * exact + 0.001
    assert Distribution().percentile(50) is None
    zeros = Distribution()
    zeros.add(0.0)
    assert zeros.summary() == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_the_wait_in_the_client_is_neither_journalled_nor_needed_to_read_a_journal() -> None:
    import datetime as dt

    result = Result(key="k", status="ok", attempts=1, latency_ms=3.0, finished_at=dt.datetime.now(dt.UTC), wait_ms=9.0)
    line = result_to_json(result)
    assert "wait_ms" not in json.loads(line)
    assert result_from_json(line).wait_ms is None


def test_summary_latency_says_whose_time_it_is(make_job, sim: SimulatorThread) -> None:
    """More requests in flight than the endpoint allows, at concurrency 2: most of a request's time is
    spent waiting for a slot in this process, and the summary says so apart from the SDK call."""
    sim.configure(latency_s=0.05)
    job = make_job(sample_rows(12), run={"concurrency": 2})

    assert cli("run", str(job.spec)).exit_code == 0

    summary = json.loads(job.summary.read_text())
    wire, wait = summary["latency_ms"], summary["client_wait_ms"]
    assert wire["measures"] == "sdk_call" and wait["measures"] == "queue_and_slot_wait"
    assert set(wire) == set(wait) == {"p50", "p90", "p99", "measures"}
    assert 40 <= wire["p50"] < 1000  # the endpoint's 50 ms is on the wire
    # 12 requests, 2 at a time, 50 ms each: the later ones wait for a slot for up to ~250 ms.
    assert wait["p90"] > 100 and wait["p50"] < wait["p90"]


def test_duplicate_rows_still_share_one_request_with_samples(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": f"r{i}", "text": "same text" if i % 2 else f"text {i}"} for i in range(10)]
    job = make_job(
        rows, output={"labels": ["positive", "negative"], "keep_columns": [], "samples": 3}, model={"temperature": 0.7}
    )

    assert cli("run", str(job.spec)).exit_code == 0

    assert sim.stats()["ok"] == 3 * (5 + 1)  # 5 distinct texts and the shared one, 3 samples each
