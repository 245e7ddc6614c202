"""What a simulator route needs of the Simulator that serves it (settings, counts, lock, answers): a
Protocol, so routes and simulator do not import one another. `Served`: what was answered and billed."""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from runner.simulator.answers import Ask, Reply
from runner.simulator.config import SimConfig

__all__ = ["APIS", "Host", "Served"]

APIS = ("online", "batch")


@dataclass
class Served:
    """What the simulator has answered and billed (Simulator.stats reads it)."""

    requests: int = 0
    ok: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # prompt hash -> successful answers
    attempts: Counter[str] = field(default_factory=Counter)  # prompt hash -> requests seen
    asked: Counter[str] = field(default_factory=Counter)  # prompt hash -> first turns answered (sampling)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # The bill: (api, prompt hash) -> generations completed, and tokens per api.
    billed: Counter[tuple[str, str]] = field(default_factory=Counter)
    billed_tokens: dict[str, Counter[str]] = field(default_factory=lambda: {api: Counter() for api in APIS})


class Host(Protocol):
    """The Simulator as its routes see it (runner.simulator.simulator.Simulator is the one there is)."""

    config: SimConfig
    served: Served
    lock: threading.RLock  # reentrant: a batch line is answered while its batch is advanced under it
    rng: random.Random

    def reply(self, ask: Ask) -> Reply: ...

    def bill(self, api: str, key: str, reply: Reply) -> None: ...

    def new_id(self, prefix: str) -> str: ...

    def count(self, outcome: str) -> None: ...

    def delay(self) -> float: ...

    async def generate(self, delay: float, api: str, key: str, reply: Reply) -> None: ...
