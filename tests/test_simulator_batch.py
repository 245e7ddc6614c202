"""The simulator's Zhipu Batch API (/api/paas/v4/files and /batches, see batch.md), specified over real
sockets with aiohttp as the client: the file checks, the status lifecycle over simulated time, results
that answer exactly as /v1/messages does, and a bill that proves no prompt was paid for twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from runner.simulator.answers import answer_for
from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread
from tests.conftest import until

KEY = "sim-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TERMINAL = {"completed", "failed", "expired", "cancelled"}
SYSTEM = "You label sentiment."
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}}}


@pytest.fixture
def server() -> Iterator[SimulatorThread]:
    """A simulator whose batches run at once unless a test slows them."""
    with SimulatorThread(SimConfig(api_keys=(KEY,))) as sim:
        yield sim


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client: the tests speak the wire, not our engine."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


def chat(text: str, model: str = "glm-4.6", **extra: Any) -> dict[str, Any]:
    """A native chat completions body with the module's system prompt, thinking off (as the runner
    sends a request that does not ask for it; the native default is on)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return {"model": model, "messages": messages, "max_tokens": 256, "thinking": {"type": "disabled"}, **extra}


def line(custom_id: str, body: Any, url: str = "/v4/chat/completions") -> dict[str, Any]:
    """One line of a batch file."""
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    """A batch file's bytes."""
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


