"""The runner's own cost (issue 14): the compact set of queued keys."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from runner.plan import RequestKeys
from runner.testing.simulator import SimulatorThread
from tests.conftest import cli

hex_keys = st.binary(min_size=16, max_size=16).map(bytes.hex)
# Keys that share their first 64 bits (or 16) and differ after: the set must tell them apart.
twins = st.tuples(st.binary(min_size=8, max_size=8), st.lists(st.binary(min_size=8, max_size=8), max_size=6)).map(
    lambda t: [(t[0] + low).hex() for low in t[1]]
)
odd_keys = st.sampled_from(["render-1", "abc", "k1", "A" * 32, "0x" + "0" * 30, " " + "1" * 31, "g" * 32])


@given(st.lists(st.one_of(hex_keys, odd_keys, twins.map(lambda ks: ks[0] if ks else "x")), max_size=80), twins)
def test_request_keys_behave_exactly_like_a_set(keys: list[str], same_high: list[str]) -> None:
    compact, plain = RequestKeys(), set[str]()
    for key in [*keys, *same_high, *keys, *reversed(same_high)]:
        assert compact.add(key) == (key not in plain)  # a distinct key is never taken for a seen one
        plain.add(key)
        assert key in compact
    assert len(compact) == len(plain)
    for key in plain:
        assert key in compact
    assert "f" * 32 not in compact or "f" * 32 in plain


def test_request_keys_never_drop_a_distinct_key_among_many() -> None:
    rng = random.Random(7)
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(50_000)]
    # A few hundred keys that collide on their first 64 bits with another key (only the low half differs).
    keys += [k[:16] + f"{rng.getrandbits(64):016x}" for k in keys[:300]]
    compact = RequestKeys()
    assert all(compact.add(k) for k in keys)
    assert len(compact) == len(keys)
    assert not any(compact.add(k) for k in rng.sample(keys, 2000))
    assert hashlib.sha256(b"not added").hexdigest()[:32] not in compact


def test_duplicate_rows_still_share_one_request_with_samples(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": f"r{i}", "text": "same text" if i % 2 else f"text {i}"} for i in range(10)]
    job = make_job(
        rows, output={"labels": ["positive", "negative"], "keep_columns": [], "samples": 3}, model={"temperature": 0.7}
    )

    assert cli("run", str(job.spec)).exit_code == 0

    assert sim.stats()["ok"] == 3 * (5 + 1)  # 5 distinct texts and the shared one, 3 samples each
