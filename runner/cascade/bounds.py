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


class Betting:
    """The capital betting that the mean of n items is on `side` (+1 above, -1 below) of m, one draw at
    a time: `add(x)` returns True once it has reached 1/alpha (and stays so: Ville's inequality lets the
    test look after every draw). With `undrawn`, the claim is about the items left undrawn when it
    stops, the drawn ones counted as 1 (the cascade's drawn rows carry the oracle's answer): that at
    most n (1 - m) of them are 0 (docs/decisions.md, "Cascade: the drawn rows count as the oracle's")."""

    def __init__(self, m: float, alpha: float, n: int, side: int, *, undrawn: bool = False) -> None:
        self.m, self.alpha, self.n, self.side, self.undrawn = m, alpha, n, side, undrawn
        self.capital, self.drawn, self.squares, self.i = 1.0, 0.0, 0.0, 0
        self.rejected, self.settled = False, False

    def add(self, x: float) -> bool:
        if self.rejected or self.settled:
            return self.rejected
        self.i += 1
        left = self.n - (self.i - 1)
        counted = self.i - 1 if self.undrawn else self.drawn
        m_t = (self.n * self.m - counted) / left if left > 0 else self.m
        if m_t <= 0 or m_t >= 1:
            # What is left must average below 0 (the mean is surely above m) or above 1 (surely below).
            self.rejected, self.settled = (m_t <= 0) == (self.side > 0), True
            return self.rejected
        room = m_t if self.side > 0 else 1 - m_t
        bet = min(_bet(self.alpha, self.i, self.drawn, self.squares), TRUNCATION / room)
        self.capital *= 1 + self.side * bet * (x - m_t)
        self.drawn += x
        self.squares += x * x
        self.rejected = self.capital >= 1 / self.alpha
        return self.rejected


def _rejects(xs: Sequence[float], m: float, alpha: float, n: int, side: int) -> bool:
    """Does the capital betting that the mean is on `side` (+1 above, -1 below) of m reach 1/alpha?"""
    test = Betting(m, alpha, n, side)
    return any(test.add(x) for x in xs)


def above(xs: Sequence[float], m: float, alpha: float, n: int) -> bool:
    """True when the draws (without replacement from n items) show their mean is above m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, +1)


def below(xs: Sequence[float], m: float, alpha: float, n: int) -> bool:
    """True when the draws (without replacement from n items) show their mean is below m (error <= alpha)."""
    return _rejects(xs, m, alpha, n, -1)
