"""A cascade job run as ordinary, resumable runs of the engine: the proxy pass, the oracle's calibration
rounds, the escalation; then joined (docs/decisions.md, "Cascade: the stages")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from runner.cascade.derive import derive
from runner.cascade.record import (
    Accuracy,
    AtThreshold,
    Cascade,
    CascadeCost,
    CascadeResult,
    CascadeSummary,
    Spent,
)
from runner.cascade.threshold import Step, choose
from runner.errors import UsageError
from runner.files import write_atomic, write_summary
from runner.job.inputs import open_input
from runner.job.resolve import Job
from runner.money.kept_estimate import compare_whole
from runner.observe.progress import Reporter
from runner.run import check_places
from runner.runs import RunOptions, RunResult
from runner.state.store import Store

ANSWERED_BY, CONFIDENCE, IN_CALIBRATION = "answered_by", "proxy_confidence", "in_calibration"
STATED = "confidence"  # with `confidence: stated`, the field of the proxy's answer that states it
_PROXY_ONLY = ("agreement", "sample_answers")


def score_column(job: Job) -> str:
    """The proxy output's column that holds its confidence: its samples' agreement, or the one it states."""
    cascade = job.spec.output.cascade
    return STATED if cascade is not None and cascade.confidence == "stated" else "agreement"


def stated_schema(job: Job) -> dict[str, Any]:
    """The proxy's schema with `confidence: stated`: the job's answer plus a confidence field."""
    shape = job.shape
    assert shape is not None
    properties = shape.schema.get("properties", {})
    if STATED in properties or shape.label_field == "labels":
        what = "a field named confidence" if STATED in properties else "multi: true"
        raise UsageError(
            f"{job.spec_path}: output.cascade.confidence: stated adds a `confidence` field to the proxy's answer, "
            f"which cannot go with {what}; use confidence: samples"
        )
    stated = {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "How sure you are that this answer is right: 0 a guess, 1 certain.",
    }
    return shape.schema | {
        "properties": properties | {STATED: stated},
        "required": [*shape.schema.get("required", []), STATED],
    }


def stage_jobs(job: Job) -> tuple[Job, Job]:
    """The proxy job and the oracle job of a cascade job (the oracle's input is set per round)."""
    cascade = job.spec.output.cascade
    assert cascade is not None
    home = job.state_dir / "cascade"
    common: dict[str, Any] = {"output.cascade": None, "output.keep_columns": list(job.keep_columns)}
    if cascade.confidence == "stated":  # asked once, for its answer and how sure it is
        how: dict[str, Any] = {"output.labels": None, "output.multi": None, "output.schema": stated_schema(job)}
    else:  # asked `samples` times at `temperature`
        how = {"model.temperature": cascade.temperature, "output.samples": cascade.samples}

    def stage(name: str, changes: dict[str, Any]) -> Job:
        places = {"output.path": str(home / f"{name}.parquet"), "output.state_dir": str(home / name)}
        return derive(job, common | changes | places)

    proxy = stage("proxy", how | {"model.name": cascade.proxy, "model.prices": None})
    return proxy, stage("oracle", {"model.name": cascade.oracle or job.spec.model.name})


def kept_estimates(job: Job) -> Store:
    """Where a cascade job's estimate is kept: its own state folder (never opened: only its estimate file
    is read or written)."""
    return Store(job.state_dir, run_id="estimate", rows=job.row_map)


def fresh_refused(job: Job) -> UsageError:
    """Why a cascade run takes no --fresh: --fresh on each round would pay again for every earlier one."""
    return UsageError(
        f"{job.spec_path}: a cascade does not take --fresh yet; to start it over, move "
        f"{job.state_dir / 'cascade'} aside (its answers stay there) and run again"
    )


async def run_cascade(job: Job, *, api_key: str, options: RunOptions, reporter: Reporter) -> RunResult:
    """Run every stage of a cascade job and write its output."""
    from runner.engine import execute
    from runner.senders import sender_for

    check_places(job)
    cascade = job.spec.output.cascade
    assert cascade is not None
    proxy_job, oracle_base = stage_jobs(job)
    home = job.state_dir / "cascade"
    if options.fresh:
        raise fresh_refused(job)
    home.mkdir(parents=True, exist_ok=True)
    rows = open_input(job).frame.collect()
    # The input's own names (a gold `label` is carried as `label_gold`): the oracle reads these rows as its input.
    rows = rows.rename({name: c for c, name in job.gold_columns.items() if name != c and name in rows.columns})
    id_col = job.spec.input.id_column or "id"
    spent: dict[str, float] = {"proxy": 0.0, "oracle": 0.0}

    def capped(stage_job: Job) -> Job:
        cap = job.spec.run.max_cost
        if cap is None:
            return stage_job
        left = cap - sum(spent.values())
        return derive(stage_job, {"run.max_cost": max(left, 1e-9)})

    async def run_stage(stage_job: Job, who: str, what: str) -> RunResult | None:
        reporter.phase(f"cascade: {what}")
        stage_job = capped(stage_job)
        sender = sender_for(stage_job, options)
        report = await execute(stage_job, api_key=api_key, options=options, reporter=reporter, sender=sender)
        spent[who] += report.summary.cost.spent or 0.0
        if report.exit_code in (0, 1) and report.summary.output:
            return None
        return RunResult(report.exit_code, f"cascade {what}: {report.message}", report.summary)

    stopped = await run_stage(proxy_job, "proxy", "proxy pass")
    if stopped is not None:
        return stopped
    fields = list(job.shape.fields) if job.shape else []
    proxy = pl.read_parquet(proxy_job.output_path)
    proxy_answers, scores = proxy_view(proxy, fields, score_column(job))
    ids = proxy.get_column(id_col).cast(pl.String).to_list()
    oracle_by_id: dict[str, tuple[Any, ...] | None] = {}
    asked: set[int] = set()
    answered: dict[str, Path] = {}  # the oracle's output, as the last round wrote it

    def agrees(pos: int) -> bool | None:
        if ids[pos] not in oracle_by_id:
            return None
        answer = oracle_by_id[ids[pos]]
        return answer is not None and answer == proxy_answers[pos]

    async def ask_oracle(positions: set[int], what: str) -> RunResult | None:
        asked.update(positions)
        chosen = sorted(asked)
        subset = home / "oracle-input.parquet"
        write_atomic(rows[chosen], subset)
        oracle_job = derive(oracle_base, {"input.paths": [str(subset)], "input.limit": None, "input.columns": None})
        stopped = await run_stage(oracle_job, "oracle", what)
        if stopped is not None:
            return stopped
        answered["oracle"] = oracle_job.output_path
        out = pl.read_parquet(oracle_job.output_path)
        for row_id, answer in zip(out.get_column(id_col).cast(pl.String).to_list(), _answers(out, fields), strict=True):
            oracle_by_id[row_id] = answer
        return None

    asked.update(_answered_before(home, oracle_base, rows, ids, id_col, fields, oracle_by_id))
    rounds = 0
    while True:
        step = choose(scores, agrees, target=cascade.target, delta=cascade.delta, seed=cascade.seed)
        if not step.need:
            break
        rounds += 1
        stopped = await ask_oracle(set(step.need), f"calibration round {rounds}")
        if stopped is not None:
            return stopped
    escalate = set(range(len(scores))) - step.keep
    stopped = await ask_oracle(escalate, "escalation")
    if stopped is not None:
        return stopped
    oracle_out = pl.read_parquet(answered["oracle"])
    output = _join(job, proxy, oracle_out, step, asked, id_col, proxy_job.spec.model.name, oracle_base.spec.model.name)
    job.output_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, job.output_path)
    cascade_info = _cascade(job, output, step, rounds, proxy_job, oracle_base, proxy, oracle_out)
    paid = round(spent["proxy"] + spent["oracle"], 6)  # this run
    kept = kept_estimates(job).read_estimate()
    # How good was `glm-batch estimate`, when it was made for this job as it is.
    check = compare_whole(job, kept, spent=paid) if kept is not None else None
    record = CascadeSummary(
        job=job.name,
        model=oracle_base.spec.model.name,
        endpoint=job.endpoint_name,
        output=str(job.output_path),
        cost=Spent(job.currency, paid, estimate=check),
        simulated=job.base_url is None,
        cascade=cascade_info,
    )
    write_summary(job.output_path, record)
    failed = output.filter(pl.col("status") != "ok").height
    message = f"cascade finished: {cascade_info.guarantee}; results in {job.output_path}"
    if failed:
        message = f"cascade finished; {failed} rows failed (see error_type in {job.output_path})"
    reporter.finish(record, message)
    return CascadeResult(1 if failed else 0, message, record.as_run(), record)


