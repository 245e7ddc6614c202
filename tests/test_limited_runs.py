"""A limited run (--limit N, input.limit, run_job(limit=N)) is a smoke run: it writes beside the job's
output (`<stem>.limit-N.parquet`) and never replaces it, so the answered rows of a job's output never
decrease whatever limits are run in between."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runner
from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows, write_csv


def answered(path: Path) -> set[str]:
    """The ids answered ok in an output file (none when it does not exist)."""
    if not path.exists():
        return set()
    frame = pl.read_parquet(path)
    return set(frame.filter(pl.col("status") == "ok").get_column("id").to_list())


def test_a_limited_run_after_a_full_one_leaves_the_full_output_alone(make_job) -> None:
    job: JobFiles = make_job(sample_rows(30))
    assert cli("run", str(job.spec)).exit_code == 0
    before = job.output.read_bytes()

    result = cli("run", str(job.spec), "--limit", "10")

    assert result.exit_code == 0, result.stderr
    limited = job.output.with_name("job.limit-10.parquet")
    assert "job.limit-10.parquet" in result.stdout and "never writes the job's output" in result.stdout
    assert job.output.read_bytes() == before
    assert pl.read_parquet(limited).height == 10
    assert len(answered(job.output)) == 30
    assert "30 rows answered ok, 0 failed, 0 pending" in cli("status", str(job.spec)).stdout


def test_the_python_api_limit_writes_apart_too(make_job) -> None:
    job: JobFiles = make_job(sample_rows(12))
    assert runner.run_job(str(job.spec)).ok

    result = runner.run_job(str(job.spec), limit=5)

    assert result.ok and result.output == job.output.with_name("job.limit-5.parquet")
    assert len(answered(job.output)) == 12


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(min_value=1, max_value=25),
    runs=st.lists(st.one_of(st.none(), st.integers(min_value=1, max_value=30)), min_size=1, max_size=4),
)
def test_the_answered_rows_of_a_jobs_output_never_decrease(rows: int, runs: list[int | None]) -> None:
    """Any sequence of full (None) and limited runs over any number of rows."""
    with tempfile.TemporaryDirectory() as tmp, SimulatorThread(SimConfig()) as sim:
        base = Path(tmp)
        write_csv(base / "data.csv", sample_rows(rows))
        spec = base / "job.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "name": "job",
                    "input": {"paths": ["data.csv"], "id_column": "id"},
                    "prompt": {"template": "Summarise: {{ text }}"},
                    "model": {"name": "glm-4.6", "endpoint": sim.url, "max_tokens": 16},
                    "output": {"path": "out/job.parquet"},
                }
            )
        )
        output = base / "out" / "job.parquet"
        seen: set[str] = set()
        for limit in runs:
            args = ["run", str(spec)] + (["--limit", str(limit)] if limit is not None else [])
            assert cli(*args).exit_code == 0
            now = answered(output)
            assert seen <= now
            seen = now
            if limit is not None:
                assert len(answered(output.with_name(f"job.limit-{limit}.parquet"))) == min(limit, rows)


def test_a_limited_run_with_its_state_lost_takes_answers_back_from_the_jobs_output(make_job, sim) -> None:
    """Never pay twice: the answers the job's output holds are taken back before a limited run sends."""
    import shutil

    from runner.job.resolve import load_job

    job: JobFiles = make_job(sample_rows(20))
    assert cli("run", str(job.spec)).exit_code == 0
    shutil.rmtree(load_job(job.spec).state_dir)
    sent = sim.stats()["requests"]

    result = cli("run", str(job.spec), "--limit", "5")

    assert result.exit_code == 0, result.stderr
    assert sim.stats()["requests"] == sent
    assert len(answered(job.output.with_name("job.limit-5.parquet"))) == 5
