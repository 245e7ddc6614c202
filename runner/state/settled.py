"""The request keys a run must not send: answered ok, or failed for good, in any earlier run."""

from __future__ import annotations

import polars as pl

from runner.records import KEY


class SettledKeys:
    """The request keys that need no sending, sorted, with a vectorised membership test.

    A sorted Series and binary search: each batch costs O(batch * log N), and nothing is rebuilt per
    batch (a join would hash all N keys again for every batch of a million-row resume).
    """

    def __init__(self, sorted_keys: pl.Series) -> None:
        self._keys = sorted_keys
        self.size = sorted_keys.len()

    @classmethod
    def none(cls) -> SettledKeys:
        """No key is settled (a --fresh run)."""
        return cls(pl.Series(KEY, [], dtype=pl.String))

    def series(self) -> pl.Series:
        """The keys, sorted (to hand to another process)."""
        return self._keys

    def covers(self, keys: pl.LazyFrame) -> bool:
        """Is every key in `keys` settled? (A hash anti-join: for a whole map, not a batch.)"""
        return self.missing(keys) == 0

    def missing(self, keys: pl.LazyFrame) -> int:
        """How many of `keys` are not settled."""
        missing = keys.join(self._keys.to_frame(KEY).lazy(), on=KEY, how="anti").select(pl.len()).collect()
        return int(missing.item())

    def has(self, key: str) -> bool:
        """Is this one key settled? (Binary search.)"""
        if self.size == 0:
            return False
        pos = min(int(self._keys.search_sorted(key, side="left")), self.size - 1)
        return bool(self._keys[pos] == key)

    def contains(self, keys: pl.Series) -> pl.Series:
        """A boolean Series: is each of `keys` settled?"""
        if self.size == 0:
            return pl.Series([False] * keys.len(), dtype=pl.Boolean)
        pos = self._keys.search_sorted(keys, side="left").clip(0, self.size - 1)
        return self._keys.gather(pos) == keys
