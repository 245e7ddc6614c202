"""Ray runs under faults. On a two-node cluster (a head and a worker node, both on this machine), losing
the worker node with every sending actor on it mid-run loses nothing and pays twice at most what was in
flight. Ctrl-C twice at a `glm-batch run` on Ray (a child process with its own local Ray) stops it at
once with its state consistent. Skipped where ray is not installed, except in CI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import ray
import ray.data
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runner.distributed.limiter import connect
from runner.job.inputs import ROW
from runner.job.resolve import load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, eventually, sample_rows
from tests.test_ray_engine import expected

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

ROWS = 2_000
LIMIT = 8  # the run's concurrency: the most requests in flight when the node dies
INTERRUPT_ROWS = 3_000
INTERRUPT_LIMIT = 4


@pytest.fixture(scope="module")
def head() -> Iterator[Cluster]:
    """A cluster of one head node with 2 CPUs, this process its driver. Its control service checks the
    nodes every half second from the start (Ray's defaults: every 3 s after 5 s), so a killed node is
    known dead within seconds of its death rather than after a quarter of a minute; a check still waits
    Ray's full timeout for its answer, so a merely loaded node is never taken for dead."""
    checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": checks})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def worker_nodes(head: Cluster) -> list[Any]:
    """The worker nodes the module's tests joined to the head, the newest last (the head's shutdown
    removes any still living)."""
    return []


@pytest.fixture
def worker_node(head: Cluster, worker_nodes: list[Any]) -> Any:
    """A living worker node with 2 CPUs joined to the head: the one an earlier test used, unless that
    test killed it (a node starts in seconds, and the tests that use one leave nothing on it)."""
    if not worker_nodes or worker_nodes[-1] not in head.worker_nodes:
        worker_nodes.append(head.add_node(num_cpus=2))
        head.wait_for_nodes()
    return worker_nodes[-1]


@pytest.fixture
def on_the_worker_node(worker_node: Any) -> Iterator[None]:
    """Ray Data places the run's tasks and actors on the worker node while it lives, anywhere after
    (a soft node affinity, as a cluster whose senders happen to sit on the node that fails)."""
    context = ray.data.DataContext.get_current()
    before = context.scheduling_strategy
    with warnings.catch_warnings():  # the setting is deprecated in Ray Data; it is the one that places actors
        warnings.simplefilter("ignore")
        context.scheduling_strategy = NodeAffinitySchedulingStrategy(worker_node.node_id, soft=True)
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context.scheduling_strategy = before


@ray.remote(num_cpus=0)
def limiter_made_here() -> str:
    """Make a run's limiter from this task (as a driver on this node would); the node it runs on."""
    limiter = connect("glm-batch/placement", concurrency=1)
    node: str = ray.get(limiter.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))
    ray.kill(limiter)
    return node


def test_the_limiter_lives_on_the_head_node_whoever_makes_it(head: Cluster, worker_node: Any) -> None:
    """Made from the worker node (where Ray would place it by default), the limiter still goes to the
    head: its leases, claims and budget must outlive any worker node."""
    here = NodeAffinitySchedulingStrategy(worker_node.node_id, soft=False)
    assert ray.get(limiter_made_here.options(scheduling_strategy=here).remote()) == head.head_node.node_id


def kill_the_node_midway(
    cluster: Cluster, node: Any, state_dir: Path, after_answers: int, killed: list[float], done: threading.Event
) -> None:
    """Kill the worker node (its raylet and every worker process on it, at once) as soon as the run's
    journals hold `after_answers` answers: every sending actor is on it, so sending is under way there."""
    eventually(lambda: done.is_set() or journalled(state_dir) >= after_answers, within_s=600, every_s=0.05)
    if not done.is_set():  # else the run ended first (and the test says it tested nothing)
        cluster.remove_node(node, allow_graceful=False)
        killed.append(time.monotonic())


