"""The keys of requests in flight, in 16-41 bytes a key instead of ~170 (a str in a set and a dict).

In batch mode every row's request is in flight at once (`Run.outstanding`, `Accountant._open`): at a
million rows those tables were the part of a run's memory that grew with the input. A request key is
32 hex digits (128 bits, runner.job.prompts), so it fits in two 64-bit integers exactly: two keys are
taken for one only when all 128 bits are equal, never on a prefix. A block of keys put at once (the
planner's, `put_many`) is kept packed, 16 bytes a key and its estimate in an array beside, and nothing
more is done with it until a step must find a key: a re-plan that hands a million requests over pays
one parse a block, not a sort. Then few keys join the newest, which are kept as strings in a dict, and
many become runs of `run_keys`, sorted by the key's high 64 bits, with the low halves, an alive flag
and the values in arrays beside (~33 bytes a key, ~41 with values). Runs empty as answers come (oldest
first, as batches are harvested) and are dropped. A key of any other form (a sample's, `key#1`) stays
a string.

    table = KeyTable()
    table.put(key, raw=412, reserved=0.0031)
    table.pop(key)            # (412, 0.0031), or None when it is not open
    table.pop_many(keys)      # the same for a block of answers, vectorised
"""

from __future__ import annotations

import re
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, MutableSet

import polars as pl

__all__ = ["KeyTable", "OpenKeys", "Value"]

Value = tuple[int, float]  # (raw input-token estimate, reserved cost)
# Keys packed (16 bytes a key), their estimates (None: all 0), the reserved cost: the block's, or a key's.
Block = tuple[bytes, "array[int] | None", "float | array[float]"]
_SIGNED = {"high": pl.Int64, "low": pl.Int64}
_SIGNED_AT = {"i": pl.Int64, **_SIGNED}
_HEX = re.compile("[0-9a-f]{32}")


