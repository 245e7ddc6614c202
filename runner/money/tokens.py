"""Counting input tokens before sending anything: a local estimator that counts CJK and Latin text apart
(about a token a CJK character, ~3.5 Latin characters a token), and a Calibration from what runs of the
job (or the model) measured."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

LATIN_CHARS_PER_TOKEN = 3.5
CJK_TOKENS_PER_CHAR = 1.0
MESSAGE_OVERHEAD_TOKENS = 4  # role markers and separators around each message


# More tokens than any one request can bill (a million-token context and its output, many times over):
# a count above it is garbage from the wire, not usage.
MAX_TOKEN_COUNT = 1 << 31


def token_count(value: object) -> int | None:
    """A token count as either wire gave it, or None when it is not one: a whole number (12.0 too) from
    0 to MAX_TOKEN_COUNT; never a bool, a string, NaN or 1e300."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def estimate_text(text: str) -> float:
    """Raw token estimate for one piece of text."""
    if text.isascii():  # most prompts: no wide character can be in them, and this check runs in C
        return len(text) / LATIN_CHARS_PER_TOKEN
    cjk = sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    return (len(text) - cjk) / LATIN_CHARS_PER_TOKEN + cjk * CJK_TOKENS_PER_CHAR


def estimate_answer(blocks: Iterable[Mapping[str, Any]]) -> int:
    """Output tokens estimated from an answer's blocks (text, thinking, tool input) when the wire gave no
    count: at least 1 (the answer was generated and billed)."""
    total = 0.0
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            total += estimate_text(str(block.get("text") or ""))
        elif kind == "thinking":
            total += estimate_text(str(block.get("thinking") or ""))
        elif kind == "tool_use":
            total += estimate_text(json.dumps(block.get("input"), ensure_ascii=False, default=str))
    return max(1, round(total))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def over_context(raw_estimate: int, context: int | None) -> bool:
    """Whether a request whose raw estimate (estimate_request) this is cannot fit the model's context
    window: the run fails it unsent (runner.plan) and the estimate leaves it out (runner.estimate), by
    this one rule, so the estimate says what the run will do."""
    return context is not None and raw_estimate > context


def estimate_request(params: dict[str, Any]) -> int:
    """Raw input-token estimate for one request's parameters."""
    return max(1, math.ceil(_estimate_parts(params, params.get("messages", []))))


def _estimate_parts(params: dict[str, Any], messages: list[dict[str, Any]]) -> float:
    total = 0.0
    if params.get("system"):
        total += estimate_text(_text(params["system"])) + MESSAGE_OVERHEAD_TOKENS
    for message in messages:
        total += estimate_text(_text(message.get("content"))) + MESSAGE_OVERHEAD_TOKENS
    return total


class LastTurnEstimate:
    """`estimate_request`, to the last bit, for requests that differ only in their last message's text:
    the parts before it are summed once."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.before = _estimate_parts(params, params["messages"][:-1])

    def __call__(self, text: str) -> int:
        return max(1, math.ceil(self.before + (estimate_text(text) + MESSAGE_OVERHEAD_TOKENS)))


@dataclass(frozen=True)
class Calibration:
    """actual input tokens = raw estimate x ratio, learned from `samples` answered requests."""

    ratio: float = 1.0
    samples: int = 0
    source: str = "uncalibrated defaults"

    @classmethod
    def measured(cls, rows: pl.DataFrame, answers: int, of: str) -> Calibration:
        """The ratio over `rows` (answers, or ledger rows) of the input tokens billed, cached ones
        included, to the tokens estimated for them; from `answers` answers of `of`."""
        columns = ("input_tokens", "cache_read_input_tokens", "est_input_tokens")
        billed, cached, estimated = (int(rows.get_column(c).sum()) for c in columns)
        return cls((billed + cached) / estimated, answers, f"measured on {answers} answers of {of}")

    def apply(self, raw: int) -> int:
        """The calibrated estimate for a raw one."""
        return max(1, round(raw * self.ratio))

    @property
    def safety(self) -> float:
        """How much to pad an estimate that must not be low (budget reservations)."""
        return 1.15 if self.samples >= 20 else 1.5
