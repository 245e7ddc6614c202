"""Where a run sends: the job's endpoint URL, or a simulator started for this run only (imported only
then: a real run never loads it)."""

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
    # Every setting of the spec's `simulator:` section is the SimConfig field of its name.
    config = SimConfig(**sim.model_dump(exclude={"faults"}))
    if sim.faults is not None:
        config = dataclasses.replace(config, faults=tuple(sim.faults))
    with SimulatorThread(config) as server:
        yield server.url
