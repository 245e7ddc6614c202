"""The request keys a run must not send: answered ok, or failed for good, in any earlier run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from runner.records import KEY


class SettledKeys:
    """The request keys that need no sending, sorted, tested by binary search; given a function, read on
    first use. `basis` (answer files, --retry-failed) is for the row map's cover record (docs/decisions.md)."""

    def __init__(self, keys: pl.Series | Callable[[], pl.Series], basis: dict[str, Any] | None = None) -> None:
        self._keys = keys if isinstance(keys, pl.Series) else None
        self._load = None if isinstance(keys, pl.Series) else keys
        self.basis = basis
        self._highs: pl.Series | None = None  # the settled keys' first 64 bits, sorted (see `contains`)
        self._filter: pl.Series | None = None  # bucket_filter of those

    @classmethod
    def none(cls) -> SettledKeys:
        """No key is settled (a --fresh run)."""
        return cls(pl.Series(KEY, [], dtype=pl.String))

    def series(self) -> pl.Series:
        """The keys, sorted (to hand to another process)."""
        if self._keys is None:
            assert self._load is not None
            self._keys, self._load = self._load(), None
        return self._keys

    def covers(self, keys: pl.LazyFrame) -> bool:
        """Is every key in `keys` settled? (A hash anti-join: for a whole map, not a batch.)"""
        return self.missing(keys) == 0

    def missing(self, keys: pl.LazyFrame) -> int:
        """How many of `keys` are not settled."""
        settled = self.series().to_frame(KEY).lazy()
        missing = keys.join(settled, on=KEY, how="anti").select(pl.len()).collect()
        return int(missing.item())

    def has(self, key: str) -> bool:
        """Is this one key settled? (Binary search.)"""
        keys = self.series()
        if keys.len() == 0:
            return False
        pos = min(int(keys.search_sorted(key, side="left")), keys.len() - 1)
        return bool(keys[pos] == key)

    def contains(self, keys: pl.Series) -> pl.Series:
        """A boolean Series: is each of `keys` settled? (Null for a null key.) Its first 16 hex digits are
        looked up first (integers search ~40x faster than strings); only a key found there, or not hex,
        is looked up in full, and it is settled only if its whole string is found."""
        settled = self.series()
        count = keys.len()
        if settled.len() == 0:
            return pl.Series([False] * count, dtype=pl.Boolean)
        if self._highs is None:
            self._highs = _high_halves(settled).drop_nulls().sort()
            self._filter = bucket_filter(self._highs)
        highs, wanted = self._highs, _high_halves(keys)
        maybe = pl.Series([True] * count, dtype=pl.Boolean)
        if highs.len():
            assert self._filter is not None
            near = (self._filter.gather(buckets(wanted.fill_null(0))) & wanted.is_not_null()).arg_true()
            maybe = wanted.is_null()
            if near.len():
                asked = wanted.gather(near)
                at = highs.search_sorted(asked, side="left").clip(0, highs.len() - 1)
                maybe = maybe.scatter(near, highs.gather(at) == asked)
        found = pl.Series([False] * count, dtype=pl.Boolean)
        looked = (maybe & keys.is_not_null()).arg_true()
        if looked.len():
            candidates = keys.gather(looked)
            pos = settled.search_sorted(candidates, side="left").clip(0, settled.len() - 1)
            found = found.scatter(looked, settled.gather(pos) == candidates)
        return (
            found
            if not keys.has_nulls()
            else found.zip_with(keys.is_not_null(), pl.Series([None] * count, dtype=pl.Boolean))
        )


FILTER_BITS = 26  # a bucket filter: 2**26 buckets of 64-bit numbers (their top 26 bits), a bit each (8 MB)


def buckets(numbers: pl.Series) -> pl.Series:
    """The bucket of each UInt64 number in a bucket filter: its top FILTER_BITS bits."""
    return (numbers // (1 << (64 - FILTER_BITS))).cast(pl.UInt32)


def bucket_filter(numbers: pl.Series) -> pl.Series:
    """A bit per bucket, set where one of `numbers` (UInt64) is: a number whose bit is not set is not
    among them, found with one gather instead of a binary search (most keys looked up are not there)."""
    marks = pl.Series("seen", [False], dtype=pl.Boolean).extend_constant(False, (1 << FILTER_BITS) - 1)
    return mark(marks, numbers)


def mark(marks: pl.Series, numbers: pl.Series) -> pl.Series:
    """`marks` (a bucket filter) with the buckets of `numbers` set too, in place."""
    return marks.scatter(buckets(numbers), True) if numbers.len() else marks


def _high_halves(keys: pl.Series) -> pl.Series:
    """Each key's first 16 characters read as a hexadecimal UInt64; null where they are not that."""
    return keys.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
