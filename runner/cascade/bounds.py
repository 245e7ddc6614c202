"""The betting test BARGAIN uses: do draws without replacement show a population's mean above (or below) m?

    above(xs, m, alpha, n)   # True when the draws show the mean of the n items is above m
    below(xs, m, alpha, n)   # likewise for under m; each wrong with a chance of at most alpha

Draws are 0/1 (agreement with the oracle) here, but any value in [0, 1] works. The method:
docs/decisions.md, "Cascade: the betting test and the threshold procedure".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TRUNCATION = 0.75  # the package's trunc_scale: a bet never risks more than 3/4 of the capital


def _bet(alpha: float, i: int, total: float, squares: float) -> float:
    """The bet before the i-th draw (1-based), sized by the regularised variance of the i-1 draws so
    far (their sum `total` and sum of squares `squares`): the package's sequential form,
    sqrt(2 log(2/alpha) / (i log(i+1) s^2)) with s^2 = (1/4 + sum (x - mu)^2) / i, mu = (1/2 + sum x) / i."""
    k = i - 1
    mean = (0.5 + total) / (k + 1)
    variance = (0.25 + squares - 2 * mean * total + k * mean * mean) / (k + 1)
    return math.sqrt(2 * math.log(2 / alpha) / (i * math.log(i + 1) * variance))


def _rejects(xs: Sequence[float], m: float, alpha: float, n: int, side: int) -> bool:
    """Does the capital betting that the mean is on `side` (+1 above, -1 below) of m reach 1/alpha?"""
    capital, drawn, squares = 1.0, 0.0, 0.0
    for i, x in enumerate(xs, start=1):
        left = n - (i - 1)
        m_t = (n * m - drawn) / left if left > 0 else m
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


def above(xs: Sequence[float], m: float, alpha: float, n: int) -> bool:
    """True when the draws (without replacement from n items) show their mean is above m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, +1)


def below(xs: Sequence[float], m: float, alpha: float, n: int) -> bool:
    """True when the draws (without replacement from n items) show their mean is below m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, -1)
