"""`glm-batch estimate` on a cascade job: the cascade's expected cost against the oracle alone.

The proxy pass is priced as any job (every row, `samples` times); the oracle's share of rows cannot
be known before the proxy has answered, so the cost is given as an interval: low, a proxy that always
agrees with the oracle (the oracle then answers only the method's calibration draws, found by
running the method on such a proxy); high, a proxy whose confidence is useless (the oracle answers
every row, and the proxy pass was paid for nothing). The expected figure uses the share of rows the
oracle answered in this job's last cascade run, else assumes half. Both are priced whole (as
`--fresh`): what the cascade costs against what the oracle alone would, answered before or not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from runner.cascade.stages import read_cascade_summary, stage_jobs
from runner.cascade.threshold import choose
from runner.job.resolve import Job
from runner.observe.progress import Reporter

ASSUMED_ORACLE_SHARE = 0.5


def perfect_proxy_share(rows: int, target: float, delta: float, seed: int) -> float:
    """The share of rows the oracle answers when the proxy always agrees with it (calibration only)."""
    step = choose([1.0] * rows, lambda _: True, target=target, delta=delta, seed=seed)
    return (rows - len(step.keep)) / rows if rows else 0.0


async def estimate_cascade(job: Job, *, api_key: str, options: Any, reporter: Reporter) -> dict[str, Any]:
    """The oracle-only estimate of the job, with a `cascade` section: proxy pass, cascade low /
    expected / high, and the share of rows the oracle answers behind each."""
    from runner.money.estimate import estimate_job

    cascade = job.spec.output.cascade
    assert cascade is not None
    proxy_job, oracle_job = stage_jobs(job)
    whole = replace(options, fresh=True, record=False)  # the whole job, answered before or not
    proxy = await estimate_job(proxy_job, api_key=api_key, options=whole, reporter=reporter)
    oracle = await estimate_job(oracle_job, api_key=api_key, options=whole, reporter=reporter)
    rows = int(oracle["rows"])
    low_share = perfect_proxy_share(rows, cascade.target, cascade.delta, cascade.seed)
    last = read_cascade_summary(job.output_path)
    if last and last.get("rows"):
        share = 1 - last["rows_kept_from_proxy"] / last["rows"]
        basis = "the share of rows the oracle answered in this job's last cascade run"
    else:
        share = ASSUMED_ORACLE_SHARE
        basis = "assumed: the oracle answers half the rows (measured once a cascade has run)"
    p, o = proxy["cost"], oracle["cost"]
    oracle_only = o["expected"]
    cost = {
        "low": round(p["low"] + low_share * o["low"], 6),
        "expected": round(p["expected"] + share * o["expected"], 6),
        "high": round(p["high"] + o["high"], 6),
    }
    oracle["cascade"] = {
        "proxy": proxy_job.spec.model.name,
        "oracle": oracle_job.spec.model.name,
        "guarantee": f"agrees with {oracle_job.spec.model.name} on >= {cascade.target:.0%} of rows "
        f"with probability >= {1 - cascade.delta:.0%}",
        "proxy_requests": proxy["requests_to_send"],
        "proxy_cost": p,
        "oracle_only_cost": o,
        "cost": cost,
        "share_of_oracle_only": {k: (round(v / oracle_only, 4) if oracle_only else None) for k, v in cost.items()},
        "oracle_share": {"low": round(low_share, 4), "expected": round(share, 4), "high": 1.0, "basis": basis},
    }
    return oracle
