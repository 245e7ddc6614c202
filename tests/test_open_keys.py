"""The tables of requests in flight (runner.state.openkeys) behave exactly as the dict and set they
replace, whatever the mix of operations: keys that share their first 64 bits (a prefix collision) stay
two keys, a key put again while open keeps one entry with its newer value, keys of another form
(samples) are kept too; and many keys in flight take a third of a set's memory (the runs ~33 bytes a key)."""

from __future__ import annotations

import hashlib
import tracemalloc

from hypothesis import example, given, settings
from hypothesis import strategies as st

from runner.state.openkeys import KeyTable, OpenKeys

# Keys drawn from a small pool so that operations meet: 32 hex digits, pairs sharing their high half,
# and a sample's key (not hex); or from three hex keys only, so that blocks put at once (kept packed until
# a step looks) meet single puts and each other often.
HIGH = "0123456789abcdef"
POOL = [f"{HIGH}{i:016x}" for i in range(6)] + [f"{i:032x}" for i in range(6)] + ["ab" * 16 + "#1", "x"]
FEW = [f"{HIGH}{0:016x}", f"{HIGH}{1:016x}", f"{2:032x}"]
OPS = ["put", "put_many", "pop", "get", "in", "pop_many", "contains_many", "len", "iter"]
ops = st.sampled_from([POOL, FEW]).flatmap(
    lambda pool: st.lists(
        st.tuples(st.sampled_from(OPS), st.lists(st.sampled_from(pool), min_size=1, max_size=5), st.integers(0, 9)),
        max_size=60,
    )
)
K = FEW[0]


@example([("put", [K], 1), ("put_many", [K], 2), ("get", [K], 0)], 8)  # the block is the newer value
@example([("put_many", [K], 1), ("put", [K], 2), ("get", [K], 0)], 8)  # the single put is
@example([("put_many", [K], 1), ("put_many", [K], 2), ("get", [K], 0)], 8)  # the later block is
@example([("put", [K], 1), ("put_many", [K], 2), ("get", [K], 0)], 2)  # as runs, the same
@example([("put", [K], 1), ("put", [FEW[2]], 0), ("put", [K], 2), ("pop_many", [K, K], 0)], 2)  # put again
@example([("put", [K], 1), ("put", [FEW[2]], 0), ("put", [K], 2), ("pop", [K], 0)], 2)  # after a run
@example(  # blocks and the newest made runs, the last few keys (each its own reserved cost) the newest again
    [("put_many", [FEW[2]] * 5, 3), ("put_many", [FEW[2]], 4), ("put", [K], 1), ("put", [FEW[1]], 2), ("get", [K], 0)],
    3,
)
@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([1, 2, 3, 8]))
def test_a_key_table_is_a_dict(steps: list[tuple[str, list[str], int]], run_keys: int) -> None:
    table, model = KeyTable(run_keys=run_keys), {}
    for op, keys, n in steps:
        key = keys[0]
        if op == "put":
            table.put(key, n, n / 10)
            model[key] = (n, n / 10)
        elif op == "put_many":
            table.put_many(keys, [n + i for i in range(len(keys))], n / 10)
            model.update((k, (n + i, n / 10)) for i, k in enumerate(keys))
        elif op == "pop":
            assert table.pop(key) == model.pop(key, None)
        elif op == "get":
            assert table.get(key) == model.get(key)
        elif op == "in":
            assert (key in table) == (key in model)
        elif op == "pop_many":
            assert table.pop_many(keys) == [model.pop(k, None) for k in keys]
        elif op == "contains_many":
            assert table.contains_many(keys) == [k in model for k in keys]
        elif op == "len":
            assert len(table) == len(model)
        elif op == "iter":
            assert sorted(table) == sorted(model)
        assert bool(table) == bool(model)  # (looks in no packed block: blocks put at once stay packed until a step)
    assert len(table) == len(model)
    assert sorted(table) == sorted(model)


def test_open_keys_is_a_set_of_the_keys_added_and_not_taken_away() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(1000)]
    twin = keys[0][:16] + "f" * 16  # the same first 64 bits as keys[0]
    outstanding = OpenKeys(run_keys=64)
    outstanding.update([*keys, twin, f"{keys[1]}#1"])
    outstanding.difference_update(keys[:500])
    outstanding.discard(keys[500])
    outstanding.discard(keys[500])  # twice: nothing
    assert twin in outstanding and keys[0] not in outstanding and f"{keys[1]}#1" in outstanding
    assert len(outstanding) == 499 + 2 and set(outstanding) == {*keys[501:], twin, f"{keys[1]}#1"}
    assert outstanding.contains_many([keys[0], twin, keys[999]]) == [False, True, True]
    assert outstanding.take_many([twin, twin, keys[0]]) == [True, False, False] and twin not in outstanding


def test_keys_in_flight_take_a_third_of_a_sets_memory() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(400_000)]
    tracemalloc.start()
    plain = set(keys)
    as_set = tracemalloc.get_traced_memory()[0] + 88 * len(keys)  # the set, and the strings it holds
    del plain
    tracemalloc.stop()
    outstanding = OpenKeys()
    outstanding.update(keys)
    held = outstanding._table.run_bytes + 100 * len(outstanding._table._recent)  # the runs, the newest as str
    assert len(outstanding) == len(keys)
    assert held < as_set / 3, (held, as_set)