def _answered_before(
    home: Path,
    oracle_base: Job,
    rows: pl.DataFrame,
    ids: list[str],
    id_col: str,
    fields: list[str],
    oracle_by_id: dict[str, tuple[Any, ...] | None],
) -> list[int]:
    """The rows the last finished oracle round answered, put into `oracle_by_id` so a resumed cascade
    goes on from there; only where the row renders today to the request (key) it answered."""
    from runner.job.prompts import RequestBuilder
    from runner.job.sandbox import RenderError

    try:
        out = pl.read_parquet(home / "oracle.parquet", columns=[id_col, "request_key", "status", *fields])
    except (OSError, pl.exceptions.PolarsError):
        return []
    probe = derive(oracle_base, {"input.paths": [str(home / "oracle-input.parquet")], "input.limit": None})
    builder = RequestBuilder(probe)
    position = {row_id: pos for pos, row_id in enumerate(ids)}
    found = []
    keys = out.get_column("request_key").to_list()
    for row_id, key, answer in zip(
        out.get_column(id_col).cast(pl.String).to_list(), keys, _answers(out, fields), strict=True
    ):
        pos = position.get(row_id)
        if pos is None or key is None:
            continue
        try:
            same = builder.build(rows.row(pos, named=True)).key == key
        except RenderError:  # a row that no longer renders: its answer is not taken
            same = False
        if same:
            oracle_by_id[row_id] = answer
            found.append(pos)
    return found


