"""run.max_cost across a Ray run's actors: the limiter's reserve, settle and release, each named by a
Reservation id, are applied once whatever order, however often and however late they arrive (a call Ray repeats, a
settle from a worker whose lease was reclaimed or lapsed and which joined again, a worker that dies).

No Ray: a ClusterLimiter in the test's own event loop, its clock moved by the test. Skipped where ray is
not installed, except in CI.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.distributed.limiter import ClusterLimiter
from runner.distributed.spending import Numbers
from runner.distributed.terms import Reservation

TIMEOUT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiter(max_cost: float, clock: Clock | None = None) -> ClusterLimiter:
    return ClusterLimiter(concurrency=4, max_cost=max_cost, lease_timeout_s=TIMEOUT_S, clock=clock or Clock())


def r(n: int, instance: str = "a") -> Reservation:
    return Reservation(instance, n)


async def books(limit: ClusterLimiter) -> tuple[float, float]:
    stats = await limit.stats()
    return stats["reserved"], stats["spent"]


async def test_a_settle_that_arrives_twice_is_booked_once() -> None:
    budget = limiter(1.0)
    assert await budget.reserve("w0", r(1), 0.4)
    await budget.settle("w0", r(1), 0.1)
    await budget.settle("w0", r(1), 0.1)  # Ray delivered the message again
    assert await books(budget) == (0.0, pytest.approx(0.1))


async def test_a_reserve_that_arrives_twice_reserves_once() -> None:
    budget = limiter(1.0)
    assert await budget.reserve("w0", r(1), 0.4)
    assert await budget.reserve("w0", r(1), 0.4)  # the same call again: the same answer, nothing more held
    assert await books(budget) == (pytest.approx(0.4), 0.0)
    await budget.settle("w0", r(1), 0.4)
    assert not await budget.reserve("w0", r(1), 0.4)  # a copy arriving after its settle holds nothing
    assert await books(budget) == (0.0, pytest.approx(0.4))


async def test_a_refused_reserve_repeated_once_room_is_made_still_holds_nothing() -> None:
    budget = limiter(1.0)
    assert await budget.reserve("w0", r(1), 0.8)
    assert not await budget.reserve("w0", r(2), 0.4)  # 1.2 > 1.0: the worker stops dispatching
    await budget.settle("w0", r(1), 0.1)
    assert not await budget.reserve("w0", r(2), 0.4)  # the refused call again, now that it would fit
    assert await books(budget) == (0.0, pytest.approx(0.1))


async def test_a_late_settle_from_a_worker_that_joined_again_changes_nothing() -> None:
    """The worker's lease was reclaimed (its open reservation booked as spent at its worst case), it
    joined again and reserved anew; the settle of its first reservation, late, must not release the
    new one nor add its cost on top of the worst case already booked."""
    budget = limiter(1.0)
    await budget.join("w0", "i", 1)
    assert await budget.reserve("w0", r(1), 0.4)
    assert await budget.reclaim("w0") == 0
    assert await books(budget) == (0.0, pytest.approx(0.4))  # orphaned: its request may have been billed
    await budget.join("w0", "i", 2)
    assert await budget.reserve("w0", r(2), 0.3)
    await budget.settle("w0", r(1), 0.1)  # late
    assert await books(budget) == (pytest.approx(0.3), pytest.approx(0.4))
    assert (await budget.stats())["orphaned"] == pytest.approx(0.4)


async def test_reservations_made_before_a_worker_joins_are_not_orphaned_by_its_join() -> None:
    """An actor reserves its first requests' worst cases before its slots join (they join at the first
    slot asked for); the join is no death, and each answer is booked once, at what it cost."""
    budget = limiter(1.0)
    assert await budget.reserve("w0", r(1), 0.4)
    assert await budget.reserve("w0", r(2), 0.4)
    await budget.join("w0", "i", 1)
    await budget.settle("w0", r(1), 0.1)
    await budget.settle("w0", r(2), 0.1)
    assert await books(budget) == (0.0, pytest.approx(0.2))
    assert (await budget.stats())["orphaned"] == 0.0


async def test_a_worker_that_dies_before_it_joins_has_its_reservations_booked_after_the_timeout() -> None:
    clock = Clock()
    budget = limiter(1.0, clock)
    assert await budget.reserve("w0", r(1), 0.4)  # and then the actor dies: no lease, no settle
    clock.now += TIMEOUT_S / 2
    await budget.join("w1", "j", 1)  # any call looks for the dead
    assert await books(budget) == (pytest.approx(0.4), 0.0)
    clock.now += TIMEOUT_S
    await budget.join("w2", "k", 1)
    assert await books(budget) == (0.0, pytest.approx(0.4))


async def test_a_reservation_never_sent_is_handed_back_once_and_a_late_reserve_of_it_holds_nothing() -> None:
    """A stopped block hands back the reservations of requests it never sent: the budget has them again,
    nothing is booked as spent, a release repeated changes nothing, and a release that overtook its own
    reserve (the block was cancelled while the reserve was on the wire) makes that reserve hold nothing."""
    budget = limiter(1.0)
    assert await budget.reserve("w0", r(1), 0.4)
    assert await budget.reserve("w0", r(2), 0.4)
    await budget.release("w0", [r(1), r(2)])
    await budget.release("w0", [r(2)])  # again
    assert await books(budget) == (0.0, 0.0)
    await budget.release("w0", [r(3)])  # before its reserve arrives
    assert not await budget.reserve("w0", r(3), 0.4)
    assert await books(budget) == (0.0, 0.0)
    assert (await budget.stats())["released"] == 2


async def test_a_release_after_the_workers_lease_was_reclaimed_leaves_its_reservations_spent() -> None:
    """Once a lost lease booked a worker's open reservations as spent at their worst case, a late release
    of them changes nothing: the limiter cannot tell it from one of a request that was billed."""
    budget = limiter(1.0)
    await budget.join("w0", "i", 1)
    assert await budget.reserve("w0", r(1), 0.4)
    await budget.reclaim("w0")
    await budget.release("w0", [r(1)])
    assert await books(budget) == (0.0, pytest.approx(0.4))


def test_closed_reservation_numbers_cost_a_range_per_gap_not_an_entry_each() -> None:
    """A worker's closed numbers are what a repeated message is checked against: 100,000 closed in
    order, with 10 left open, are 11 ranges."""
    closed = Numbers()
    open_ = set(range(5_000, 100_000, 10_000))
    for n in range(1, 100_001):
        if n not in open_:
            closed.add(n)
    assert closed.ranges == 11
    assert all(n not in closed for n in open_) and 1 in closed and 100_000 in closed and 100_001 not in closed
    for n in sorted(open_, reverse=True):  # settled at last, out of order
        closed.add(n)
    assert closed.ranges == 1


# -- every order ------------------------------------------------------------------------------------------

FOREVER = 1e9


@dataclass
class Msg:
    """A reserve, settle or release on the wire; `answers` are what its deliveries returned at the limiter."""

    kind: str
    worker: str
    bit: int  # the reservation's amount is 2**bit: the books' sums say which reservations are in them
    billed: bool = True  # a settle's actual: the worst case, or nothing (a failed request)
    answers: list[object] = field(default_factory=list)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data(), workers=st.integers(1, 3), steps=st.integers(5, 80))
def test_every_order_of_budget_messages_books_each_reservation_once(
    data: st.DataObject, workers: int, steps: int
) -> None:
    """Reservations of 2**k, so the books' sums say exactly which reservations are in them: after every
    step no reservation is both reserved and spent, none is in the books that the limiter never granted,
    none the worker settled or released is still reserved, and every billed one its worker settled is
    spent. At the end, with every message delivered, nothing is reserved and every billed one is spent.
    A worker releases a reservation it holds, or one whose reserve it sent and stopped waiting for."""

    async def scenario() -> None:
        clock = Clock()
        budget = ClusterLimiter(concurrency=4, max_cost=2.0**60, lease_timeout_s=FOREVER, clock=clock)
        names = [f"w{i}" for i in range(workers)]
        joins = dict.fromkeys(names, 0)
        numbers: dict[int, Reservation] = {}
        owner: dict[int, str] = {}
        msgs: list[Msg] = []
        granted: set[int] = set()  # reservations some delivery of the reserve was granted
        held: set[int] = set()  # reservations the worker got True for and has not settled
        settled: dict[int, bool] = {}  # reservations the worker settled, and whether they were billed
        released: set[int] = set()  # reservations the worker handed back unused
        orphaned = 0  # bits of reservations the limiter booked as spent when it took their worker for dead

        async def deliver(msg: Msg) -> None:
            reservation = numbers[msg.bit]
            if msg.kind == "reserve":
                answer = await budget.reserve(msg.worker, reservation, 2.0**msg.bit)
                if answer:
                    granted.add(msg.bit)
                if not msg.answers and answer and msg.bit not in released:
                    held.add(msg.bit)  # the first reply is the one that reaches the worker (if it still waits)
            elif msg.kind == "release":
                answer = await budget.release(msg.worker, [reservation])
            else:
                answer = await budget.settle(msg.worker, reservation, 2.0**msg.bit if msg.billed else 0.0)
            msg.answers.append(answer)

        def check() -> None:
            assert budget.spending is not None
            books = budget.spending.budget
            reserved, spent = int(books.reserved), int(books.spent)
            assert reserved == books.reserved and spent == books.spent  # sums of distinct powers of two: exact
            bits = sum(1 << b for b in granted)
            assert reserved & spent == 0, (bin(reserved), bin(spent))
            assert (reserved | spent) & ~bits == 0, (bin(reserved), bin(spent), bin(bits))
            delivered = {m.bit for m in msgs if m.kind in ("settle", "release") and m.answers}
            for bit in delivered:
                assert not reserved >> bit & 1, bit
                if settled.get(bit):
                    assert spent >> bit & 1, bit
            unsent = sum(1 << b for b in released)
            assert spent & unsent & ~orphaned == 0, (bin(spent), bin(unsent))  # never sent: never spent

        def reserved_now() -> int:
            assert budget.spending is not None
            return int(budget.spending.budget.reserved)

        for _ in range(steps):
            kinds = ["new", "deliver", "settle", "release", "join", "reclaim", "lapse"]
            kind = data.draw(st.sampled_from(kinds), label="kind")
            worker = data.draw(st.sampled_from(names), label="worker")
            if kind == "new" and len(numbers) < 48:
                bit = len(numbers)
                numbers[bit] = Reservation(f"{worker}-{joins[worker]}", bit)
                owner[bit] = worker
                msgs.append(Msg("reserve", worker, bit))
            elif kind == "deliver" and (waiting := [m for m in msgs if len(m.answers) < 3]):
                await deliver(data.draw(st.sampled_from(waiting), label="message"))
            elif kind == "settle" and (mine := sorted(b for b in held if owner[b] == worker)):
                bit = data.draw(st.sampled_from(mine), label="settles")
                billed = data.draw(st.booleans(), label="billed")
                held.discard(bit)
                settled[bit] = billed
                msgs.append(Msg("settle", worker, bit, billed))
            elif kind == "release" and (
                mine := sorted(
                    b
                    for b in numbers
                    if owner[b] == worker
                    and b not in settled
                    and b not in released
                    and (b in held or not any(m.answers for m in msgs if m.kind == "reserve" and m.bit == b))
                )
            ):
                bit = data.draw(st.sampled_from(mine), label="releases")
                held.discard(bit)
                released.add(bit)
                msgs.append(Msg("release", worker, bit))
            elif kind == "join":  # a join again drops the old lease, as a reclaim does
                before = reserved_now()
                joins[worker] += 1
                await budget.join(worker, worker, joins[worker])
                orphaned |= before & ~reserved_now()
            elif kind == "reclaim":
                before = reserved_now()
                await budget.reclaim(worker)
                orphaned |= before & ~reserved_now()
            elif kind == "lapse":
                before = reserved_now()
                clock.now += 2 * FOREVER
                budget._reap()
                orphaned |= before & ~reserved_now()
            check()

        for msg in [m for m in msgs if not m.answers]:  # every message arrives at last, reserves first
            if msg.kind == "reserve":
                await deliver(msg)
        for bit in sorted(held):
            held.discard(bit)
            settled[bit] = True
            msgs.append(Msg("settle", owner[bit], bit))
        for msg in [m for m in msgs if not m.answers]:
            await deliver(msg)
        check()
        assert budget.spending is not None
        assert budget.spending.budget.reserved == 0.0
        billed = sum(1 << b for b, was in settled.items() if was)
        assert int(budget.spending.budget.spent) & billed == billed

    asyncio.run(scenario())
