"""One account-wide in-flight limit, request and token rates and spending cap for every worker of a cluster
run, as a named actor. Slots are leases whose reports state what a worker holds, and reservations have
ids, so no message repeated, late or lost leaves the books wrong (docs/decisions.md, "Ray leases")."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, cast

import ray
from ray.actor import ActorHandle

from runner.distributed.claims import Claims
from runner.distributed.pacing import Rates
from runner.distributed.spending import Spending
from runner.distributed.terms import Directive, Holding, Joined, LeaseLost, Outcomes, Reservation
from runner.send.limits import AimdController

HEAD_NODE = "node:__internal_head__"  # a resource only the head node has: what places the limiter there
DEFAULT_GRANT = 8  # most slots one acquire hands out: small, so one busy worker cannot starve the rest


@dataclass
class _Lease:
    renewed_at: float
    number: int
    joined: tuple[str, int] = ("", 0)  # the worker's instance and its join count, to know a repeated join
    granted: int = 0  # what the worker last reported holding, plus the grants it has not reported on
    unreported: dict[int, int] = field(default_factory=dict)  # acquire call -> slots granted, not yet settled
    calls: int = 0  # the newest acquire call that reached us
    settled: int = 0  # acquire calls up to this one have ended at the worker (Holding.settled)
    reports: int = 0  # the newest report taken (Holding.report)
    in_use: int = 0  # as last reported by the worker
    waiting: int = 0  # acquire calls of this worker blocked now


class ClusterLimiter:
    """The cluster's in-flight limit (fixed, or adaptive with the local engine's AimdController) and its
    spending cap (runner.distributed.spending), leased to workers. Runs as a named async Ray actor; every
    method runs on the actor's one event loop, so the bookkeeping needs no locks.

    Invariants, checked after every change: the slots granted are the sum of the leases, and a grant never
    takes that sum above the limit in force. (When the adaptive limit falls, slots already granted stay
    granted until returned, as attempts in flight cannot be recalled; no new slot goes out meanwhile.)
    """

    def __init__(
        self,
        *,
        concurrency: int | AimdController,
        max_cost: float | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        lease_timeout_s: float = 10.0,
        max_grant: int = DEFAULT_GRANT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = concurrency if isinstance(concurrency, AimdController) else None
        self._fixed = concurrency if isinstance(concurrency, int) else None
        self.spending = Spending(max_cost, clock) if max_cost is not None else None
        self.claims = Claims()  # request keys shared by blocks: who sends them
        self.rates = Rates(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
        self.lease_timeout_s = lease_timeout_s
        self.max_grant = max_grant
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._reaped: set[str] = set()  # workers whose lease was reclaimed and who have not joined again
        self._granted = 0
        self._numbers = itertools.count(1)  # every lease a number of its own, quoted by its worker
        self._changed: asyncio.Event | None = None  # set when slots come free or leases go; then replaced
        # Counters for stats().
        self._started = clock()
        self._grants = 0
        self._slots_granted = 0
        self._peak = 0
        self._reclaimed = 0
        self._stale = 0  # reports or settles that arrived after their lease was reclaimed
        self._repeated = 0  # calls that arrived again or after a newer one, and changed nothing

    # -- the in-flight limit ---------------------------------------------------------------------------

    async def join(self, worker_id: str, instance: str = "", count: int = 0) -> Joined:
        """Start (or restart) a worker's lease with nothing granted: its number and its timeout. What an
        earlier incarnation under the same id held is reclaimed now; a join repeated or late (the same
        `instance`, a `count` no newer) gets the lease it made and drops nothing."""
        self._reap()
        current = self._leases.get(worker_id)
        if current is not None and instance and current.joined[0] == instance and count <= current.joined[1]:
            self._repeated += 1
            return Joined(lease=current.number, timeout_s=self.lease_timeout_s)
        if current is not None:
            self._drop(worker_id)
        self._reaped.discard(worker_id)
        lease = self._leases[worker_id] = _Lease(
            renewed_at=self._clock(), number=next(self._numbers), joined=(instance, count)
        )
        self._check()
        return Joined(lease=lease.number, timeout_s=self.lease_timeout_s)

    async def acquire(
        self,
        worker_id: str,
        want: int,
        timeout_s: float | None = None,
        lease_number: int | None = None,
        call: int | None = None,
    ) -> int:
        """Grant up to `want` slots (at most max_grant) on the worker's lease `lease_number` (LeaseLost if
        that lease is gone), waiting until at least one is free, or 0 after `timeout_s`. Never grants past
        the limit; during a platform pause nothing is granted.

        `call` numbers the worker's acquires on the lease: a call that arrives again, or after a newer one,
        or after a report said it had ended, grants nothing; a grant is kept as unreported until a report
        says whether the worker received it (Holding)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        lease = counted = self._lease(worker_id, lease_number)
        if call is not None:
            if call <= max(lease.calls, lease.settled):
                self._repeated += 1
                return 0
            lease.calls = call
        counted.waiting += 1
        try:
            while (free := self._free()) <= 0:
                lease.renewed_at = self._clock()  # a worker waiting here is alive
                wait = self._wait_s(deadline)
                if wait is not None and wait <= 0:
                    return 0
                # Timed, to wake and reap dead leases and to see a pause end even if nobody notifies.
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._event().wait(), wait)
                self._reap()
                lease = self._lease(worker_id, lease_number)  # raises if this lease was reclaimed
                if call is not None and call <= lease.settled:
                    return 0  # the worker gave this call up meanwhile
            n = min(max(1, want), self.max_grant, free)
            lease.granted += n
            if call is not None:
                lease.unreported[call] = n
            self._granted += n
            self._grants += 1
            self._slots_granted += n
            self._peak = max(self._peak, self._granted)
            self._check(granting=True)
            return n
        finally:
            # Only on the lease this call counted itself in: a reclaim and a new join meanwhile made another.
            if self._leases.get(worker_id) is counted:
                counted.waiting -= 1

    async def report(self, worker_id: str, holding: Holding, outcomes: Outcomes | None = None) -> Directive:
        """Take the worker's account of its lease (Holding): slots it no longer holds return to the pool.
        Learn from `outcomes` (real answers, even from a reclaimed lease; not twice from a repeated report);
        answer what the worker owes next. A report no newer than the last changes nothing; one from a
        reclaimed lease is told LeaseLost."""
        lease = self._leases.get(worker_id)
        repeated = lease is not None and lease.number == holding.lease and holding.report <= lease.reports
        if outcomes and not repeated:
            self._learn(worker_id, outcomes)
        self._reap()
        if worker_id in self._reaped:
            self._stale += 1
            raise LeaseLost(f"{worker_id}'s lease was reclaimed; join again")
        lease = self._lease(worker_id, holding.lease)
        if holding.report <= lease.reports:
            self._repeated += 1
            return self._directive(lease)
        lease.reports = holding.report
        lease.in_use = holding.in_use
        lease.settled = max(lease.settled, holding.settled)
        for call in [call for call in lease.unreported if call <= lease.settled]:
            del lease.unreported[call]  # received (and in `held`) or lost: either way no longer on the wire
        out = holding.held + sum(lease.unreported.values())
        if out > lease.granted:
            raise ValueError(f"{worker_id} says it holds {holding.held} slots, more than it was granted")
        freed = lease.granted - out
        lease.granted = out
        self._granted -= freed
        self._check()
        if freed:
            self._notify()
        return self._directive(lease)

    async def reclaim(self, worker_id: str) -> int:
        """The worker is dead (the driver saw its actor die or restart): take its slots back now.
        How many slots came back. (Its open reservations are booked as spent, lease or none.)"""
        if worker_id not in self._leases:
            if self.spending is not None:
                self.spending.orphan(worker_id)
            return 0
        n = self._leases[worker_id].granted
        self._drop(worker_id)
        self._reaped.add(worker_id)
        self._check()
        return n

    # -- the request and token rates ---------------------------------------------------------------------

    async def pace(self, worker_id: str, charges: list[float]) -> tuple[int, float]:
        """Book the first of these waiting attempts (their token charges) on the run's rates: how many
        were booked, and the seconds to wait before starting them (runner.distributed.pacing)."""
        return self.rates.book(charges, self._clock())

    # -- identical prompts in different blocks --------------------------------------------------------

    async def claim(self, block: str, keys: list[str]) -> list[str]:
        """Claim a block's request keys; those another block in progress owns (runner.distributed.claims)."""
        return self.claims.claim(block, keys)

    async def release_claims(self, block: str) -> None:
        """The block is done and its answers are journalled."""
        self.claims.release(block)

    # -- the budget ------------------------------------------------------------------------------------

    async def reserve(self, worker_id: str, reservation: Reservation, amount: float) -> bool:
        """Reserve a request's worst-case cost against run.max_cost under its id; False (nothing reserved)
        if it would not fit. Always True without a cap. A copy of the call changes nothing
        (runner.distributed.spending)."""
        self._renew(worker_id)
        return True if self.spending is None else self.spending.reserve(worker_id, reservation, amount)

    async def settle(self, worker_id: str, reservation: Reservation, actual: float) -> None:
        """An answer came back: release its reservation and book what it really cost, once.

        A reservation its worker's lost lease already booked as spent at its worst case (at least what
        it cost) stays as booked: a late settle, or one repeated, changes nothing."""
        self._renew(worker_id)
        if self.spending is not None:
            self.spending.settle(worker_id, reservation, actual)

    async def release(self, worker_id: str, reservations: list[Reservation]) -> None:
        """Reservations whose requests were never sent (their block stopped or was cancelled first): the
        budget gets them back, once; a late or repeated release changes nothing, and one that comes
        after the worker's lost lease booked them as spent leaves them so."""
        self._renew(worker_id)
        if self.spending is not None:
            self.spending.release(worker_id, reservations)

    # -- observation -----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """What the limiter did so far: grants, peak and current slots granted, the limit, the money."""
        elapsed = max(1e-9, self._clock() - self._started)
        return {
            "limit": self._limit(),
            "granted": self._granted,
            "peak_granted": self._peak,
            "grants": self._grants,
            "slots_granted": self._slots_granted,
            "grants_per_s": self._grants / elapsed,
            "paced": self.rates.booked,  # attempts started on the run's rates, in `pace_calls` bookings
            "pace_calls": self.rates.calls,
            "claimed": len(self.claims),
            "workers": len(self._leases),
            "waiting": sum(lease.waiting for lease in self._leases.values()),
            "in_use": sum(lease.in_use for lease in self._leases.values()),  # as last reported
            "reclaimed": self._reclaimed,
            "stale": self._stale,
            "repeated": self._repeated + (self.spending.repeated if self.spending else 0),
            "successes": self.controller.successes if self.controller else None,
            "overloads": self.controller.overloads if self.controller else None,
            "max_cost": self.spending.budget.limit if self.spending else None,
            "reserved": self.spending.budget.reserved if self.spending else 0.0,
            "spent": self.spending.budget.spent if self.spending else 0.0,
            "orphaned": self.spending.orphaned if self.spending else 0.0,
            "released": self.spending.released if self.spending else 0,
        }

    # -- internals -------------------------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        """What a blocked acquire waits on (made inside the actor's event loop, on first use)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        """Wake every blocked acquire to look again: slots came free, or a lease went."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _limit(self) -> int:
        return self.controller.limit if self.controller is not None else self._fixed or 1

    def _free(self) -> int:
        if self.controller is not None and self.controller.paused_until > self._clock():
            return 0
        return self._limit() - self._granted

    def _wait_s(self, deadline: float | None) -> float | None:
        """How long a blocked acquire sleeps before looking again (None: until notified)."""
        now = self._clock()
        waits = [self.lease_timeout_s / 4]  # dead leases are only noticed by looking
        if deadline is not None:
            waits.append(deadline - now)
        if self.controller is not None and self.controller.paused_until > now:
            waits.append(self.controller.paused_until - now)
        return min(waits)

    def _lease(self, worker_id: str, number: int | None = None) -> _Lease:
        """The worker's lease, renewed; a worker that never joined joins now. With a `number`, only that
        lease will do: a call from before the worker joined again must not touch the new one."""
        if worker_id in self._reaped:
            raise LeaseLost(f"{worker_id}'s lease was reclaimed; join again")
        lease = self._leases.get(worker_id)
        if number is not None and (lease is None or lease.number != number):
            raise LeaseLost(f"{worker_id}'s lease {number} is gone; join again")
        if lease is None:
            lease = self._leases[worker_id] = _Lease(renewed_at=self._clock(), number=next(self._numbers))
        lease.renewed_at = self._clock()
        return lease

    def _renew(self, worker_id: str) -> None:
        """A call from the worker: its lease, if it has one, is alive."""
        if (lease := self._leases.get(worker_id)) is not None:
            lease.renewed_at = self._clock()

    def _reap(self) -> None:
        """Reclaim the leases of workers silent past the timeout; book as spent the open reservations of
        silent workers that hold no lease (one that died before it ever joined)."""
        cutoff = self._clock() - self.lease_timeout_s
        dead = [w for w, lease in self._leases.items() if lease.renewed_at < cutoff and lease.waiting == 0]
        for worker_id in dead:
            self._drop(worker_id)
            self._reaped.add(worker_id)
        if self.spending is not None:
            for worker_id in self.spending.silent(cutoff) - self._leases.keys():
                self.spending.orphan(worker_id)
        if dead:
            self._check()

    def _drop(self, worker_id: str) -> None:
        lease = self._leases.pop(worker_id)
        self._notify()  # its slots are free, and its own blocked acquires must see it gone
        self._granted -= lease.granted
        self._reclaimed += lease.granted
        if self.spending is not None:
            # Its requests may have been sent and billed: keep their worst case as spent, so the cap holds.
            self.spending.orphan(worker_id)

    def _learn(self, worker_id: str, outcomes: Outcomes) -> None:
        self.rates.owe(outcomes.extra_tokens, self._clock())
        if self.controller is None:
            return
        for latency in outcomes.latencies_s:
            self.controller.on_success(latency)
        # Slots the other workers hold now: their attempts in flight plus small pools they return within
        # an idle moment. Reports arrive late, so this beats their last reported in-use counts; it errs
        # high, which only makes the cut gentler (and the next refusal finishes it).
        others = sum(lease.granted for w, lease in self._leases.items() if w != worker_id)
        for own in outcomes.refusals:
            # The refused attempt was one too many for the account: the limit becomes what was in flight
            # cluster-wide besides it, this worker's count then plus the others'.
            self.controller.on_overload("concurrency", in_flight=own + others)
        for retry_after in outcomes.overloads:
            self.controller.on_overload("platform", in_flight=self._granted, retry_after_s=retry_after)

    def _directive(self, lease: _Lease) -> Directive:
        limit = self._limit()
        owe = 0
        if self._granted > limit and self._granted:
            # The limit fell below what is out: each worker gives back its share of the excess.
            owe = math.ceil((self._granted - limit) * lease.granted / self._granted)
        if any(other.waiting for other in self._leases.values() if other is not lease) and self._free() <= 0:
            # Others wait and nothing is free: holders above an even share give the surplus back.
            claimants = sum(1 for other in self._leases.values() if other.granted or other.waiting)
            owe = max(owe, lease.granted - max(1, limit // max(1, claimants)))
        pause = 0.0
        if self.controller is not None:
            pause = max(0.0, self.controller.paused_until - self._clock())
        return Directive(owe=max(0, min(owe, lease.granted)), pause_s=pause, limit=limit)

    def _check(self, *, granting: bool = False) -> None:
        """The invariants; a breach is a bug in this class, so it fails loudly instead of overrunning."""
        total = sum(lease.granted for lease in self._leases.values())
        if total != self._granted or self._granted < 0:
            raise RuntimeError(f"limiter books {self._granted} slots granted but the leases hold {total}")
        if any(sum(lease.unreported.values()) > lease.granted for lease in self._leases.values()):
            raise RuntimeError("a lease holds fewer slots than its grants not reported on")
        if granting and self._granted > self._limit():
            raise RuntimeError(f"granted {self._granted} slots over the limit {self._limit()}")


def connect(
    name: str, *, namespace: str | None = None, detached: bool = False, **limits: Any
) -> ActorHandle[ClusterLimiter]:
    """The run's limiter actor, made with ClusterLimiter's keyword arguments `limits` if no actor of that
    name exists yet (else they are ignored). Driver-owned unless `detached`; it takes no CPU, so it never
    waits behind the workers, and it sits on the head node, whose loss ends every run anyway
    (docs/decisions.md, "Ray under faults")."""
    actor = ray.remote(ClusterLimiter).options(
        resources={HEAD_NODE: 0.001},
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        num_cpus=0,
        max_concurrency=10_000,  # blocked acquires each hold one of the actor's concurrent calls
    )
    return cast("ActorHandle[ClusterLimiter]", actor.remote(**limits))