@pytest.mark.slow  # (still part of the default suite, and CI's: it installs the ray extra)
def test_losing_the_worker_node_mid_run_loses_nothing_and_pays_twice_at_most_what_was_in_flight(
    head: Cluster, worker_node: Any, on_the_worker_node: None, make_job, sim: SimulatorThread, tmp_path: Path
) -> None:
    """2,000 rows sent from actors on the worker node, which dies mid-run. Ray restarts the actors on the
    head node and retries their blocks, which send only what no actor journalled (the journals are in the
    job's state directory, which every node shares); the limiter lives on the driver's node and takes
    the dead actors' slots back. The run ends with every row answered, in input order, with its own
    prompt's answer; no prompt was billed twice beyond the LIMIT in flight at the death; a re-run sends
    nothing."""
    sim.configure(concurrency_cap=LIMIT, latency_s=0.02)
    rows = sample_rows(ROWS)
    job = make_job(rows, run={"engine": "ray", "concurrency": LIMIT, "checkpoint_rows": 100_000})
    killed: list[float] = []
    done = threading.Event()
    state_dir = tmp_path / "out" / ".glm-batch" / "job"
    killer = threading.Thread(target=kill_the_node_midway, args=(head, worker_node, state_dir, 200, killed, done))
    killer.start()
    try:
        result = cli("run", str(job.spec))
    finally:
        done.set()
        killer.join()

    assert killed, "the node was not killed: the test did not test anything"
    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert out.get_column("id").to_list() == [r["id"] for r in rows]
    assert out.get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["prompts_billed_twice"] <= LIMIT
    assert stats["billed"]["online"] <= ROWS + LIMIT
    summary = json.loads(job.summary.read_text())
    assert summary["answered_ok"] == ROWS
    assert summary["engine"]["limiter"]["reclaimed"] > 0  # slots held by actors that died with the node

    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 0
    assert sim.stats()["billed"]["online"] == 0


class Child:
    """`glm-batch run` in a child process, its stderr lines collected as they come."""

    def __init__(self, spec: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, what: str, condition: Callable[[], bool] | None = None, timeout_s: float = 120.0) -> None:
        """Poll until a stderr line holds `what` (and `condition()`, when given, is true)."""

        def seen() -> bool:
            if any(what in line for line in self.lines) and (condition is None or condition()):
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what!r}: {self.text()}")
            return False

        eventually(seen, within_s=timeout_s, every_s=0.05, context=lambda: f"no {what!r}: {self.text()}")

    def end(self, timeout_s: float = 90.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join()
        return code

    def text(self) -> str:
        return "".join(self.lines)[-12000:]


def journalled(state_dir: Path) -> int:
    """Answers in the run's actors' journals now."""
    return sum(len(j.read_bytes().splitlines()) for j in state_dir.glob("journal-*-*-*.jsonl"))


@pytest.mark.slow  # (still part of the default suite, and CI's: it installs the ray extra)
def test_a_second_ctrl_c_stops_a_ray_run_at_once_with_its_state_consistent(
    head: Cluster, make_job, sim: SimulatorThread, tmp_path: Path
) -> None:
    """The first Ctrl-C stops dispatch and grants a grace period; the second stops now. The driver takes
    no block in after that (an intake thread still adding blocks to the row map while the run wrote its
    output and closed its state left a map with holes or lines past the end): the map left behind is
    unsealed and holds the input's first rows, each once and in order; the run exits 130 without a
    traceback; a resume (on the local engine, which reads the same state) answers every row, paying
    twice at most what was in flight. Another Ray runs on this machine meanwhile (the test's cluster):
    with no address given, the run starts its own rather than joining it."""
    sim.configure(concurrency_cap=INTERRUPT_LIMIT, latency_s=0.05)  # blocks of 500 rows take seconds each
    rows = sample_rows(INTERRUPT_ROWS)
    job = make_job(
        rows, run={"engine": "ray", "concurrency": INTERRUPT_LIMIT, "grace_s": 60, "checkpoint_rows": 100_000}
    )
    state_dir = load_job(job.spec).state_dir

    child = Child(job.spec)
    child.wait_for('"event": "start"', lambda: journalled(state_dir) >= 20)  # sending is under way
    child.proc.send_signal(signal.SIGINT)
    child.wait_for('"event": "interrupted"')
    child.proc.send_signal(signal.SIGINT)
    code = child.end()

    assert code == 130, child.text()
    assert "Traceback" not in child.text()
    rows_dir = state_dir / "rows"
    assert not (rows_dir / "fingerprint.json").exists()  # unsealed: the next run does not trust it
    files = sorted(rows_dir.glob("rows-*.parquet"))
    positions = pl.read_parquet(files).get_column(ROW).to_list() if files else []
    assert positions == list(range(len(positions)))  # the input's first rows, each once, in order
    assert len(positions) < INTERRUPT_ROWS
    summary = json.loads(job.summary.read_text())
    assert summary["stopped"] == "SIGINT"

    sim.configure(latency_s=0.0)
    assert cli("run", str(job.spec), "--set", "run.engine=local").exit_code == 0  # (no second Ray start-up)
    out = pl.read_parquet(job.output)
    assert out.get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["prompts_billed_twice"] <= INTERRUPT_LIMIT
    assert stats["billed"]["online"] <= INTERRUPT_ROWS + INTERRUPT_LIMIT
