"""Benchmark: what the cluster limiter costs. Worst of 5 rounds, each against a baseline in the same run.

    python bench/ray_limiter.py [--rounds 5] [--seconds 2] [--requests 4000]

1. Leases per second the ClusterLimiter actor sustains: `clients` coroutines in the driver each loop
   acquire(1) / report on the actor (a remote process) for `seconds`; every grant is a round trip, so
   this is the rate the actor itself can serve, not what LeasedSlots asks of it.
2. Overhead per request of LeasedSlots against a local asyncio.Semaphore of the same size: `requests`
   requests of zero latency (the worst case: nothing hides the bookkeeping), 2 x limit tasks at a time.
   Reports the extra microseconds per request and how many lease calls each request cost.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import ray

from runner.distributed.limiter import connect
from runner.distributed.slots import LeasedSlots
from runner.distributed.terms import Holding

LIMIT = 8


async def lease_rate(limiter: Any, clients: int, seconds: float) -> float:
    """Grants per second when every grant is its own acquire/release round trip."""
    deadline = time.perf_counter() + seconds
    grants = 0

    async def client(worker: str) -> None:
        nonlocal grants
        lease, call = (await limiter.join.remote(worker)).lease, 0
        while time.perf_counter() < deadline:
            call += 1  # each acquire and its report numbered on the lease; the slot is handed back at once
            await limiter.acquire.remote(worker, 1, 1.0, lease, call)
            await limiter.report.remote(worker, Holding(lease, call, held=0, settled=call))
            grants += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(f"c{i}") for i in range(clients)))
    return grants / (time.perf_counter() - started)


async def run_requests(slot: Any, requests: int, tasks: int) -> float:
    """Seconds to push `requests` zero-latency requests through `slot()`, `tasks` at a time."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with slot():
                await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - started


async def overhead(limiter: Any, requests: int) -> dict[str, float]:
    """Per-request seconds under a Semaphore and under LeasedSlots, measured back to back."""
    semaphore = asyncio.Semaphore(LIMIT)
    local = await run_requests(lambda: semaphore, requests, 2 * LIMIT)
    slots = LeasedSlots(limiter, f"bench-{uuid.uuid4().hex[:6]}")
    leased = await run_requests(lambda: slots.slot(0), requests, 2 * LIMIT)
    await slots.aclose()
    return {
        "semaphore_us": local / requests * 1e6,
        "leased_us": leased / requests * 1e6,
        "overhead_us": (leased - local) / requests * 1e6,
        "leases_per_request": slots.leases / requests,
        "reports_per_request": slots.reports / requests,
    }


async def main(rounds: int, seconds: float, requests: int, clients: int) -> None:
    limiter = connect(f"bench-{uuid.uuid4().hex[:8]}", concurrency=LIMIT)
    await limiter.stats.remote()  # the actor is up before anything is timed
    rates: list[float] = []
    costs: list[dict[str, float]] = []
    for i in range(rounds):
        rates.append(await lease_rate(limiter, clients, seconds))
        costs.append(await overhead(limiter, requests))
        print(f"round {i + 1}: {rates[-1]:,.0f} leases/s; " + ", ".join(f"{k} {v:.3g}" for k, v in costs[-1].items()))
    worst = max(costs, key=lambda c: c["overhead_us"])
    stats = await limiter.stats.remote()
    print(f"worst of {rounds}: {min(rates):,.0f} leases/s sustained by the actor ({clients} clients, 1 slot each)")
    print(
        f"worst of {rounds}: {worst['leased_us']:.1f} us a request on LeasedSlots vs {worst['semaphore_us']:.1f} us "
        f"on asyncio.Semaphore: +{worst['overhead_us']:.1f} us; "
        f"{worst['leases_per_request']:.4f} leases and {worst['reports_per_request']:.4f} reports a request"
    )
    print(f"actor: peak granted {stats['peak_granted']} of limit {stats['limit']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        asyncio.run(main(args.rounds, args.seconds, args.requests, args.clients))
    finally:
        ray.shutdown()