class Api:
    """The native API of one simulator, through one aiohttp session."""

    def __init__(self, http: aiohttp.ClientSession, sim: SimulatorThread) -> None:
        self.http, self.base = http, sim.native_url

    async def upload(self, data: bytes) -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename="in.jsonl", content_type="application/jsonl")
        async with self.http.post(f"{self.base}/files", data=form) as resp:
            return resp.status, await resp.json()

    async def create(self, file_id: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        # Kept by default here: these tests make several batches from one file (Zhipu deletes it by default).
        payload = {"input_file_id": file_id, "endpoint": "/v4/chat/completions", "auto_delete_input_file": False}
        payload.update(extra)
        async with self.http.post(f"{self.base}/batches", json=payload) as resp:
            return resp.status, await resp.json()

    async def submit(self, lines: list[Any], **extra: Any) -> dict[str, Any]:
        status, file = await self.upload(jsonl(lines))
        assert status == 200, file
        status, batch = await self.create(file["id"], **extra)
        assert status == 200, batch
        return batch

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        async with self.http.get(f"{self.base}{path}", params=params) as resp:
            return resp.status, await resp.json()

    async def wait(self, batch_id: str, statuses: set[str] = TERMINAL) -> tuple[dict[str, Any], list[str]]:
        """Poll until the batch reaches one of `statuses`; the batch and every status seen on the way."""
        seen: list[str] = []

        async def reached() -> dict[str, Any] | None:
            _, batch = await self.get(f"/batches/{batch_id}")
            if not seen or seen[-1] != batch["status"]:
                seen.append(batch["status"])
            return batch if batch["status"] in statuses else None

        return await until(reached, every_s=0.02, context=lambda: f"batch stuck in {seen}"), seen

    async def content(self, file_id: str) -> tuple[int, list[dict[str, Any]]]:
        async with self.http.get(f"{self.base}/files/{file_id}/content") as resp:
            text = await resp.text()
            if resp.status != 200:
                return resp.status, [json.loads(text)]
            return 200, [json.loads(x) for x in text.splitlines() if x]

    async def messages(self, payload: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(f"{self.base.removesuffix('/api/paas/v4')}/v1/messages", json=payload) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result


@pytest.fixture
def api(http: aiohttp.ClientSession, server: SimulatorThread) -> Api:
    """The helper bound to this test's simulator."""
    return Api(http, server)


async def test_a_batch_validates_runs_finalizes_and_completes_with_shuffled_results(
    api: Api, server: SimulatorThread
) -> None:
    """validating -> in_progress -> finalizing -> completed over simulated time; every line's answer is
    in the output file (in another order than submitted), each billed once as batch."""
    server.configure(batch_validating_s=0.1, batch_lines_per_s=100, batch_finalizing_s=0.1)
    texts = [f"review {i}: it was good" for i in range(20)]
    batch = await api.submit([line(f"r{i}", chat(t)) for i, t in enumerate(texts)], metadata={"job": "x"})
    assert batch["status"] == "validating" and batch["metadata"] == {"job": "x"}

    done, seen = await api.wait(batch["id"])

    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert done["error_file_id"] == ""  # real objects: an empty string until the file exists
    assert done["created_at"] <= done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    status, results = await api.content(done["output_file_id"])
    assert status == 200
    order = [r["custom_id"] for r in results]
    assert sorted(order) == sorted(f"r{i}" for i in range(20)) and order != [f"r{i}" for i in range(20)]
    for r in results:
        assert r["id"] == batch["id"] and "request_id" in r["response"]["body"] and r["response"]["status_code"] == 200
        message = r["response"]["body"]["choices"][0]["message"]
        assert message["content"] == answer_for(f"{SYSTEM}\n{texts[int(r['custom_id'][1:])]}")
    stats = server.stats()
    assert stats["billed"] == {"online": 0, "batch": 20} and stats["prompts_billed_twice"] == 0
    assert stats["batches"] == {"completed": 1} and stats["batch_lines_processed"] == 20


async def test_a_batch_line_answers_exactly_as_the_messages_route_does(api: Api) -> None:
    """Same prompt, same answer and usage: plain text, thinking as reasoning_content, an
    OpenAI-style tool call (tool_choice auto) as the Anthropic tool_use input, json_object mode, and
    max_tokens cut-offs."""
    tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
    lines = [
        line("text", chat("the food was great")),
        line("think", chat("the food was great", thinking={"type": "enabled"})),
        line(
            "tool",
            chat("awful service", tools=[tool], tool_choice="auto"),
        ),
        line("json", chat("the food was great", response_format={"type": "json_object"})),
        line("short", chat("the food was great", max_tokens=8)),
    ]
    batch, _ = await api.wait((await api.submit(lines))["id"])
    _, results = await api.content(batch["output_file_id"])
    body = {r["custom_id"]: r["response"]["body"] for r in results}

    def anthropic(text: str, **extra: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": text}]
        return {"model": "glm-4.6", "system": SYSTEM, "messages": messages, "max_tokens": 256, **extra}

    text = await api.messages(anthropic("the food was great"))
    assert body["text"]["choices"][0]["message"]["content"] == text["content"][0]["text"]
    assert body["text"]["choices"][0]["finish_reason"] == "stop"
    usage = body["text"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        text["usage"]["input_tokens"],
        text["usage"]["output_tokens"],
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    think = await api.messages(anthropic("the food was great", thinking={"type": "enabled", "budget_tokens": 64}))
    assert body["think"]["choices"][0]["message"]["reasoning_content"] == think["content"][0]["thinking"]
    assert body["think"]["usage"]["completion_tokens"] == think["usage"]["output_tokens"]
    assert "reasoning_content" not in body["text"]["choices"][0]["message"]

    called = await api.messages(anthropic("awful service", tools=[{"name": "label", "input_schema": SCHEMA}]))
    choice = body["tool"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "label"
    assert json.loads(call["function"]["arguments"]) == called["content"][0]["input"] == {"label": "negative"}

    assert json.loads(body["json"]["choices"][0]["message"]["content"]) == {"answer": text["content"][0]["text"]}

    short = await api.messages(anthropic("the food was great", max_tokens=8))
    assert body["short"]["choices"][0]["finish_reason"] == "length"
    assert body["short"]["choices"][0]["message"]["content"] == short["content"][0]["text"] != ""
    assert len(short["content"][0]["text"]) < len(text["content"][0]["text"])


async def test_invalid_answers_and_repair_turns_behave_as_online(api: Api, server: SimulatorThread) -> None:
    """With invalid_rate 1 the first tool call breaks the schema, as on /v1/messages; a repair turn
    (assistant tool_calls, a tool message, a user message) is accepted and answered validly."""
    server.configure(invalid_rate=1.0)
    tool = {"type": "function", "function": {"name": "label", "parameters": SCHEMA}}
    first = chat("great stuff", tools=[tool], tool_choice="auto")
    batch, _ = await api.wait((await api.submit([line("a", first)]))["id"])
    _, [result] = await api.content(batch["output_file_id"])
    call = result["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"label": "not-a-label"}

    repair = {
        **first,
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "label: 'not-a-label' is not one of ..."},
        ],
    }
    batch, _ = await api.wait((await api.submit([line("a", repair)]))["id"])
    _, [result] = await api.content(batch["output_file_id"])
    call = result["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"label": "positive"}


async def test_uploads_that_break_zhipus_file_rules_are_refused_with_native_errors(
    api: Api, server: SimulatorThread
) -> None:
    """Too many lines, two models, a duplicate custom_id, a wrong url or method, bad JSON: each is a 400
    {"error": {"code", "message"}} naming the problem; too many bytes is the file APIs' 435; a missing
    key is a 401."""
    server.configure(batch_max_lines=3, batch_max_bytes=2000)
    ok = [line(f"r{i}", chat(f"t{i}")) for i in range(3)]
    cases = {
        "4 lines": jsonl([*ok, line("r3", chat("t3"))]),
        "bytes": jsonl([line("r0", chat("x" * 3000))]),
        "one model": jsonl([ok[0], line("b", chat("t", model="glm-4.5-air"))]),
        "duplicate custom_id": jsonl([ok[0], ok[0]]),
        "url must be": jsonl([line("r0", chat("t"), url="/v1/embeddings")]),
        "method must be": jsonl([{**ok[0], "method": "GET"}]),
        "not valid JSON": jsonl([ok[0]]) + b"{not json\n",
        "Unknown Model": jsonl([line("r0", chat("t", model="gpt-4"))]),
    }
    for said, data in cases.items():
        status, payload = await api.upload(data)
        code = "435" if said == "bytes" else "1214"
        assert status == (435 if said == "bytes" else 400), said
        assert payload["error"]["code"] == code and said in payload["error"]["message"], payload
    assert (await api.upload(jsonl(ok)))[0] == 200
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{api.base}/batches") as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "1001"


async def test_with_checks_deferred_a_bad_file_is_accepted_and_its_batch_fails_validation(
    api: Api, server: SimulatorThread
) -> None:
    """batch_check_on_upload=False: the upload succeeds, the batch goes validating -> failed with the
    reason in `errors`, and nothing is answered or billed."""
    server.configure(batch_check_on_upload=False, batch_validating_s=0.1)
    batch = await api.submit([line("a", chat("t")), line("b", chat("t", model="glm-4.5-air"))])
    failed, seen = await api.wait(batch["id"])
    assert seen == ["validating", "failed"]
    assert "one model" in failed["errors"]["data"][0]["message"]
    assert failed["output_file_id"] == "" and failed["failed_at"] is not None
    assert server.stats()["billed"]["batch"] == 0


async def test_creating_a_batch_checks_endpoint_metadata_eligibility_and_the_queue_cap(
    api: Api, server: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both spellings of the endpoint are accepted; metadata is limited to 16 keys; a model the
    catalogue marks batch: false is refused when asked; a batch that would overflow the model's queue
    is refused while others are unfinished, and accepted once they finish."""
    status, file = await api.upload(jsonl([line(f"r{i}", chat(f"t{i}")) for i in range(4)]))
    assert (await api.create(file["id"], endpoint="/v1/chat/completions"))[0] == 200
    status, err = await api.create(file["id"], endpoint="/v4/embeddings")
    assert status == 400 and "endpoint" in err["error"]["message"]
    status, err = await api.create(file["id"], metadata={f"k{i}": "v" for i in range(17)})
    assert status == 400 and "16 keys" in err["error"]["message"]
    assert (await api.create("file-nope"))[0] == 400

    from runner.job import catalog

    real = catalog.models()
    server.configure(batch_refuse_ineligible=True)
    assert (await api.create(file["id"]))[0] == 400  # the catalogue marks glm-4.6 batch: not eligible
    eligible = catalog.models()["glm-4-air-250414"]
    monkeypatch.setattr(catalog, "models", lambda: {**real, "glm-4.6": eligible})
    assert (await api.create(file["id"]))[0] == 200
    ineligible = real["glm-4.6"].model_copy(update={"batch": catalog.BatchInfo(eligible=False)})
    monkeypatch.setattr(catalog, "models", lambda: {**real, "glm-4.6": ineligible})
    status, err = await api.create(file["id"])
    assert status == 400 and "not available for the Batch API" in err["error"]["message"]
    monkeypatch.undo()

    server.configure(batch_refuse_ineligible=False, batch_queue_cap=6, batch_validating_s=0.3)
    first = await api.create(file["id"])
    status, err = await api.create(file["id"])
    assert first[0] == 200 and status == 429 and "queue" in err["error"]["message"], err
    await api.wait(first[1]["id"])
    assert (await api.create(file["id"]))[0] == 200


async def test_an_expired_batch_delivers_and_bills_what_it_finished_and_expires_the_rest(
    api: Api, server: SimulatorThread
) -> None:
    """With batch_expire_after_s, a slow batch expires part-way: its finished lines are in the output
    file and billed, the others are in the error file as batch_expired, and request_counts agree."""
    server.configure(batch_lines_per_s=20, batch_expire_after_s=0.3)
    batch = await api.submit([line(f"r{i}", chat(f"t{i}")) for i in range(40)])
    expired, seen = await api.wait(batch["id"])
    assert seen[-2:] == ["in_progress", "expired"]
    counts = expired["request_counts"]
    assert counts["total"] == 40 and counts["completed"] == 6 and counts["failed"] == 0
    _, done = await api.content(expired["output_file_id"])
    _, rest = await api.content(expired["error_file_id"])
    assert len(done) == 6 and len(rest) == 34
    assert {r["error"]["code"] for r in rest} == {"batch_expired"} and all(r["response"] is None for r in rest)
    assert {r["custom_id"] for r in done} | {r["custom_id"] for r in rest} == {f"r{i}" for i in range(40)}
    assert server.stats()["billed"]["batch"] == 6


async def test_a_test_can_expire_or_fail_a_batch_on_demand(api: Api, server: SimulatorThread) -> None:
    """The native API's expire and fail end a batch now, whatever the timings say."""
    server.configure(batch_lines_per_s=10, batch_validating_s=0.0)
    running = await api.submit([line(f"r{i}", chat(f"t{i}")) for i in range(100)])
    await until(lambda: server.stats()["batch_lines_processed"] >= 1)  # under way
    server.native.expire(running["id"])
    expired, _ = await api.wait(running["id"])
    assert expired["status"] == "expired" and 1 <= expired["request_counts"]["completed"] < 100

    server.configure(batch_validating_s=5.0)
    validating = await api.submit([line("a", chat("t"))])
    server.native.fail(validating["id"], "line 1: model not allowed")
    failed, _ = await api.wait(validating["id"])
    error = failed["errors"]["data"][0]
    assert failed["status"] == "failed" and (error["line"], error["message"]) == (1, "model not allowed"), error


async def test_a_cancelled_batch_keeps_the_results_it_had(api: Api, server: SimulatorThread) -> None:
    """cancel -> cancelling -> cancelled; lines answered before the cancel are delivered and billed;
    a finished batch cannot be cancelled."""
    server.configure(batch_lines_per_s=20, batch_cancelling_s=0.1)
    batch = await api.submit([line(f"r{i}", chat(f"t{i}")) for i in range(40)])
    await until(lambda: server.stats()["batch_lines_processed"] >= 1)  # some lines answered, most not
    async with api.http.post(f"{api.base}/batches/{batch['id']}/cancel") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelling"
    cancelled, _ = await api.wait(batch["id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] is not None
    kept = cancelled["request_counts"]["completed"]
    assert 1 <= kept < 40  # what was answered before the cancel: the line seen at least, far from all 40
    _, done = await api.content(cancelled["output_file_id"])
    _, rest = await api.content(cancelled["error_file_id"])
    assert len(done) == kept and {r["error"]["code"] for r in rest} == {"batch_cancelled"}
    assert server.stats()["billed"]["batch"] == kept
    async with api.http.post(f"{api.base}/batches/{batch['id']}/cancel") as resp:
        assert resp.status == 400


async def test_transient_and_bad_lines_go_to_the_error_file_and_a_retry_bills_each_prompt_once(
    api: Api, server: SimulatorThread
) -> None:
    """batch_error_rate makes some lines fail with a 500 or a 429/1302 body; a line with a bad body
    fails with a 400. Neither is billed. Resubmitting the transient failures, then sending what is
    still missing online, bills every prompt exactly once across both APIs."""
    server.configure(batch_error_rate=0.4)
    texts = {f"r{i}": f"t{i}" for i in range(30)}
    bad = line("bad", {"model": "glm-4.6", "messages": []})
    batch, _ = await api.wait((await api.submit([*(line(c, chat(t)) for c, t in texts.items()), bad]))["id"])
    _, errors = await api.content(batch["error_file_id"])
    by_id = {e["custom_id"]: e["response"] for e in errors}
    assert by_id.pop("bad")["status_code"] == 400
    assert {r["status_code"] for r in by_id.values()} == {429, 500}
    assert {r["body"]["error"]["code"] for r in by_id.values()} == {"1302", "500"}
    assert batch["request_counts"]["failed"] == len(by_id) + 1 and 5 <= len(by_id) <= 20
    assert server.stats()["billed"]["batch"] == 30 - len(by_id)

    retry, _ = await api.wait((await api.submit([line(c, chat(texts[c])) for c in by_id]))["id"])
    _, again = await api.content(retry["error_file_id"]) if retry["error_file_id"] else (200, [])
    still = [e["custom_id"] for e in again]
    assert len(still) < len(by_id)  # a retry draws anew
    for custom_id in still:
        async with api.http.post(f"{api.base}/chat/completions", json=chat(texts[custom_id])) as resp:
            assert resp.status == 200
    stats = server.stats()
    assert stats["billed"] == {"online": len(still), "batch": 30 - len(still)}
    assert stats["distinct_prompts_billed"] == 30 and stats["prompts_billed_twice"] == 0
    assert stats["prompts_billed_on_both_apis"] == 0


async def test_the_same_prompt_billed_online_and_in_a_batch_is_caught(api: Api, server: SimulatorThread) -> None:
    """The ledger is per prompt across both APIs: asking online and then in a batch shows up."""
    async with api.http.post(f"{api.base}/chat/completions", json=chat("twice")) as resp:
        online = await resp.json()
    batch, _ = await api.wait((await api.submit([line("a", chat("twice"))]))["id"])
    _, [result] = await api.content(batch["output_file_id"])
    assert result["response"]["body"]["choices"] == online["choices"]
    stats = server.stats()
    assert stats["prompts_billed_twice"] == 1 and stats["prompts_billed_on_both_apis"] == 1
    assert list(server.billed_prompts().values()) == [{"online": 1, "batch": 1}]


async def test_result_files_can_be_missing_for_a_moment_after_completion(api: Api, server: SimulatorThread) -> None:
    """batch_output_404_s: the output file answers 404 right after `completed`, then 200 (instructor#1745)."""
    server.configure(batch_output_404_s=0.3)
    batch, _ = await api.wait((await api.submit([line("a", chat("t"))]))["id"])
    status, [error] = await api.content(batch["output_file_id"])
    assert status == 404 and "error" in error
    statuses: list[int] = []

    async def the_output_file_is_there() -> bool:
        statuses.append((await api.content(batch["output_file_id"]))[0])
        return statuses[-1] == 200

    await until(the_output_file_is_there)
    assert set(statuses[:-1]) <= {404}  # missing for a moment, then there


@pytest.mark.parametrize("asked", [{"auto_delete_input_file": True}, {"auto_delete_input_file": None}])
async def test_auto_delete_removes_the_input_file_once_the_batch_completes(api: Api, asked: dict[str, Any]) -> None:
    """auto_delete_input_file (true, and Zhipu's default when the field is left out): the input's content
    is gone after completion."""
    status, file = await api.upload(jsonl([line("a", chat("t"))]))
    assert status == 200 and (await api.content(file["id"]))[0] == 200
    payload = {"input_file_id": file["id"], "endpoint": "/v4/chat/completions", **asked}
    async with api.http.post(f"{api.base}/batches", json={k: v for k, v in payload.items() if v is not None}) as resp:
        batch = await resp.json()
    await api.wait(batch["id"])
    assert (await api.content(file["id"]))[0] == 404


async def test_batches_are_listed_newest_first_in_pages(api: Api) -> None:
    """GET /batches?limit=&after= pages newest first with has_more and last_id; limit is 1..100."""
    _, file = await api.upload(jsonl([line("a", chat("t"))]))
    ids = [(await api.create(file["id"]))[1]["id"] for _ in range(5)]
    _, page = await api.get("/batches", limit=2)
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    _, rest = await api.get("/batches", limit=10, after=page["last_id"])
    assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert rest["last_id"] == ids[0]
    for bad in (0, 101):
        assert (await api.get("/batches", limit=bad))[0] == 400
    assert (await api.get("/batches/batch_nope"))[0] == 404
