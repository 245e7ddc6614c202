"""The Ray sender (`run.engine: ray`): a run's rows sent by actors on a Ray
cluster (runner.distributed.cluster) into the run object the local sender fills; the driver keeps the
store, settled keys and row map. A run with nothing to render never imports Ray."""

from __future__ import annotations

from typing import Any

from runner.distributed.blocks import Shape
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.observe.summary import Engine, Sending
from runner.plan import ALL_FAIL_ROWS, plan
from runner.run import Run
from runner.send.base import Gauges
from runner.supervise import Signals


class RaySender:
    """Sends a run from actors on a Ray cluster, under one cluster-wide limiter (and budget)."""

    def __init__(self, shape: Shape | None = None) -> None:
        self.shape = shape or Shape()

    async def send(self, run: Run, api_key: str, reporter: Reporter, signals: Signals) -> Sending:
        """Map the run's rows over the actors and take their blocks in; how it sent, for the summary."""
        run.accountant.budget = None  # the limiter keeps the budget, shared by every actor; this one prices
        limits: dict[str, Any] = {}
        actors = 0
        if not run.unchanged:
            next(plan(run.job, run.source, run.settled, batch_rows=ALL_FAIL_ROWS))  # a broken template fails here
            from runner.distributed.cluster import send_on_ray  # Ray's import alone takes seconds

            run.store.rows.reset()
            reporter.phase("starting Ray")
            try:
                limits, actors = await send_on_ray(run, api_key, reporter, signals, self.shape)
            finally:
                run.sent()
            if run.tally.rows_seen == run.tally.rows_total and run.control.reason is None:
                run.store.rows.seal(run.built_from)
                run.tally.all_rows_rendered = True
        gauges = Gauges(limit=limits.get("limit"), adaptive=run.job.adaptive)
        return summary.sending(run.job, gauges, engine=Engine("ray", actors, limits))
