"""The run's stop state, shared by the engine, the senders, the supervisor and the progress display."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.errors import EndpointAborted, GlmBatchError
from runner.records import Answers


@dataclass
class Control:
    """Shared stop state of a run: why dispatch stopped, and the endpoint's refusal if that was why."""

    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    aborted: EndpointAborted | None = None
    failed: GlmBatchError | None = None  # a local failure that stopped the run (a full disk)
    retries: dict[str, int] = field(default_factory=dict)  # error_type -> retries taken
    maybe_billed: list[int] = field(default_factory=list)  # input tokens of attempts that may be billed twice
    # Journals what was delivered so far (the engine's checkpoint); an executor calls it before it lets
    # go of the last copy of paid answers (the Batch API's result files).
    checkpoint: Callable[[], None] | None = None
    # Takes a block of plain answers as columns (the run's Run.deliver_answers): a batch harvest hands
    # them over in one call instead of a Result each. None: an executor delivers each as a Result.
    deliver_answers: Callable[[Answers], None] | None = None
    started: float = field(default_factory=time.monotonic)  # when the run began (a hybrid deadline counts from it)
    # Structured answers ask with tool_choice auto (validated and repaired) instead of forcing the tool:
    # the endpoint refused a forced tool choice in this run, or a fact learned earlier said it would.
    tool_choice_auto: bool = False
    notify: Callable[..., None] | None = None  # the run's reporter.event, for what happens once in a run

    def fall_back_to_auto_tool_choice(self, message: str) -> bool:
        """The endpoint refused a forced tool choice: ask with auto from now on. True the first time
        (the caller re-sends its request), said once in the log."""
        if self.tool_choice_auto:
            return False
        self.tool_choice_auto = True
        if self.notify is not None:
            self.notify(
                "tool_choice_fallback",
                message="the endpoint refused a forced tool choice; asking with tool_choice auto, "
                "validating and repairing each answer",
                endpoint_said=message,
            )
        return True

    def stop(self, reason: str) -> None:
        """Stop at once: queued requests are dropped unsent; requests in flight may finish."""
        if self.reason is None:
            self.reason = reason
        self.stopping.set()

    def end_dispatch(self, reason: str) -> None:
        """No more requests will be offered, for `reason`; the ones already queued still go out."""
        if self.reason is None:
            self.reason = reason

    def abort(self, error: EndpointAborted) -> None:
        """The endpoint refused the whole job (or the breaker saw it would): remember why and stop."""
        if self.aborted is None:
            self.aborted = error
        self.stop("aborted")

    def fail(self, error: GlmBatchError) -> None:
        """The run cannot go on for `error` (a full disk): stop at once and end with its exit code."""
        if self.failed is None:
            self.failed = error
        self.stop("failed")

    def count_retry(self, error_type: str) -> None:
        """One more retry of a request that failed with `error_type`."""
        self.retries[error_type] = self.retries.get(error_type, 0) + 1

    def note_maybe_billed(self, input_tokens: int) -> None:
        """An attempt was sent and then given up on (a timeout): the endpoint may bill it although we
        never got its answer. Its estimated input size prices the worst case."""
        self.maybe_billed.append(input_tokens)
