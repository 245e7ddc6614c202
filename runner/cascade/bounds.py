"""The betting test BARGAIN uses: do draws from n items (n None: with replacement) show their mean is
above (or below) m, wrong with a chance of at most alpha? `share_below`/`share_above` test a population's
flagged share from draws made with chances in proportion to weight (docs/decisions.md, "Cascade: the
betting test and the threshold procedure" and "Cascade: weighted draws")."""

from __future__ import annotations

import math
from collections.abc import Sequence

TRUNCATION = 0.75  # the package's trunc_scale: a bet never risks more than 3/4 of the capital


def _bet(alpha: float, i: int, total: float, squares: float) -> float:
    """The bet before the i-th draw, sized by the regularised variance of the draws so far (sum `total`,
    sum of squares `squares`): the package's sqrt(2 log(2/alpha) / (i log(i+1) s^2))."""
    k = i - 1
    mean = (0.5 + total) / (k + 1)
    variance = (0.25 + squares - 2 * mean * total + k * mean * mean) / (k + 1)
    return math.sqrt(2 * math.log(2 / alpha) / (i * math.log(i + 1) * variance))


def _rejects(xs: Sequence[float], m: float, alpha: float, n: int | None, side: int) -> bool:
    """Does the capital betting that the mean is on `side` (+1 above, -1 below) of m reach 1/alpha?
    Without replacement (n items) the null's mean of what is left moves with each draw; with (None) it stays m."""
    capital, drawn, squares = 1.0, 0.0, 0.0
    for i, x in enumerate(xs, start=1):
        left = n - (i - 1) if n is not None else 0
        m_t = (n * m - drawn) / left if n is not None and left > 0 else m
        if m_t <= 0:
            return side > 0  # what is left must average below 0: the mean is surely above m
        if m_t >= 1:
            return side < 0  # ... above 1: the mean is surely below m
        room = m_t if side > 0 else 1 - m_t
        bet = min(_bet(alpha, i, drawn, squares), TRUNCATION / room)
        capital *= 1 + side * bet * (x - m_t)
        if capital >= 1 / alpha:
            return True
        drawn += x
        squares += x * x
    return False


def above(xs: Sequence[float], m: float, alpha: float, n: int | None) -> bool:
    """True when the draws (without replacement from n items; None: with replacement) show their mean
    is above m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, +1)


def below(xs: Sequence[float], m: float, alpha: float, n: int | None) -> bool:
    """True when the draws (without replacement from n items; None: with replacement) show their mean
    is below m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, -1)


def weighted(draws: Sequence[tuple[bool, float]], least_weight: float) -> list[float]:
    """Draws (flagged, the item's weight) as values in [0, 1]: least_weight / weight when flagged, else 0.
    Drawn with chances in proportion to weight, their mean is the flagged share times least_weight / mean_weight."""
    return [least_weight / weight if flagged else 0.0 for flagged, weight in draws]


def share_below(
    draws: Sequence[tuple[bool, float]], share: float, alpha: float, mean_weight: float, least_weight: float
) -> bool:
    """True when weighted draws (with replacement, chances in proportion to weight; `mean_weight` and
    `least_weight` the population's) show that its flagged share is below `share` (error <= alpha)."""
    return below(weighted(draws, least_weight), share * least_weight / mean_weight, alpha, None)


def share_above(
    draws: Sequence[tuple[bool, float]], share: float, alpha: float, mean_weight: float, least_weight: float
) -> bool:
    """True when weighted draws show that the population's flagged share is above `share` (error <= alpha)."""
    return above(weighted(draws, least_weight), share * least_weight / mean_weight, alpha, None)