class _Run:
    """Keys frozen together, sorted by (high, low) half; alive flags and values in the same order."""

    __slots__ = ("alive", "high", "high_series", "live", "low", "low_series", "raw", "reserved")

    def __init__(self, packed: bytes, raw: array[int] | None, reserved: array[float] | None) -> None:
        """`packed`: 16 bytes a key, its high half first, big-endian; `raw`, `reserved`: the keys' values in
        the same order (None: all zero). A key there twice keeps its later value."""
        halves = array("q", packed)  # signed: polars takes a list of these without its slow path
        if sys.byteorder == "little":
            halves.byteswap()
        frame = pl.DataFrame({"high": halves[0::2].tolist(), "low": halves[1::2].tolist()}, schema=_SIGNED)
        del halves
        frame = frame.select(pl.all().reinterpret(signed=False)).with_row_index("at").sort("high", "low", "at")
        again = (pl.col("high") == pl.col("high").shift(-1)) & (pl.col("low") == pl.col("low").shift(-1))
        if frame.select(again.any()).item():  # a key put twice: the later stands
            frame = frame.filter(~again.fill_null(False))
        self.high_series, self.low_series = frame.get_column("high"), frame.get_column("low")
        self.high = array("Q", self.high_series.to_list())  # for one key at a time (bisect)
        self.low = array("Q", self.low_series.to_list())
        order = frame.get_column("at").to_list() if raw is not None or reserved is not None else []
        self.raw = array("q", [raw[i] for i in order]) if raw is not None else None
        self.reserved = array("d", [reserved[i] for i in order]) if reserved is not None else None
        self.alive = bytearray(b"\x01") * frame.height
        self.live = frame.height

    def find(self, high: int, low: int, start: int | None = None) -> int:
        """The position of a live key, or -1 (`start`: where its high half begins, if known)."""
        if start is None:
            start = bisect_left(self.high, high)
        if start == len(self.high) or self.high[start] != high:
            return -1
        at = start
        if self.low[at] != low:  # keys sharing a high half: sorted by their low half
            at = bisect_left(self.low, low, start, bisect_right(self.high, high, start))
        return at if at < len(self.low) and self.high[at] == high and self.low[at] == low and self.alive[at] else -1

    def find_many(self, highs: pl.Series, lows: pl.Series) -> tuple[list[int], list[int]]:
        """`find` for many keys at once: which of them are live here (their rows, in order) and where, in
        polars: a binary search on the high halves, both halves compared where it lands; key by key only
        where the high half is there and the low is not (keys sharing their first 64 bits). Python sees
        only the keys found."""
        first = self.high_series.search_sorted(highs, side="left").clip(0, len(self.high) - 1)
        high_there = self.high_series.gather(first) == highs
        exact = high_there & (self.low_series.gather(first) == lows)
        rows, places = exact.arg_true().to_list(), first.filter(exact).to_list()
        shared = (high_there & ~exact).arg_true().to_list()
        for row in shared:  # a high half shared: look among them
            at = self.find(int(highs[row]), int(lows[row]), int(first[row]))
            if at >= 0:
                rows.append(row)
                places.append(at)
        if shared:  # in row order again
            pairs = sorted(zip(rows, places, strict=True))
            rows, places = [row for row, _ in pairs], [at for _, at in pairs]
        alive = self.alive
        live = [k for k, at in enumerate(places) if alive[at]]
        if len(live) < len(places):
            rows, places = [rows[k] for k in live], [places[k] for k in live]
        return rows, places

    def take_many(self, places: list[int]) -> list[Value | None]:
        """Let the keys at `places` go; each one's value (None for a place already let go, e.g. twice)."""
        alive, raw, reserved = self.alive, self.raw, self.reserved
        taken: list[Value | None] = []
        for at in places:
            if alive[at]:
                alive[at] = 0
                taken.append((raw[at] if raw is not None else 0, reserved[at] if reserved is not None else 0.0))
            else:
                taken.append(None)
        self.live -= sum(value is not None for value in taken)
        return taken

    def take(self, at: int) -> Value:
        """Let the key at `at` go; its value."""
        self.alive[at] = 0
        self.live -= 1
        return self.value(at)

    def value(self, at: int) -> Value:
        """The value of the key at `at`."""
        return (self.raw[at] if self.raw is not None else 0), (self.reserved[at] if self.reserved is not None else 0.0)

    def live_keys(self) -> Iterator[str]:
        for at in range(len(self.high)):
            if self.alive[at]:
                yield f"{self.high[at]:016x}{self.low[at]:016x}"