def proxy_view(
    proxy: pl.DataFrame, fields: list[str], column: str
) -> tuple[list[tuple[Any, ...] | None], list[float | None]]:
    """The proxy pass's answer per row (its samples' majority) and its confidence, read from `column`
    (score_column), None where it has no answer."""
    answers = _answers(proxy, fields)
    confidence = proxy.get_column(column).fill_null(0.0).to_list()
    return answers, [None if a is None else float(s) for a, s in zip(answers, confidence, strict=True)]


def _answers(frame: pl.DataFrame, fields: list[str]) -> list[tuple[Any, ...] | None]:
    """Each row's validated answer as a comparable tuple (None where the row has no ok answer)."""
    values = frame.select([pl.col(f) for f in fields]).rows()
    status = frame.get_column("status").to_list()
    return [tuple(json.dumps(v, sort_keys=True, default=str) for v in value) if s == "ok" else None
            for value, s in zip(values, status, strict=True)]  # fmt: skip


def _join(
    job: Job,
    proxy: pl.DataFrame,
    oracle: pl.DataFrame,
    step: Step,
    asked: set[int],
    id_col: str,
    proxy_name: str,
    oracle_name: str,
) -> pl.DataFrame:
    """One row per input row, in input order: the oracle's answer where it was asked (the drawn rows,
    the escalated ones), the proxy's elsewhere; cost is what the row cost with both models."""
    positions = pl.int_range(0, proxy.height, dtype=pl.UInt32, eager=True)
    confidence = proxy.get_column(score_column(job)).alias(CONFIDENCE)
    by_oracle = pl.Series("_by_oracle", [pos in asked for pos in range(proxy.height)])
    sampled = pl.Series(IN_CALIBRATION, [pos in step.sampled for pos in range(proxy.height)])
    proxy_only = [*_PROXY_ONLY, STATED] if score_column(job) == STATED else _PROXY_ONLY
    base = proxy.drop([c for c in proxy_only if c in proxy.columns])
    base = base.with_columns(positions.alias("_pos"), confidence, sampled, by_oracle)
    oracle = oracle.unique(subset=[id_col], keep="first", maintain_order=True)
    columns = [c for c in base.columns if c not in ("_pos", CONFIDENCE, IN_CALIBRATION, "_by_oracle")]
    from_oracle = (
        base.filter(pl.col("_by_oracle"))
        .select("_pos", CONFIDENCE, IN_CALIBRATION, id_col, pl.col("cost").alias("_proxy_cost"))
        .join(oracle.select(columns).drop([c for c in ("_proxy_cost",) if c in columns]), on=id_col, how="left")
        .with_columns((pl.col("cost").fill_null(0.0) + pl.col("_proxy_cost").fill_null(0.0)).alias("cost"))
        .drop("_proxy_cost")
        .with_columns(pl.lit(oracle_name).alias(ANSWERED_BY))
    )
    from_proxy = (
        base.filter(~pl.col("_by_oracle")).drop("_by_oracle").with_columns(pl.lit(proxy_name).alias(ANSWERED_BY))
    )
    order = [*columns, ANSWERED_BY, CONFIDENCE, IN_CALIBRATION]
    joined = pl.concat([from_proxy.select("_pos", *order), from_oracle.select("_pos", *order)], how="vertical_relaxed")
    return joined.sort("_pos").drop("_pos")


