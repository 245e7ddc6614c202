"""`glm-batch estimate` on a cascade job: what its next run sends and costs, and the whole cascade's
cost against the oracle alone (how each is worked out: docs/decisions.md, "Cascade").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import polars as pl

from runner.cascade.derive import derive
from runner.cascade.record import read_cascade
from runner.cascade.stages import (
    _answered_before,
    fresh_refused,
    kept_estimates,
    proxy_view,
    score_column,
    stage_jobs,
)
from runner.cascade.threshold import choose
from runner.job.inputs import open_input
from runner.job.resolve import Job
from runner.money.kept_estimate import made_for
from runner.observe.progress import Reporter

ASSUMED_ORACLE_SHARE = 0.5
BASES = ("low", "expected", "high")


def perfect_proxy_share(rows: int, target: float, delta: float, seed: int) -> float:
    """The share of rows the oracle answers when the proxy always agrees with it (calibration only)."""
    step = choose([1.0] * rows, lambda _: True, target=target, delta=delta, seed=seed)
    return (rows - len(step.keep)) / rows if rows else 0.0


async def estimate_cascade(job: Job, *, api_key: str, options: Any, reporter: Reporter) -> dict[str, Any]:
    """The report of a cascade job: its next run (rows, requests to send, cost) and a `cascade`
    section with that run per stage, the whole cascade against the oracle alone, and the oracle's share."""
    from runner.estimate import estimate_job

    cascade = job.spec.output.cascade
    assert cascade is not None
    proxy_job, oracle_job = stage_jobs(job)
    if options.fresh and not options.record:  # `run --dry-run --fresh`: say what the run would say
        raise fresh_refused(job)
    whole = replace(options, fresh=True, record=False)  # the whole job, answered before or not
    proxy = await estimate_job(proxy_job, api_key=api_key, options=whole, reporter=reporter)
    oracle = await estimate_job(oracle_job, api_key=api_key, options=whole, reporter=reporter)
    if options.fresh:
        proxy_left, oracle_left = proxy, oracle
    else:  # what the stages hold: read only, as `run --dry-run` does
        left = replace(options, record=False, pilot_rows=None)
        proxy_left = await estimate_job(proxy_job, api_key=api_key, options=left, reporter=reporter)
        oracle_left = await estimate_job(oracle_job, api_key=api_key, options=left, reporter=reporter)
    rows = int(oracle["rows"])
    last = read_cascade(job.output_path)
    if last and last.rows:
        share = 1 - last.rows_kept_from_proxy / last.rows
        basis = "the share of rows the oracle answered in this job's last cascade run"
    else:
        share = ASSUMED_ORACLE_SHARE
        basis = "assumed: the oracle answers half the rows (measured once a cascade has run)"
    shares = {
        "low": perfect_proxy_share(rows, cascade.target, cascade.delta, cascade.seed),
        "expected": share,
        "high": 1.0,
    }
    p, o = proxy["cost"], oracle["cost"]
    cost = {k: round(p[k] + shares[k] * o[k], 6) for k in BASES}
    known = None if options.fresh else _oracle_rows_left(job, proxy_job, oracle_job, proxy_left, options)
    run = _next_run(proxy_left, oracle, oracle_left, shares, known)
    report = {
        "job": job.name,
        "model": oracle_job.spec.model.name,
        "endpoint": job.endpoint_name,
        "currency": job.currency,
        "prices_confirmed": bool(proxy["prices_confirmed"] and oracle["prices_confirmed"]),
        "fresh": options.fresh,
        "rows": rows,
        "rows_answered_already": run.pop("rows_answered_already"),
        "requests_to_send": run["proxy_requests"] + run["oracle_requests"]["expected"],
        "cost": run["cost"],
        "render_failures": oracle["render_failures"],
        "over_context": oracle["over_context"],
        "cascade": {
            "proxy": proxy_job.spec.model.name,
            "oracle": oracle_job.spec.model.name,
            "guarantee": f"agrees with {oracle_job.spec.model.name} on >= {cascade.target:.0%} of rows "
            f"with probability >= {1 - cascade.delta:.0%}",
            "next_run": run,
            "proxy_requests": proxy["requests_to_send"],  # the whole proxy pass
            "proxy_cost": p,
            "oracle_only_cost": o,
            "cost": cost,  # the whole cascade
            # Each figure against the oracle alone on the same basis (low with low, high with high).
            "share_of_oracle_only": {k: (round(cost[k] / o[k], 4) if o[k] else None) for k in BASES},
            "oracle_share": {k: round(v, 4) for k, v in shares.items()} | {"basis": basis},
        },
    }
    if options.record:  # kept beside the state as a plain job's is (`run --dry-run` only reads)
        kept_estimates(job).write_estimate({**report, "made_for": made_for(job)})
    return report


