"""Planning in blocks (issue 23): a run hands each planned batch's requests over at once (Dispatch.blocks),
keyed, estimated and admitted as columns. None of it may change a key (a changed key is a row paid
again), a byte sent, an estimate, what the budget admits, or how rows are counted, failed and mapped:
the row by row path (`plan`, `Dispatch.requests`, Jinja's `build`) is the specification.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.control import Control
from runner.engine import execute
from runner.job.catalog import models
from runner.job.inputs import open_input
from runner.job.prompts import RequestBuilder
from runner.job.resolve import Job, load_job
from runner.job.sandbox import RenderError
from runner.local import LocalSender
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import Budget, PriceTable
from runner.money.tokens import Calibration, estimate_request
from runner.observe.progress import make_reporter
from runner.plan import Dispatch, PlannedColumns, plan, plan_columns
from runner.records import KEY, Request, Result
from runner.runs import RunOptions
from runner.send.base import Deliver
from runner.send.fake import FakeExecutor
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys

FILLER = 64  # the first rows are always planned row by row (the template check); the rest as columns
SPECIAL_TEXT = ["hello world", "ünïcödé — 日本語 🎉", "", 'quotes " and \\ back\nnew line\ttab',
                "\x00nul \x01\x1f\x7f control", "\u2028line sep\u2029 and \r\n crlf", "\ud7ff\ue000\uffff edge",
                "🎉🎉🎉中文", None, "same", "same", "x" * 300]  # fmt: skip
SPECIAL_N = [1, -2, 0, 10**12, 7, None, -(2**63), 2**63 - 1, 5, 3, 3, 42]
PROMPTS: dict[str, dict[str, Any]] = {
    "plain": {"prompt": {"system": "Be brief.", "template": "Summarise: {{ text }}"}},
    "label": {"prompt": {"system": "You label reviews.",
                         "template": "Review: {{ text }}\nIs it positive or negative?\n"},
              "output": {"labels": ["positive", "negative"]}},
    "schema": {"prompt": {"template": "{{ text }} / {{ n }} stars"},
               "output": {"schema": {"type": "object", "properties": {"score": {"type": "integer"}},
                                     "required": ["score"]}}},
    "messages": {"prompt": {"messages": [{"role": "user", "content": "Say ok."}, {"role": "assistant", "content": "ok"},
                                         {"role": "user", "content": "{{text}}{{ n }}"}]}},
    "french": {"prompt": {"system": "Réponds en français: 简短", "template": "  {{- text -}}  \n{{ n }}"}},
}  # fmt: skip
# The keys of the SPECIAL rows (after FILLER rows `filler <i>`, n = i) as the planner of main at 9771f7b^1
# (before planning in blocks) gave them, with input.nulls: empty: a regression pin, not a result worked
# out by hand. A change here means every earlier answer of such a job would be paid for again.
PINNED = {
    "plain": ["fcee60630ae71e2377b08be283211620", "901c607acdbaeeda5855549cd8e63735",
              "8d52f821e485eb0f2e7ea2ee31fd1f30", "b5a00aea0fbc0d1390f4a02cc720a9eb",
              "2bd7afd6c2658c61d9f09f1afce90472", "1ba5fae33bb61b78c37f40d4057d7924",
              "57de419fe4e99b2fdc21bdbc45e21547", "8b021fd448d11088dc2d6a779d049a8b",
              "8d52f821e485eb0f2e7ea2ee31fd1f30", "ee64f35229b562680d42d9532bbbb362",
              "ee64f35229b562680d42d9532bbbb362", "9d7d4c313da860597db281b27ec47fc2"],
    "label": ["ab3a22fdf31f43e47ecfce027320c7f0", "93af86273e53a5130b999cf2a01b7765",
              "98760bc16243f44a1a9124afe339ddbe", "a0a49c772878074c85477f197d6fffef",
              "f952eb02b47ce078448401f234ba1cb9", "cf992fd279b85f6d8a3a3d0810fbb3f0",
              "4a5a02ae8a324404fff2bb69c1ce10f4", "bca8dd06cd3d177d56f9ac3b5a4e3743",
              "98760bc16243f44a1a9124afe339ddbe", "e83e109bbb5133535dfbdcfaa835dbd7",
              "e83e109bbb5133535dfbdcfaa835dbd7", "0ee0ca80137d7014e1e566135b058761"],
    "schema": ["e513064b9e93e714160b017211a9c334", "330502ea1208c783216e7e8c9eac11b1",
               "302dd0ac0e034dadbfc461f04749a8b2", "3cfbea59465a46019f6868ccc22c0a3b",
               "4cae8d2c0f099d72fb67d08fc64c1198", "4612196eea6796f6c83e127e3fbfd0f4",
               "7a1a052a8f2cb063e19ba8ad6ca38e00", "88bec6b3c1860713c6dd879592e9d2fe",
               "1ff18bef71475d3f9062d23dcd70e0d2", "0fabb71136ef4b58b5c8a83b0a748211",
               "0fabb71136ef4b58b5c8a83b0a748211", "092a754bccd04bb1c479faaf9ab5579a"],
    "messages": ["95547071032754684896f8d042a95558", "f477df5bb2ae9ca3daa51b3448db57d1",
                 "7416a2f8623b98ce30e363893e1d3ad6", "dde5a743bfcc6d65bd894caef773b284",
                 "6afef9c6055513f15eb9897e30a2bac1", "d01272e66148063a79e0dd1823218e8c",
                 "ebfff331bdb6d755dc919b43a751148f", "7a78a31e22d586d0385dc2f0da8714b7",
                 "7bf3845e554d250516360313541f877b", "935cd9c52e6db2e8eaccb82fd83527b9",
                 "935cd9c52e6db2e8eaccb82fd83527b9", "96522471f9317693c541e43f44607cca"],
    "french": ["851c8c7e0c8a5328d207d19278371eff", "1da5a284f7c593347dcb80b9c838ccdd",
               "ccab82dd6e6283fa8d5f618dbc35458d", "e11af22c5d4c5e0b575fdfba96af5ca8",
               "e8207b042378d93f64214b1fdebc467c", "23001e6d7a5ad943d0489f4f1d9aa38d",
               "8cd0b8a9ba26338a067f041ac2a29a64", "952003a26cfaaa40118d8fb39348425f",
               "ac10404fe81c6f2b9a4369db6a8a4995", "3e209b8322da08265cc2ab6bab1fc741",
               "3e209b8322da08265cc2ab6bab1fc741", "d917be5e13c4a494174ee8f12f85463a"],
}  # fmt: skip
GLM46_CNY = PriceTable("glm-4.6", "CNY", tuple(models()["glm-4.6"].prices["CNY"].tiers), confirmed=False)


def _rows(text: list[str | None], n: list[int | None]) -> dict[str, list[Any]]:
    """FILLER plain rows, then `text` and `n`."""
    text = [f"filler {i}" for i in range(FILLER)] + text
    numbers = list(range(FILLER)) + n
    return {"id": [f"r{i}" for i in range(len(text))], "text": text, "n": numbers}


def _job(folder: Path, name: str, rows: dict[str, list[Any]], nulls: str = "empty", **model: Any) -> Job:
    """A job over `rows` (a Parquet input) with the prompt (and output) PROMPTS[name]; loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    schema = {"id": pl.String, "text": pl.String, "n": pl.Int64}
    pl.DataFrame(rows, schema=schema).write_parquet(folder / "data" / f"{name}.parquet")
    spec: dict[str, Any] = {
        "version": 1,
        "name": name,
        "input": {"paths": [f"data/{name}.parquet"], "id_column": "id", "nulls": nulls},
        "prompt": PROMPTS[name]["prompt"],
        "model": {"name": "glm-4.6", "endpoint": "simulator", "max_tokens": 64, **model},
        "output": {"path": f"out/{name}.parquet", **PROMPTS[name].get("output", {})},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return load_job(path)


@dataclasses.dataclass
class Dispatched:
    """Everything one dispatch of a job did, to compare two ways of doing it."""

    requests: list[tuple[str, dict[str, Any]]]
    estimates: dict[str, Any]  # the accountant's admitted requests: key -> raw estimate (and reservation)
    tally: dict[str, Any]
    delivered: list[tuple[str, str, str | None]]
    row_map: list[tuple[int, str, str]]
    reason: str | None
    reserved: float | None
    columns_planned: int  # batches planned as columns


def _raw(value: tuple[int, float] | None) -> tuple[int, float] | int | None:
    """An admitted request's raw estimate, with its reserved cost beside it when it reserved one."""
    if value is None:
        return None
    return value if value[1] else value[0]


def _dispatch(
    job: Job,
    folder: Path,
    *,
    columns: bool,
    settled: SettledKeys | None = None,
    budget: float | None = None,
    pilot: frozenset[int] | None = None,
    context: int | None = None,
) -> Dispatched:
    """Plan `job` and dispatch it as a run does: in blocks (`columns`: plan_columns, Dispatch.blocks) or
    row by row (plan, Dispatch.requests), into an executor that answers nothing."""
    rows = RowMap(folder / ("columns" if columns else "rows"))
    rows.reset()
    tally = Tally(rows_total=0, samples=job.spec.output.samples)
    delivered: list[Result] = []
    accountant = Accountant(GLM46_CNY, Calibration(), Budget(budget) if budget else None, job.spec.model.max_tokens)
    control = Control()
    deliver: Deliver = delivered.append
    dispatch = Dispatch(rows, (), tally, deliver, accountant.admit_block, control, pilot, set(), context)
    known = settled or SettledKeys.none()
    source = open_input(job)
    batches = list(plan_columns(job, source, known) if columns else plan(job, source, known))

    async def handed() -> list[Request]:
        if columns:
            return [request async for block in dispatch.blocks(iter(batches), {}) for request in block.requests()]
        return [request async for request in dispatch.requests(iter(batches), {})]

    requests = asyncio.run(handed())
    assert sorted(dispatch.outstanding) == sorted(request.key for request in requests)
    mapped = pl.read_parquet(rows.files()).select("_row", "_id", KEY).rows() if rows.files() else []
    return Dispatched(
        [(request.key, request.params) for request in requests],
        {key: _raw(accountant._open.get(key)) for key in accountant._open},
        dataclasses.asdict(tally) | {"started": None, "latencies_ms": None, "client_wait_ms": None},
        [(result.key, result.status, result.error_type) for result in delivered],
        mapped,
        control.reason,
        accountant.budget.reserved if accountant.budget else None,
        sum(isinstance(batch, PlannedColumns) for batch in batches),
    )


def _by_jinja(job: Job) -> list[tuple[str, Request | RenderError]]:
    """Each row's request (or render error) as Jinja renders it, row by row (RequestBuilder.build)."""
    builder = RequestBuilder(job)
    made: list[tuple[str, Request | RenderError]] = []
    for frame in open_input(job).batches(10_000):
        made += [(row_id, rendered) for _, row_id, rendered in builder.render(frame.iter_rows(named=True))]
    return made


@pytest.mark.parametrize("name", sorted(PINNED))
def test_blocks_key_every_row_as_the_planner_before_them_did(tmp_path: Path, name: str) -> None:
    """Text with non-ASCII, control characters, quotes and newlines, an empty text, 64-bit integers, a null
    blanked, rows sharing a prompt; a system prompt, labels, a schema, fixed earlier turns: each row keyed
    as before (PINNED), and each request sent, and its estimate, as Jinja's row by row `build` makes it."""
    job = _job(tmp_path / "job", name, _rows(SPECIAL_TEXT, SPECIAL_N))
    done = _dispatch(job, tmp_path, columns=True)
    assert done.columns_planned  # the block path ran
    assert [key for _, _, key in done.row_map][FILLER:] == PINNED[name]
    expected = _by_jinja(job)
    assert [key for _, _, key in done.row_map] == [
        made.key if isinstance(made, Request) else f"render-{row_id}" for row_id, made in expected
    ]
    sent = dict(done.requests)
    for _, made in expected:
        assert isinstance(made, Request)
        assert sent[made.key] == made.params
        assert done.estimates[made.key] == estimate_request(made.params)
    assert len(done.requests) == len({key for _, _, key in done.row_map})  # one request a distinct prompt


CELLS = st.one_of(st.none(), st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
NUMBERS = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cells=st.lists(st.tuples(CELLS, NUMBERS), min_size=1, max_size=10),
    name=st.sampled_from(sorted(PROMPTS)),
    nulls=st.sampled_from(["empty", "skip"]),
    settle_every=st.sampled_from([0, 2, 3]),
)
def test_blocks_dispatch_what_the_row_by_row_path_dispatches(
    tmp_path_factory: pytest.TempPathFactory,
    cells: list[tuple[str | None, int | None]],
    name: str,
    nulls: str,
    settle_every: int,
) -> None:
    """Any cells (control characters, any script, empty, null, repeated) under any of the specs, some rows
    answered before: the same requests byte for byte, estimates, row map, failures and counts, in blocks
    as row by row; and every request as Jinja makes it."""
    folder = tmp_path_factory.mktemp("fuzz")
    text = [text for text, _ in cells] * 2  # every row repeated: prompts shared across the batch
    numbers = [n for _, n in cells] * 2
    job = _job(folder / "job", name, _rows(text, numbers), nulls)
    expected = _by_jinja(job)
    answered = [made.key for _, made in expected if isinstance(made, Request)][:: settle_every or 10**9]
    settled = SettledKeys(pl.Series(KEY, sorted(answered) if settle_every else [], dtype=pl.String))
    blocks = _dispatch(job, folder, columns=True, settled=settled)
    rows = _dispatch(job, folder, columns=False, settled=settled)
    assert blocks.columns_planned
    assert blocks == dataclasses.replace(rows, columns_planned=blocks.columns_planned)
    built = {made.key: made.params for _, made in expected if isinstance(made, Request)}
    assert all(built[key] == params for key, params in blocks.requests)
    failed = {f"render-{row_id}" for row_id, made in expected if isinstance(made, RenderError)}
    assert {key for key, _, _ in blocks.delivered} == failed


@pytest.mark.parametrize("budget", [0.005, 0.02, 0.05])
def test_a_budget_admits_in_blocks_the_requests_it_admits_one_by_one(tmp_path: Path, budget: float) -> None:
    """Under a budget that covers some of the requests: the same ones admitted and reserved, the run
    stopped for the budget at the same row (the rows before it counted and failed as row by row), and
    the row map left unsealed."""
    text = [f"review {i % 150}: " + "word " * (i % 7) for i in range(400)] + [None] * 3
    job = _job(tmp_path / "job", "plain", _rows(text, list(range(403))), nulls="skip")
    settled = SettledKeys(pl.Series(KEY, sorted(m.key for _, m in _by_jinja(job)[::5] if isinstance(m, Request))))
    blocks = _dispatch(job, tmp_path, columns=True, budget=budget, settled=settled)
    rows = _dispatch(job, tmp_path, columns=False, budget=budget, settled=settled)
    assert blocks.columns_planned
    assert blocks.reason == "budget"
    assert 0 < len(blocks.requests) < 400 - 80
    assert blocks == dataclasses.replace(rows, columns_planned=blocks.columns_planned)
    assert not blocks.tally["all_rows_rendered"]


def test_a_pilot_and_the_context_window_leave_out_and_fail_the_same_rows(tmp_path: Path) -> None:
    """A pilot's sample and prompts over the model's context window: the same rows left out, failed
    (over_context, nothing sent) and sent, in blocks as row by row."""
    text = ["short" if i % 4 else "long " * (i % 50) for i in range(300)]
    job = _job(tmp_path / "job", "french", _rows(text, list(range(300))))
    pilot = frozenset(range(0, 364, 3))
    blocks = _dispatch(job, tmp_path, columns=True, pilot=pilot, context=40)
    rows = _dispatch(job, tmp_path, columns=False, pilot=pilot, context=40)
    assert blocks.columns_planned
    assert blocks.tally["rows_left_out"] > 0 and any(error == "over_context" for *_, error in blocks.delivered)
    assert blocks == dataclasses.replace(rows, columns_planned=blocks.columns_planned)


class OneByOne:
    """An executor that takes requests one by one only (as the online one does): the run iterates blocks."""

    def __init__(self, inner: FakeExecutor) -> None:
        self.inner = inner

    def gauges(self) -> Any:
        return self.inner.gauges()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def run(self, requests: Any, deliver: Deliver, control: Control) -> None:
        await self.inner.run(requests, deliver, control)


def _run(job: Job, executor: Any) -> Any:
    """The job run to its end in this process by `executor`; its report."""
    sender = LocalSender(executor)
    return asyncio.run(execute(job, api_key="k", options=RunOptions(), reporter=make_reporter("json"), sender=sender))


def test_a_run_handed_blocks_answers_and_resumes_as_one_handed_requests(tmp_path: Path) -> None:
    """End to end with the in-process executor: handed blocks, or requests one by one, the same output;
    stopped by its budget and resumed with a larger one, each distinct prompt is sent exactly once."""
    text = [f"review {i % 180}" for i in range(400)]
    outputs = []
    for index, executor in enumerate((FakeExecutor(), OneByOne(FakeExecutor()))):
        job = _job(tmp_path / f"job{index}", "plain", _rows(text, list(range(400))))
        assert _run(job, executor).exit_code == 0
        outputs.append(pl.read_parquet(job.output_path).select("id", "request_key", "response_text", "cost").sort("id"))
    assert outputs[0].equals(outputs[1])

    job = _job(tmp_path / "capped", "plain", _rows(text, list(range(400))), prices={"input": 2.0, "output": 8.0})
    spec = job.spec_path.read_text(encoding="utf-8")
    job.spec_path.write_text(spec + "run: {max_cost: 0.003}\n", encoding="utf-8")
    fake = FakeExecutor()
    first = _run(load_job(job.spec_path), fake)
    assert first.exit_code != 0 and 0 < fake.sent < FILLER + 180
    job.spec_path.write_text(spec, encoding="utf-8")
    resumed = FakeExecutor()
    assert _run(load_job(job.spec_path), resumed).exit_code == 0
    assert fake.sent + resumed.sent == FILLER + 180  # the distinct prompts, each paid once
    assert pl.read_parquet(job.output_path).height == FILLER + 400
