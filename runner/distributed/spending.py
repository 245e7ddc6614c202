"""`run.max_cost` for a whole cluster, kept in the run's ClusterLimiter: each request's worst case reserved
under an id, reserved once and settled once however often or late its messages arrive (docs/decisions.md,
"Ray: the budget's messages applied once")."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.distributed.terms import Reservation
from runner.money.pricing import Budget


class Numbers:
    """A set of ints held as sorted, disjoint [lo, hi) ranges: numbers handed out in order and closed
    mostly in order cost one range, not an entry each."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self._lo, n) - 1
        return i >= 0 and n < self._hi[i]

    def add(self, n: int) -> None:
        """Put `n` in the set, merging it with the ranges it touches."""
        if n in self:
            return
        i = bisect_right(self._lo, n)  # the ranges before i start at or below n
        left = i > 0 and self._hi[i - 1] == n
        right = i < len(self._lo) and self._lo[i] == n + 1
        if left and right:
            self._hi[i - 1] = self._hi[i]
            del self._lo[i], self._hi[i]
        elif left:
            self._hi[i - 1] = n + 1
        elif right:
            self._lo[i] = n
        else:
            self._lo.insert(i, n)
            self._hi.insert(i, n + 1)

    @property
    def ranges(self) -> int:
        """How many ranges hold the set."""
        return len(self._lo)


@dataclass
class _Book:
    """One worker instance's reservations: those open (number -> amount) and those closed (settled,
    refused or orphaned), which no later message may open or settle again."""

    worker: str
    seen_at: float  # its last reserve or settle
    open: dict[int, float] = field(default_factory=dict)
    closed: Numbers = field(default_factory=Numbers)


class Spending:
    """The run's Budget, changed only by reservations named by id, each applied once."""

    def __init__(self, max_cost: float, clock: Callable[[], float]) -> None:
        self.budget = Budget(max_cost)
        self._clock = clock
        self._books: dict[str, _Book] = {}  # by Reservation.instance
        self.orphaned = 0.0  # reservations of workers gone, booked as spent at their worst case
        self.released = 0  # reservations handed back unused (their requests were never sent)
        self.repeated = 0  # reserves, settles and releases that arrived again or late, and changed nothing

    def reserve(self, worker: str, reservation: Reservation, amount: float) -> bool:
        """Reserve `amount` under `reservation` if it fits under the cap. A reservation already open
        answers True again, one already closed False, and neither changes anything."""
        book = self._book(worker, reservation)
        number = reservation.number
        if number in book.open or number in book.closed:
            self.repeated += 1
            return number in book.open
        if not self.budget.try_reserve(amount):
            book.closed.add(number)  # refused: a later copy of this call must not reserve it after all
            return False
        book.open[number] = amount
        return True

    def settle(self, worker: str, reservation: Reservation, actual: float) -> None:
        """The reservation's answer came back and cost `actual`: release it and book that, if it is still
        open. Nothing changes for one settled, refused or orphaned before, or never reserved."""
        book = self._book(worker, reservation)
        amount = book.open.pop(reservation.number, None)
        if amount is None:
            self.repeated += 1
            return
        book.closed.add(reservation.number)
        self.budget.settle(amount, actual)

    def release(self, worker: str, reservations: list[Reservation]) -> None:
        """The requests of these reservations were never sent: hand them back, booking nothing, and close
        them. One no longer open changes nothing, and one not reserved yet (its reserve still on the way)
        is closed, so that reserve is refused when it comes."""
        for reservation in reservations:
            book = self._book(worker, reservation)
            amount = book.open.pop(reservation.number, None)
            if amount is None and reservation.number in book.closed:
                self.repeated += 1
                continue
            book.closed.add(reservation.number)
            if amount is not None:
                self.budget.settle(amount, 0.0)
                self.released += 1

    def orphan(self, worker: str) -> None:
        """The worker is gone (or taken for gone): book its open reservations as spent at their worst
        case, as their requests may have been billed, and close them."""
        total = 0.0
        for book in self._books.values():
            if book.worker != worker:
                continue
            for number, amount in book.open.items():
                self.budget.settle(amount, amount)
                book.closed.add(number)
                total += amount
            book.open.clear()
        self.orphaned += total

    def silent(self, cutoff: float) -> set[str]:
        """Workers with reservations open and no reserve or settle since `cutoff` (the limiter orphans
        those it holds no lease for: a worker that died before it ever joined)."""
        workers = {book.worker for book in self._books.values() if book.open}
        return workers - {book.worker for book in self._books.values() if book.seen_at >= cutoff}

    def _book(self, worker: str, reservation: Reservation) -> _Book:
        book = self._books.get(reservation.instance)
        if book is None:
            book = self._books[reservation.instance] = _Book(worker, self._clock())
        book.seen_at = self._clock()
        return book