def _next_run(
    proxy_left: dict[str, Any],
    oracle: dict[str, Any],
    oracle_left: dict[str, Any],
    shares: dict[str, float],
    known: int | None,
) -> dict[str, Any]:
    """What the next run sends and costs: the proxy's unanswered requests and the oracle's rows still to
    ask (`known`, else each share less those answered), at the mean of its unanswered requests."""
    unanswered = int(oracle_left["requests_to_send"])
    if known is not None:
        asks = dict.fromkeys(BASES, known)
        how = "exact: the proxy pass is done and the calibration drew every row it needs"
    else:
        answered = int(oracle["requests_to_send"]) - unanswered
        total = int(oracle["requests_to_send"])
        asks = {k: min(unanswered, max(0, round(shares[k] * total) - answered)) for k in BASES}
        how = "the oracle's share of rows (below), less the rows it has answered"

    def oracle_cost(k: str) -> float:
        return oracle_left["cost"][k] * asks[k] / unanswered if unanswered else 0.0

    pc = proxy_left["cost"]
    cost = {k: round(pc[k] + oracle_cost(k), 6) for k in BASES}
    cost["ceiling"] = round(pc["ceiling"] + (oracle_left["cost"]["ceiling"] if asks["high"] else 0.0), 6)
    rows = int(oracle["rows"])
    return {
        "proxy_requests": int(proxy_left["requests_to_send"]),
        "oracle_requests": asks,
        "cost": cost,
        "basis": how,
        "rows_answered_already": rows - known if known is not None else int(oracle_left["rows_answered_already"]),
    }


def _oracle_rows_left(
    job: Job, proxy_job: Job, oracle_job: Job, proxy_left: dict[str, Any], options: Any
) -> int | None:
    """How many rows the next run asks the oracle about when the state decides it (the proxy pass done,
    the replayed method drawing no more): those asked or escalated the oracle's state lacks; else None."""
    from runner.estimate import _read_state
    from runner.job.prompts import RequestBuilder
    from runner.job.sandbox import RenderError

    cascade = job.spec.output.cascade
    assert cascade is not None
    if proxy_left["requests_to_send"]:
        return None
    try:
        proxy = pl.read_parquet(proxy_job.output_path)
    except (OSError, pl.exceptions.PolarsError):
        return None
    source = open_input(job)
    rows = source.frame.collect()
    id_col = job.spec.input.id_column or "id"
    ids = proxy.get_column(id_col).cast(pl.String).to_list()
    if ids != source.ids(rows).to_list():
        return None  # the input changed since the proxy pass: only running can tell
    fields = list(job.shape.fields) if job.shape else []
    answers, scores = proxy_view(proxy, fields, score_column(job))
    home = job.state_dir / "cascade"
    oracle_by_id: dict[str, tuple[Any, ...] | None] = {}
    asked = set(_answered_before(home, oracle_job, rows, ids, id_col, fields, oracle_by_id))

    def agrees(pos: int) -> bool | None:
        if ids[pos] not in oracle_by_id:
            return None
        answer = oracle_by_id[ids[pos]]
        return answer is not None and answer == answers[pos]

    step = choose(scores, agrees, target=cascade.target, delta=cascade.delta, seed=cascade.seed)
    if step.need:
        return None  # more calibration draws: their answers decide what follows
    _, settled = _read_state(oracle_job, replace(options, fresh=False))
    held = set(settled.series().to_list())
    builder = RequestBuilder(derive(oracle_job, {"input.limit": None, "input.columns": None}))
    left = 0
    for pos in asked | (set(range(len(scores))) - step.keep):
        try:
            key = builder.build(rows.row(pos, named=True)).key
        except RenderError:
            continue  # a row that does not render sends nothing
        left += key not in held
    return left
