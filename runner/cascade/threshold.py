"""BARGAIN's accuracy-target cascade (BARGAIN_A), as a procedure that can be replayed: it never calls a
model, it asks for oracle answers and is run again once they are in.

    step = choose(scores, agrees, target=0.95, delta=0.05, seed=7)
    if step.need: ...send these rows to the oracle, then call choose again...
    else: step.keep (proxy answers kept), step.sampled (oracle answers, the calibration sample)

The method: docs/decisions.md, "Cascade: the betting test and the threshold procedure".
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runner.cascade.bounds import above, below


@dataclass(frozen=True)
class Settings:
    """How the search runs; the guarantee holds for any of them (they decide cost, not validity).
    The defaults were chosen on the tuning seeds of bench/cascade_tune.py, not on bench/cascade.py's."""

    thresholds: int = 50  # M: candidate thresholds, n/M rows apart
    draw: int = 10  # draws between looks
    worth_trying: int = 50  # draws after which a threshold may be given up (hopeless, or not worth more draws)
    give_up_z: float = 1.5  # ... not worth more: draws outnumber n/M and their mean minus this many errors is short


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


def choose(
    scores: Sequence[float | None],
    agrees: Callable[[int], bool | None],
    *,
    target: float,
    delta: float,
    seed: int,
    ahead: int = 1,
    settings: Settings = DEFAULT,
) -> Step:
    """Replay the method with the oracle answers known so far (`agrees(row)`: does the proxy's answer
    match the oracle's; None when the oracle has not answered). See the module's docstring. When it
    needs answers it asks for the next `ahead` draws of 10 at once (fewer, longer rounds; the extra
    rows are sent to the oracle, so their answers are used, never wasted on the output)."""
    ranked = order(scores, seed)
    n, total = len(ranked), len(scores)
    draws = list(range(n))
    random.Random(f"draw-{seed}").shuffle(draws)  # ranks, in the order they are drawn
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
            ok, used = _confident(ranked, draws, t, needed, agrees, delta, ahead, step, settings)
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


def _confident(
    ranked: list[int],
    draws: list[int],
    t: int,
    needed: float,
    agrees: Callable[[int], bool | None],
    delta: float,
    ahead: int,
    gain: int,
    settings: Settings,
) -> tuple[bool, list[int]]:
    """Draw from ranks 0..t until the test decides whether their agreement is above `needed`, or it is
    not worth more draws: past `worth_trying`, their mean plus one standard error is under `needed`, or
    they outnumber `gain` (the rows accepting t would add) with their mean minus `give_up_z` standard
    errors under it."""
    pool = [r for r in draws if r <= t]
    xs: list[float] = []
    used: list[int] = []
    while True:
        if len(xs) >= settings.worth_trying:
            mean = sum(xs) / len(xs)
            error = math.sqrt(mean * (1 - mean) / len(xs))
            if mean + error < needed or (len(xs) >= gain and mean - settings.give_up_z * error < needed):
                return False, used
        batch = pool[len(xs) : len(xs) + settings.draw]
        answers = [agrees(ranked[r]) for r in batch]
        if any(a is None for a in answers):
            wanted = pool[len(xs) : len(xs) + settings.draw * ahead]
            raise _Need([ranked[r] for r in wanted if agrees(ranked[r]) is None])
        xs.extend(float(bool(a)) for a in answers)
        used.extend(batch)
        mean = sum(xs) / len(xs)
        if len(xs) >= len(pool):  # every row drawn: the mean is known exactly
            return mean >= needed, used
        if mean < needed:
            if below(xs, needed, delta, t + 1):
                return False, used
        elif above(xs, needed, delta, t + 1):
            return True, used
