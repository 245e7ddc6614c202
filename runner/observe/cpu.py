"""What answering costs this process in CPU time: from the first answer to the end of sending."""

from __future__ import annotations

import time

from runner.observe.summary import CpuWhileAnswering


class CpuWindow:
    """This process's CPU time from the first answer to the end of sending: what answering costs the
    runner (benches compare it with a bare SDK loop's); `process_time` is read twice a run."""

    __slots__ = ("first", "seconds")

    def __init__(self) -> None:
        self.first: float | None = None
        self.seconds: float | None = None

    def begin(self) -> None:
        """An answer came: the window begins at the first."""
        if self.first is None:
            self.first = time.process_time()

    def close(self) -> None:
        if self.first is not None:
            self.seconds = time.process_time() - self.first

    def summary(self, answered: int) -> CpuWhileAnswering | None:
        """For the summary: CPU seconds and ms per answer after the first (None without two answers)."""
        if self.seconds is None or answered < 2:
            return None
        per_answer = 1000 * self.seconds / (answered - 1)
        return CpuWhileAnswering(round(self.seconds, 4), round(per_answer, 4))