class KeyTable:
    """A dict of request key -> (raw estimate, reserved cost), exact, in little memory when large.

    A block of keys put at once (`put_many`) is kept packed, 16 bytes a key, and looked at only when a
    step needs to find a key (`_settle`): few of them join the newest keys, many become runs. A key is
    live in at most one run (a run's keys put again leave the older runs when it is made); a key put
    again while live in a run is in `_recent` too until then, and every step looks in both. The newest
    value of a key is in `_recent`, else in the packed blocks (the last one holding it), else in a run."""

    def __init__(self, run_keys: int = 65_536) -> None:
        self._run_keys = run_keys
        self._recent: dict[str, Value] = {}  # the newest keys (any form)
        self._odd: dict[str, Value] = {}  # keys that are not 32 hex digits: never frozen
        self._packed: list[Block] = []  # blocks put at once, not looked in yet
        self._runs: list[_Run] = []

    def __len__(self) -> int:
        self._settle()
        twice = sum(self.contains_runs(list(self._recent))) if self._runs else 0
        return len(self._recent) + len(self._odd) + sum(run.live for run in self._runs) - twice

    def __bool__(self) -> bool:
        return bool(self._packed or self._recent or self._odd or any(run.live for run in self._runs))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        self._settle()
        return key in self._recent or key in self._odd or self._in_runs(key) is not None

    def __iter__(self) -> Iterator[str]:
        self._settle()
        recent = list(self._recent)
        yield from recent
        yield from list(self._odd)
        newer = set(recent) if self._runs else set()
        for run in list(self._runs):
            yield from (key for key in run.live_keys() if key not in newer)

    def put(self, key: str, raw: int = 0, reserved: float = 0.0) -> None:
        """Open `key` with its value (replacing the value if it is open already)."""
        if self._odd and key in self._odd:
            self._odd[key] = (raw, reserved)
            return
        self._recent[key] = (raw, reserved)
        if len(self._recent) >= self._run_keys:
            self._freeze()

    def put_many(self, keys: list[str], raws: list[int], reserved: float = 0.0) -> None:
        """`put` for a block of keys, each with its raw estimate and the same reserved cost: when they are
        all 32 hex digits, kept packed (no object a key) until a step needs to find one."""
        if len(raws) != len(keys):
            raise ValueError(f"put_many: {len(keys)} keys and {len(raws)} estimates")
        packed = _packed(keys) if keys else None
        if packed is None:
            for key, raw in zip(keys, raws, strict=True):
                self.put(key, raw, reserved)
            return
        if self._recent:  # the block's value is the newer one
            forget = self._recent.pop
            for key in keys:
                forget(key, None)
        self._packed.append((packed, array("q", raws) if any(raws) else None, reserved))

    def get(self, key: str) -> Value | None:
        """The value of an open key, or None."""
        self._settle()
        value = self._recent.get(key)
        if value is None:
            value = self._odd.get(key)
        if value is None and self._runs:
            found = self._in_runs(key)
            if found is not None:
                value = found[0].value(found[1])
        return value

    def pop(self, key: str) -> Value | None:
        """Close `key`: its value, or None if it was not open."""
        self._settle()
        value = self._recent.pop(key, None)
        if value is None:
            value = self._odd.pop(key, None)
        if self._runs:
            found = self._in_runs(key)
            if found is not None:  # (also when it was in `_recent`: put again, the newer value stands)
                older = found[0].take(found[1])
                value = older if value is None else value
                self._drop_empty()
        return value

    def pop_many(self, keys: list[str]) -> list[Value | None]:
        """`pop` for a block of keys (a key twice in `keys` is popped once: None the second time)."""
        self._settle()
        recent, odd = self._recent, self._odd
        values: list[Value | None] = [recent.pop(key, None) for key in keys]
        if odd:
            values = [odd.pop(key, None) if value is None else value for key, value in zip(keys, values, strict=True)]
        if self._runs:
            for run, rows, places in self._find_many(keys):
                for i, older in zip(rows, run.take_many(places), strict=True):
                    if values[i] is None:  # (a key twice in the block: taken once, None the second time)
                        values[i] = older
            self._drop_empty()
        return values

    def contains_many(self, keys: list[str]) -> list[bool]:
        """Is each key open? (Vectorised over the runs.)"""
        self._settle()
        recent, odd = self._recent, self._odd
        found = [key in recent or key in odd for key in keys]
        if self._runs and not all(found):
            rest = [i for i, hit in enumerate(found) if not hit]
            for j in (j for j, hit in enumerate(self.contains_runs([keys[i] for i in rest])) if hit):
                found[rest[j]] = True
        return found

    def contains_runs(self, keys: list[str]) -> list[bool]:
        """Is each key live in a run?"""
        self._settle()
        found = [False] * len(keys)
        for _, rows, _ in self._find_many(keys):
            for i in rows:
                found[i] = True
        return found

    @property
    def run_bytes(self) -> int:
        """Bytes the runs and packed blocks hold (their arrays and polars' copy of the halves)."""
        total = sum(
            len(packed) // 2 * ((raws is not None) + isinstance(cost, array)) for packed, raws, cost in self._packed
        )
        total += sum(len(block[0]) for block in self._packed)
        for run in self._runs:
            total += 8 * 2 * len(run.high) + len(run.alive)
            total += int(run.high_series.estimated_size()) + int(run.low_series.estimated_size())
            total += sum(8 * len(values) for values in (run.raw, run.reserved) if values is not None)
        return total

    @property
    def held_bytes(self) -> int:
        """About how many bytes the table holds: its runs and packed blocks, and ~170 a key kept as a str
        (in a dict, with its value)."""
        return self.run_bytes + 170 * (len(self._recent) + len(self._odd))

    def _in_runs(self, key: str) -> tuple[_Run, int] | None:
        """The run and position of a live key in the runs, or None (a key not 32 hex digits: None)."""
        if not self._runs or len(key) != 32 or not _HEX.fullmatch(key):
            return None
        high, low = int(key[:16], 16), int(key[16:], 16)
        for run in self._runs:
            at = run.find(high, low)
            if at >= 0:
                return run, at
        return None

    def _find_many(self, keys: list[str]) -> Iterator[tuple[_Run, list[int], list[int]]]:
        """For each run, the keys live in it: (run, their indices in `keys`, their places in the run); a key
        is live in one run at most (see the class). Oldest runs first, each looked up only for the keys
        not found in an earlier one."""
        index, (highs, lows) = _halves(keys)
        left = pl.DataFrame({"i": index, "high": highs, "low": lows}, schema=_SIGNED_AT)
        left = left.with_columns(pl.col("high", "low").reinterpret(signed=False))
        for run in self._runs:
            if not left.height:
                return
            if not run.live:
                continue
            rows, places = run.find_many(left.get_column("high"), left.get_column("low"))
            if rows:
                taken = pl.Series(rows, dtype=pl.UInt32)
                yield run, left.get_column("i").gather(taken).to_list(), places
                if len(rows) == left.height:
                    return
                left = left.with_row_index("row").filter(~pl.col("row").is_in(taken.implode())).drop("row")

    def _settle(self, runs: bool = False) -> None:
        """Let the packed blocks be looked in. Few keys (fewer than a run with the newest) join the newest,
        as `put` would have put them; else they and the newest, oldest first, become runs of `run_keys`
        each, and what is left over, fewer than a run, the newest again (`runs`: all of it runs)."""
        if not self._packed and not runs:
            return
        blocks, self._packed = self._packed, []
        count = sum(len(block[0]) for block in blocks) // 16
        if not runs and count + len(self._recent) < self._run_keys:
            self._unpack(blocks)
            return
        newest = self._pack_recent()
        if newest is not None:  # newer than every block
            blocks.append(newest)
            count += len(newest[0]) // 16
        packed = b"".join(block[0] for block in blocks)
        estimates: array[int] | None = None
        if any(block[1] is not None for block in blocks):
            estimates = array("q")
            for block in blocks:  # 8 zero bytes a key of a block without estimates
                estimates.extend(block[1] if block[1] is not None else array("q", bytes(len(block[0]) // 2)))
        costs: array[float] | None = None
        if any(block[2] for block in blocks):
            costs = array("d")
            for block in blocks:
                cost = block[2]
                costs.extend(cost if isinstance(cost, array) else array("d", [cost]) * (len(block[0]) // 16))
        del blocks
        step = self._run_keys
        whole = count if runs else count - count % step
        for start in range(0, whole, step):
            stop = min(start + step, whole)
            self._add_run(
                packed[16 * start : 16 * stop],
                estimates[start:stop] if estimates is not None else None,
                costs[start:stop] if costs is not None else None,
            )
        if whole < count:  # fewer than a run: the newest keys again
            left = (packed[16 * whole :], estimates[whole:] if estimates is not None else None)
            self._unpack([(*left, costs[whole:] if costs is not None else 0.0)])

    def _unpack(self, blocks: list[Block]) -> None:
        """Packed blocks into the newest keys, a key's value in the dict standing (it is newer)."""
        recent = self._recent
        for packed, raws, reserved in reversed(blocks):  # newest first (blocks, keys): a newer value stands
            text = packed.hex()
            count = len(packed) // 16
            values = reversed(raws.tolist()) if raws is not None else [0] * count
            costs = reversed(reserved.tolist()) if isinstance(reserved, array) else [reserved] * count
            for at, raw, cost in zip(range(len(text) - 32, -1, -32), values, costs, strict=True):
                recent.setdefault(text[at : at + 32], (raw, cost))

    def _pack_recent(self) -> Block | None:
        """The newest keys as a packed block (those not 32 hex digits move to `_odd`), the dict emptied."""
        recent, self._recent = self._recent, {}
        keys = list(recent)
        packed = _packed(keys)
        if packed is None:
            hexed = []
            for key in keys:
                if _HEX.fullmatch(key):
                    hexed.append(key)
                else:
                    self._odd[key] = recent[key]
            keys = hexed
            packed = bytes.fromhex("".join(keys))
        if not keys:
            return None
        values = [recent[key] for key in keys]
        raw = array("q", [value[0] for value in values])
        reserved = array("d", [value[1] for value in values])
        return packed, raw if any(raw) else None, reserved if any(reserved) else 0.0

    def _freeze(self) -> None:
        """The newest keys, and the packed blocks before them, into runs (keys not 32 hex digits move to
        `_odd`); the same keys still live in older runs leave them (the newer value stands)."""
        self._settle(runs=True)

    def _add_run(self, packed: bytes, raw: array[int] | None, reserved: array[float] | None) -> None:
        """A run of these keys, the newest; the same keys live in older runs leave them."""
        run = _Run(packed, raw, reserved)
        for older in self._runs:  # a hash lookup of the high halves; exact only where one is there
            again = run.high_series.is_in(older.high_series.implode()).arg_true().to_list()
            for j in again:
                at = older.find(run.high[j], run.low[j])
                if at >= 0:
                    older.take(at)
        self._drop_empty()
        self._runs.append(run)

    def _drop_empty(self) -> None:
        if any(not run.live for run in self._runs):
            self._runs = [run for run in self._runs if run.live]


def _packed(keys: list[str]) -> bytes | None:
    """The keys as 16 bytes each (high half first), or None unless every one is 32 lowercase hex digits
    (one parse and one comparison for the block: its canonical spelling must be the keys themselves)."""
    joined = " ".join(keys)
    try:
        packed = bytes.fromhex(joined)
    except ValueError:
        return None
    return packed if len(packed) == 16 * len(keys) and packed.hex(" ", 16) == joined else None


def _halves(keys: list[str]) -> tuple[list[int], tuple[list[int], list[int]]]:
    """The positions of the keys that are 32 lowercase hex digits, and their high and low 64 bits as signed
    integers (polars reinterprets them; one parse for a block of the usual keys; key by key when some are not)."""
    packed = _packed(keys)
    if packed is not None:
        index = list(range(len(keys)))
    else:
        index = [i for i, key in enumerate(keys) if _HEX.fullmatch(key)]
        packed = bytes.fromhex("".join(keys[i] for i in index))
    halves = array("q", packed)  # signed: polars takes a list of these without its slow path
    if sys.byteorder == "little":
        halves.byteswap()
    return index, (halves[0::2].tolist(), halves[1::2].tolist())


class OpenKeys(MutableSet[str]):
    """A set of request keys (`Run.outstanding`: handed to a sender, not answered yet) in a KeyTable: its
    own, or one whose values another keeps (`table`: the Accountant's, so a run holds each key in flight
    once; a key added here is put with the value (0, 0.0))."""

    def __init__(self, keys: Iterable[str] = (), run_keys: int = 65_536, table: KeyTable | None = None) -> None:
        self.table = self._table = table if table is not None else KeyTable(run_keys)
        self.update(keys)

    def __len__(self) -> int:
        return len(self._table)

    def __bool__(self) -> bool:
        return bool(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def add(self, key: str) -> None:
        self._table.put(key, 0, 0.0)

    def update(self, keys: Iterable[str]) -> None:
        block = list(keys)
        self._table.put_many(block, [0] * len(block))

    def discard(self, key: str) -> None:
        self._table.pop(key)

    def difference_update(self, keys: Iterable[str]) -> None:
        """Take every one of `keys` away (vectorised: a block of answers)."""
        self._table.pop_many(list(keys))

    def contains_many(self, keys: list[str]) -> list[bool]:
        """Is each key in the set? (Vectorised.)"""
        return self._table.contains_many(keys)

    def take_many(self, keys: list[str]) -> list[bool]:
        """Take `keys` away; whether each was in the set (one look a key, for a block of answers)."""
        return [value is not None for value in self._table.pop_many(keys)]
