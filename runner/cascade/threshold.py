"""BARGAIN's accuracy-target cascade (BARGAIN_A), replayable: `choose` never calls a model; it names the
rows it needs oracle answers for (`Step.need`) and is called again once they are in (docs/decisions.md,
"Cascade: the betting test and the threshold procedure" and "Cascade: weighted draws")."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from runner.cascade.bounds import share_above, share_below, weighted


@dataclass(frozen=True)
class Settings:
    """How the search runs; the guarantee holds for any of them (they decide cost, not validity).
    The defaults were chosen on the tuning seeds of bench/cascade_tune.py, not on bench/cascade.py's."""

    thresholds: int = 50  # M: candidate thresholds, n/M rows apart
    draw: int = 10  # draws between looks
    worth_trying: int = 50  # draws after which a threshold may be given up (hopeless, or not worth more draws)
    give_up_z: float = 2.0  # ... not worth more: draws outnumber n/M and the estimate plus this many errors is over
    weight_floor: float = 0.4  # a row is drawn with a chance in proportion to 1 - its confidence + this

    def __post_init__(self) -> None:
        if self.weight_floor <= 0:
            raise ValueError("weight_floor must be above 0: every row must have a chance to be drawn")


DEFAULT = Settings()


@dataclass(frozen=True)
class Tested:
    """One threshold the procedure tried: the rows it keeps, the agreement it needed, the draws it took."""

    kept: int = 0
    needed: float = 0.0
    draws: int = 0
    accepted: bool = False


@dataclass(frozen=True)
class Step:
    """What the procedure needs next (`need`: rows to send to the oracle), or, when `need` is empty,
    its decision: the rows whose proxy answer is kept, and the rows drawn for the oracle."""

    need: tuple[int, ...] = ()
    keep: frozenset[int] = frozenset()
    sampled: frozenset[int] = frozenset()
    threshold: float | None = None  # the lowest kept confidence (None: no proxy answer kept)
    tested: tuple[Tested, ...] = ()


class _Need(Exception):
    """Raised inside the replay when a draw has no oracle answer yet."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows


def order(scores: Sequence[float | None], seed: int) -> list[int]:
    """Row positions the proxy answered, most confident first; ties in a seeded random order."""
    tie = list(range(len(scores)))
    random.Random(f"tie-{seed}").shuffle(tie)
    rank_of_tie = {pos: i for i, pos in enumerate(tie)}
    answered = [pos for pos, s in enumerate(scores) if s is not None]
    return sorted(answered, key=lambda pos: (-(scores[pos] or 0.0), rank_of_tie[pos]))


def weight(score: float, settings: Settings = DEFAULT) -> float:
    """A row's weight in the draws: rows the proxy is less sure of are drawn more often (where the
    disagreements are), and every row can be drawn (a score outside 0..1 counts as the nearer end)."""
    return 1.0 - min(max(score, 0.0), 1.0) + settings.weight_floor


def choose(
    scores: Sequence[float | None],
    agrees: Callable[[int], bool | None],
    *,
    target: float,
    delta: float,
    seed: int,
    settings: Settings = DEFAULT,
) -> Step:
    """Replay the method with the oracle answers known so far (`agrees(row)`: does the proxy's answer
    match the oracle's; None when the oracle has not answered), or name the rows it needs next."""
    ranked = order(scores, seed)
    n, total = len(ranked), len(scores)
    weights = [weight(scores[pos] or 0.0, settings) for pos in ranked]  # by rank; the least first
    draws = _Draws(weights, seed)
    drawn: set[int] = set()
    tested: list[Tested] = []
    best = -1
    step = max(n // settings.thresholds, 1)
    try:
        for t in range(step - 1, n, step):
            kept = t + 1
            needed = (target * total - (total - kept)) / kept
            if needed <= 0:
                best = t
                continue
            ok, used = _confident(ranked, draws, t, needed, agrees, delta, step, settings)
            drawn.update(used)
            tested.append(Tested(kept, round(needed, 4), len(used), ok))
            if not ok:
                break
            best = t
    except _Need as missing:
        return Step(need=tuple(missing.rows))
    sampled = frozenset(ranked[r] for r in drawn)
    keep = frozenset(ranked[r] for r in range(best + 1)) - sampled
    threshold = scores[ranked[best]] if best >= 0 else None
    return Step(keep=keep, sampled=sampled, threshold=threshold, tested=tuple(tested))


class _Draws:
    """One seeded sequence of ranks drawn with replacement, each with a chance in proportion to its
    weight; the draws for threshold t are those of ranks 0..t, in order (so a larger t reuses them)."""

    def __init__(self, weights: list[float], seed: int) -> None:
        self.weights = weights
        self.cumulative = list(itertools.accumulate(weights))
        self.rng = random.Random(f"draw-{seed}")
        self.sequence: list[int] = []

    def upto(self, t: int) -> Iterator[int]:
        """The draws of ranks 0..t, as long as they are wanted."""
        i = 0
        while True:
            if i == len(self.sequence):
                point = self.rng.random() * self.cumulative[-1]
                self.sequence.append(min(bisect.bisect_right(self.cumulative, point), len(self.weights) - 1))
            if self.sequence[i] <= t:
                yield self.sequence[i]
            i += 1


def _confident(
    ranked: list[int],
    draws: _Draws,
    t: int,
    needed: float,
    agrees: Callable[[int], bool | None],
    delta: float,
    gain: int,
    settings: Settings,
) -> tuple[bool, set[int]]:
    """Draw from ranks 0..t until the test decides whether their agreement is above `needed`, or more
    draws are not worth it (Settings: `worth_trying`, `give_up_z`; `gain`: the rows accepting t adds)."""
    allowed = 1 - needed  # the disagreeing share the kept rows may have
    if allowed <= 0:
        return False, set()
    weights = draws.weights
    least, mean_weight = weights[0], draws.cumulative[t] / (t + 1)
    pool = draws.upto(t)
    seen: list[tuple[bool, float]] = []  # (disagrees, weight) per draw
    used: set[int] = set()
    while True:
        if len(seen) >= settings.worth_trying:
            xs = weighted(seen, least)
            mean = sum(xs) / len(xs)
            error = math.sqrt(max(sum(x * x for x in xs) / len(xs) - mean * mean, 0.0) / len(xs))
            scale = mean_weight / least  # the values' mean times this estimates the disagreeing share
            if (mean - error) * scale > allowed or (
                len(seen) >= gain and (mean + settings.give_up_z * error) * scale > allowed
            ):
                return False, used
        batch = [next(pool) for _ in range(settings.draw)]
        answers = [agrees(ranked[r]) for r in batch]
        if any(a is None for a in answers):
            raise _Need(list(dict.fromkeys(ranked[r] for r in batch if agrees(ranked[r]) is None)))
        seen.extend((not a, weights[r]) for a, r in zip(answers, batch, strict=True))
        used.update(batch)
        if len(used) == t + 1:  # every row drawn: the share is known exactly
            return sum(1 for r in range(t + 1) if not agrees(ranked[r])) <= allowed * (t + 1), used
        if share_below(seen, allowed, delta, mean_weight, least):
            return True, used
        if share_above(seen, allowed, delta, mean_weight, least):
            return False, used
