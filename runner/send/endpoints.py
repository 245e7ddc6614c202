"""Where a run sends: the job's endpoint URL, or a simulator started for this run only.

The simulator (runner.simulator) is imported only when a job names `endpoint: simulator`: a real run
never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from runner.job.resolve import Job


@contextlib.contextmanager
def endpoint_url(job: Job) -> Iterator[str]:
    """The base URL to send to; for `endpoint: simulator`, a simulator running for this run only."""
    if job.base_url is not None:
        yield job.base_url
        return
    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import SimulatorThread

    sim = job.spec.simulator
    config = SimConfig(
        latency_s=sim.latency_s,
        latency_jitter_s=sim.latency_jitter_s,
        concurrency_cap=sim.concurrency_cap,
        fault_rate=sim.fault_rate,
        invalid_rate=sim.invalid_rate,
        sample_disagreement=sim.sample_disagreement,
        model_error=dict(sim.model_error),
        confidence=sim.confidence,
        seed=sim.seed,
        slow_s=sim.slow_s,
        batch_validating_s=sim.batch_validating_s,
        batch_lines_per_s=sim.batch_lines_per_s,
        batch_finalizing_s=sim.batch_finalizing_s,
        batch_expire_after_s=sim.batch_expire_after_s,
        batch_error_rate=sim.batch_error_rate,
        batch_output_404_s=sim.batch_output_404_s,
        batch_queue_cap=sim.batch_queue_cap,
        batch_refuse_ineligible=sim.batch_refuse_ineligible,
        batch_max_lines=sim.batch_max_lines,
    )
    if sim.faults is not None:
        config = dataclasses.replace(config, faults=tuple(sim.faults))
    with SimulatorThread(config) as server:
        yield server.url
