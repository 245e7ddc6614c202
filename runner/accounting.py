"""Accounting: what a run did, counted as results arrive: rows, tokens, latency, retries.

The Tally is the single source for the progress display, the JSON logs and the summary file.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from runner.records import Result


def percentile(values: array[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Tally:
    """Running counts of one run."""

    rows_total: int = 0  # input rows, counted before the run
    rows_seen: int = 0  # input rows rendered so far
    rows_settled: int = 0  # rows whose request needed no sending (answered in an earlier run)
    requests_queued: int = 0  # distinct requests handed to the executor
    ok: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    started: float = field(default_factory=time.monotonic)

    def record(self, result: Result) -> None:
        """Count one result."""
        if result.status == "ok":
            self.ok += 1
            self.input_tokens += result.input_tokens or 0
            self.output_tokens += result.output_tokens or 0
            self.cache_read_input_tokens += result.cache_read_input_tokens or 0
            self.cache_creation_input_tokens += result.cache_creation_input_tokens or 0
            if result.latency_ms is not None:
                self.latencies_ms.append(result.latency_ms)
        else:
            self.failed += 1
            name = result.error_type or "unknown"
            self.errors[name] = self.errors.get(name, 0) + 1

    @property
    def answered(self) -> int:
        """Requests that got a result this run."""
        return self.ok + self.failed

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Results per second so far."""
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data, for logs and the summary."""
        return {
            "rows_total": self.rows_total,
            "rows_settled_before": self.rows_settled,
            "requests_queued": self.requests_queued,
            "answered_ok": self.ok,
            "answered_error": self.failed,
            "errors": dict(self.errors),
            "tokens": {
                "input": self.input_tokens,
                "output": self.output_tokens,
                "cache_read": self.cache_read_input_tokens,
                "cache_creation": self.cache_creation_input_tokens,
            },
            "elapsed_s": round(self.elapsed_s, 3),
            "requests_per_s": round(self.rate(), 2),
            "latency_ms": {
                "p50": percentile(self.latencies_ms, 50),
                "p90": percentile(self.latencies_ms, 90),
                "p99": percentile(self.latencies_ms, 99),
            },
        }
