"""The betting test BARGAIN uses to decide, from a sample drawn without replacement, whether a
population's mean is above (or below) a value, with a chance of error at most `alpha`.

It follows `BARGAIN.bounds.betting_bounds` (the `bargain` package, MIT; Waudby-Smith and Ramdas's
hedged-capital confidence sequences, sampling without replacement): a gambler bets against the null
"the mean is m"; under the null her capital is a non-negative martingale, so by Ville's inequality it
reaches 1/alpha with probability at most alpha whenever she looks. Each bet is sized by a predictable
plug-in (the regularised variance of the draws so far, shrinking with the step as in the package's
sequential form) and truncated so the capital stays positive. Without replacement, the null's mean
of what is left to draw moves with each draw: m_t = (N m - S_{t-1}) / (N - t + 1).

`above(xs, m, alpha, n)` is True when the draws show the mean of the n items is above m; `below`
likewise for under m. Draws are 0/1 (agreement with the oracle) here, but any value in [0, 1] works.
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
