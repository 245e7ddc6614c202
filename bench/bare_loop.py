"""The baseline of bench/throughput.py's overhead rounds, in a process of its own that imports only the
SDK (as a user's script would): the same SDK calls with nothing around them, gather under a semaphore.

    python bench/bare_loop.py PORT ROWS CONCURRENCY    # prints {"wall_s", "answering_cpu_s", "cpu_s"}
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import anthropic


async def bare_loop(port: int, rows: int, concurrency: int) -> tuple[float, float]:
    """Its wall seconds, and its CPU seconds from the first answer to the last (as the runner's summary
    counts them)."""
    client = anthropic.AsyncAnthropic(
        api_key="bench",
        base_url=f"http://127.0.0.1:{port}",
        max_retries=0,
        timeout=60,
        http_client=anthropic.DefaultAioHttpClient(),
    )
    gate = asyncio.Semaphore(concurrency)
    first_answer: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            await client.messages.create(
                model="glm-4.6",
                max_tokens=64,
                system="Be brief.",
                messages=[{"role": "user", "content": f"Summarise: review {i}: the product was fine"}],
            )
        if not first_answer:
            first_answer.append(time.process_time())

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(rows)))
    elapsed = time.perf_counter() - started
    answering_cpu = time.process_time() - first_answer[0]
    await client.close()
    return elapsed, answering_cpu


def main() -> None:
    port, rows, concurrency = (int(arg) for arg in sys.argv[1:4])
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall, answering_cpu = asyncio.run(bare_loop(port, rows, concurrency))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(json.dumps({"wall_s": wall, "answering_cpu_s": answering_cpu, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
