"""An in-process executor that answers every request at once, for tests that need no server and for
measuring planning alone (bench/): the rest of the pipeline cannot tell it apart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from runner.control import Control
from runner.job.structured import AnswerShape
from runner.records import Answer, Request, RequestBlock
from runner.send.base import Conversation, Deliver, Gauges


def echo_answer(request: Request) -> Answer:
    """A small deterministic answer naming the request's key."""
    return Answer(
        text=f"answer {request.key[:8]}",
        thinking=None,
        stop_reason="end_turn",
        input_tokens=10,
        output_tokens=3,
        cache_read_input_tokens=0,
        cache_creation_input_tokens=0,
        request_id=f"fake-{request.key[:12]}",
        model=str(request.params.get("model")),
    )


class FakeExecutor:
    """Answers each request with `answer(request)` (repair turns included), without any I/O."""

    def __init__(
        self,
        answer: Callable[[Request], Answer] = echo_answer,
        shape: AnswerShape | None = None,
        yield_every: int = 256,
    ) -> None:
        self._answer = answer
        self._shape = shape
        self._yield_every = yield_every  # give the event loop (checkpoints, signals) a turn now and then
        self.sent = 0

    def gauges(self) -> Gauges:
        """Nothing is ever in flight."""
        return Gauges(in_flight=0, adaptive=False, overload_429_rate=0.0)

    async def aclose(self) -> None:
        """Nothing to release."""

    async def run_blocks(self, blocks: AsyncIterator[RequestBlock], deliver: Deliver, control: Control) -> None:
        """Answer every request of every block as it comes."""

        async def each() -> AsyncIterator[Request]:
            async for block in blocks:
                for request in block.requests():
                    yield request

        await self.run(each(), deliver, control)

    async def run(self, requests: AsyncIterator[Request], deliver: Deliver, control: Control) -> None:
        """Answer every request as it comes."""
        async for request in requests:
            if control.stopping.is_set():
                break
            conversation = Conversation(request, self._shape)
            params: dict[str, Any] | None = request.params
            turns = 0
            while params is not None:
                turns += 1
                params = conversation.add(self._answer(request))
            self.sent += turns
            deliver(conversation.result(attempts=turns, latency_ms=0.0))
            if self.sent % self._yield_every == 0:
                await asyncio.sleep(0)
