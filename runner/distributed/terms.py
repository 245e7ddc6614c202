"""What the cluster's limiter and its workers say to each other: which lease a worker holds (Joined), what
it holds on it (Holding), how its attempts ended (Outcomes), what it should do next (Directive), that
its lease is gone (LeaseLost), and which of its budget reservations a reserve or settle is about
(Reservation).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LeaseLost(Exception):
    """The worker's lease was reclaimed (silent past the lease timeout, or reclaimed by the driver): the
    slots it still uses are no longer counted; it lets their attempts finish and joins again."""


@dataclass
class Outcomes:
    """How a worker's attempts ended since its last report, for the adaptive limit to learn from."""

    latencies_s: list[float] = field(default_factory=list)  # one per answered attempt
    refusals: list[int] = field(default_factory=list)  # 429/1302: the worker's own in-flight count then
    overloads: list[float | None] = field(default_factory=list)  # 1305/529: the endpoint's retry-after
    extra_tokens: float = 0.0  # tokens answers used beyond their charges (run.tokens_per_minute)

    def __len__(self) -> int:
        return len(self.latencies_s) + len(self.refusals) + len(self.overloads) + (self.extra_tokens > 0)


@dataclass(frozen=True)
class Joined:
    """The limiter's answer to a join: the lease's number, to quote on every later call (an older one is
    refused with LeaseLost, so nothing still on the wire is booked on the new lease), and its timeout."""

    lease: int
    timeout_s: float


@dataclass(frozen=True)
class Holding:
    """A worker's whole account of one lease, sent with every report: a statement, not a change, so a
    report repeated, late or never sent changes nothing the next one does not set right, and a grant that
    never reached the worker is taken back once a report says its call ended (docs/decisions.md,
    "Ray leases: a report states the holding")."""

    lease: int  # Joined.lease
    report: int  # this report's number on the lease, from 1: one no newer than the last changes nothing
    held: int  # slots the worker holds on the lease, in use or in its pool
    settled: int  # acquire calls 1..settled on the lease have ended at the worker: their grants are in `held`
    in_use: int = 0  # slots with an attempt on them


@dataclass(frozen=True)
class Directive:
    """The limiter's answer to a release or a heartbeat: what the worker should do next."""

    owe: int  # slots to hand back as soon as they come free: the limit fell, or other workers wait
    pause_s: float  # the platform said it is overloaded: start no attempt for this long
    limit: int  # the cluster's in-flight limit now


@dataclass(frozen=True)
class Reservation:
    """The id of one request's worst case reserved against run.max_cost: the worker instance that made it
    and its number there. A reserve or settle quoting it is applied once, however often it arrives."""

    instance: str  # unique to one sending actor's process (a restarted actor is a new instance)
    number: int  # from 1, one per reservation the instance asks for
