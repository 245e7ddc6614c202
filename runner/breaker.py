"""The breaker for systematic failures: a run whose first answers all fail alike stops, rows kept
pending (docs/decisions.md, "The real wire")."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from runner.errors import EndpointAborted
from runner.records import Result
from runner.send.retries import TOOL_CHOICE_REFUSED

MIN_ANSWERS = 5
MAX_ANSWERS = 20
SHARE = 0.05

# Business codes (or Anthropic error types) that say the request's shape is wrong, not one row's content.
_REQUEST_SHAPED = re.compile(r"^4\d\d/(1210|1213|1214|1215|invalid_request_error)$|^400$")
_ADVICE = {
    "1210": "a parameter the endpoint refuses (an image on a text model, a value out of range)",
    "1213": "a required field is missing",
    "1214": "a field the endpoint refuses: check model.stop_sequences (Zhipu's native API takes one), "
    "model.temperature / top_p, model.thinking and output.mode",
    "1215": "two fields that exclude each other (e.g. temperature and top_p together)",
    TOOL_CHOICE_REFUSED: "the endpoint refuses a forced tool choice; set output.mode: text",
}


def request_shaped(result: Result) -> bool:
    """Whether a result is a permanent failure that says the request's shape, not its row, is wrong."""
    if result.status != "error" or result.retryable or result.attempts == 0 or not result.error_type:
        return False
    return result.error_type == TOOL_CHOICE_REFUSED or bool(_REQUEST_SHAPED.match(result.error_type))


class Breaker:
    """Watches a run's first answers; trips when `threshold` of them all failed with one request-shaped error."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._held: list[Result] = []
        self.watching = True  # results still go through `admit`: deciding, or tripped (else they pass)
        self.tripped = False

    @classmethod
    def for_run(cls, rows_total: int) -> Breaker:
        """The breaker for a run of `rows_total` rows: 5% of them, between MIN_ANSWERS and MAX_ANSWERS."""
        return cls(max(MIN_ANSWERS, min(MAX_ANSWERS, math.ceil(SHARE * rows_total))))

    def admit(self, result: Result) -> Iterator[Result]:
        """The results to journal now, given one more: none while deciding or after tripping on its error."""
        if result.attempts == 0:  # never sent: not an answer
            yield result
            return
        if self.tripped:
            if not (request_shaped(result) and result.error_type == self._held[0].error_type):
                yield result
            return
        if not self.watching:
            yield result
            return
        if request_shaped(result) and (not self._held or result.error_type == self._held[0].error_type):
            self._held.append(result)
            self.tripped = len(self._held) >= self.threshold
            return
        self.watching = False  # another outcome: the failures so far were the rows', not the spec's
        yield from self.release()
        yield result

    def release(self) -> Iterator[Result]:
        """Hand back the failures held while deciding (a disarmed breaker, or a run that ended first)."""
        if self.tripped:
            return
        held, self._held = self._held, []
        yield from held

    def error(self) -> EndpointAborted:
        """Why the run stopped, in the endpoint's words, with what to change."""
        first = self._held[0]
        code = (first.error_type or "").rsplit("/", 1)[-1]
        advice = _ADVICE.get(first.error_type or "", _ADVICE.get(code, "the request as the spec builds it"))
        return EndpointAborted(
            f"the first {len(self._held)} answers all failed with {first.error_type}: {first.error_message}; "
            f"every row is sent the same way, so the run stopped; change {advice}. Those rows stay pending"
        )