def _cascade(
    job: Job,
    output: pl.DataFrame,
    step: Step,
    rounds: int,
    proxy_job: Job,
    oracle_job: Job,
    proxy: pl.DataFrame,
    oracle: pl.DataFrame,
) -> Cascade:
    """The cascade's section of its record: the guarantee in words, the threshold, escalation, cost, and quality."""
    cascade = job.spec.output.cascade
    assert cascade is not None
    rows = output.height
    by_oracle = output.filter(pl.col(ANSWERED_BY) == oracle_job.spec.model.name).height
    paid = output.get_column("cost").fill_null(0.0).sum()
    asked_cost = oracle.get_column("cost").drop_nulls()
    oracle_only = float(asked_cost.mean()) * rows if asked_cost.len() else None  # type: ignore[arg-type]
    target, delta = cascade.target, cascade.delta
    words = f"agrees with {oracle_job.spec.model.name} on >= {target:.0%} of rows with probability >= {1 - delta:.0%}"
    id_col = job.spec.input.id_column or "id"
    gold = job.gold_columns[job.spec.eval.gold_column] if job.spec.eval and job.spec.eval.gold_column else None
    field = job.shape.label_field if job.shape else None
    accuracy = None
    if gold and field and gold in output.columns:
        accuracy = Accuracy(
            proxy=_accuracy(proxy, field, gold),
            oracle_where_asked=_accuracy(oracle, field, gold),
            proxy_where_oracle_asked=_accuracy(
                output.filter(pl.col(ANSWERED_BY) != proxy_job.spec.model.name)
                .select(pl.col(id_col))
                .join(proxy, on=id_col),
                field,
                gold,
            ),
            cascade=_accuracy(output, field, gold),
        )
    return Cascade(
        guarantee=words,
        proxy=proxy_job.spec.model.name,
        oracle=oracle_job.spec.model.name,
        target=target,
        delta=delta,
        threshold=step.threshold,
        at_threshold=_at_threshold(output, step.threshold, proxy_job.spec.model.name),
        rows=rows,
        rows_kept_from_proxy=rows - by_oracle,
        rows_escalated=by_oracle - len(step.sampled),
        rows_in_calibration=len(step.sampled),
        calibration_rounds=rounds,
        thresholds_tested=step.tested,
        cost=CascadeCost(
            currency=job.currency,
            proxy=round(float(proxy.get_column("cost").fill_null(0.0).sum()), 6),
            oracle=round(float(oracle.get_column("cost").fill_null(0.0).sum()), 6),
            cascade=round(float(paid), 6),
            oracle_only_expected=None if oracle_only is None else round(oracle_only, 6),
            share_of_oracle_only=None if not oracle_only else round(float(paid) / oracle_only, 4),
        ),
        accuracy=accuracy,
    )


def _at_threshold(output: pl.DataFrame, threshold: float | None, proxy_name: str) -> AtThreshold | None:
    """How many rows have exactly the threshold's confidence, and how many of them kept the proxy's answer."""
    if threshold is None:
        return None
    tied = output.filter(pl.col(CONFIDENCE) == threshold)
    return AtThreshold(tied.height, tied.filter(pl.col(ANSWERED_BY) == proxy_name).height)


def _accuracy(frame: pl.DataFrame, field: str, gold: str) -> float | None:
    """The share of rows with a gold label whose answer matches it (an invalid answer counts wrong)."""
    scored = frame.filter(pl.col(gold).is_not_null())
    if scored.height == 0:
        return None
    right = scored.filter((pl.col("status") == "ok") & (pl.col(field).cast(pl.String) == pl.col(gold).cast(pl.String)))
    return round(right.height / scored.height, 4)
