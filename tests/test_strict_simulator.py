"""The simulator as strict as Zhipu's docs (shared/reference/real-wire.md), with the unknowns as switches.

The native chat body (every batch line, /api/paas/v4/chat/completions) is refused on each documented
rule, and thinks by default where the model thinks. The Anthropic route's unknowns (forced tool choice,
stop sequences, the error shape, thinking by default) are SimConfig switches, checked here through the
real SDK.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import pytest

from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli

KEY = "sim-test-key"


@pytest.fixture
def server() -> Iterator[SimulatorThread]:
    """A simulator of this module's own, answering at once."""
    with SimulatorThread(SimConfig()) as sim:
        yield sim


def chat(model: str = "glm-4.6", **extra: Any) -> dict[str, Any]:
    """A native chat completions body."""
    return {"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": "the food was great"}], **extra}


def native(server: SimulatorThread, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST a native chat completion; the status and the JSON body."""

    async def go() -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{server.native_url}/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
            ) as resp,
        ):
            return resp.status, await resp.json()

    return asyncio.run(go())


TOOL = {"type": "function", "function": {"name": "label", "parameters": {"type": "object"}}}
IMAGE = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "label"}}}, "1214", "Tool choice"),
        ({"tools": [TOOL], "tool_choice": "required"}, "1214", "Tool choice must be auto"),
        ({"stop": ["a", "b"]}, "1214", "stop"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "1214", "response_format"),
        ({"temperature": 1.5}, "1214", "temperature"),
        ({"top_p": 0.001}, "1214", "top_p"),
        ({"messages": [{"role": "user", "content": IMAGE}]}, "1210", "images"),
    ],
    ids=["named tool", "required", "two stops", "json_schema", "temperature", "top_p", "image on text model"],
)
def test_native_bodies_are_refused_on_each_documented_rule(
    server: SimulatorThread, extra: dict[str, Any], code: str, says: str
) -> None:
    status, body = native(server, chat(**extra))
    assert status == 400
    assert body["error"]["code"] == code and says in body["error"]["message"]
    assert "type" not in body and "type" not in body["error"]


def test_native_bodies_within_the_rules_are_answered(server: SimulatorThread) -> None:
    ok = chat(
        tools=[TOOL],
        tool_choice="auto",
        stop=["END"],
        response_format={"type": "json_object"},
        temperature=1,
        top_p=0.01,
    )
    assert native(server, ok)[0] == 200


def test_native_thinking_is_on_by_default_billed_as_output_and_can_eat_a_small_budget(server: SimulatorThread) -> None:
    _, thought = native(server, chat())
    _, quiet = native(server, chat(thinking={"type": "disabled"}))
    assert thought["choices"][0]["message"]["reasoning_content"]
    assert "reasoning_content" not in quiet["choices"][0]["message"]
    assert thought["usage"]["completion_tokens"] > quiet["usage"]["completion_tokens"]  # reasoning is output
    # A label-sized budget is spent inside the reasoning: length, and no answer at all.
    _, cut = native(server, chat(max_tokens=16))
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["message"]["content"] == ""
    # GLM-4.7 always thinks, whatever the request says.
    _, always = native(server, chat(model="glm-4.7", thinking={"type": "disabled"}))
    assert always["choices"][0]["message"]["reasoning_content"]


def messages_create(server: SimulatorThread, **params: Any) -> Any:
    """One Messages call through the real SDK; the Message, or the SDK's exception."""

    async def go() -> Any:
        async with anthropic.AsyncAnthropic(api_key=KEY, base_url=server.url, max_retries=0) as sdk:
            try:
                return await sdk.messages.create(
                    model="glm-4.6", max_tokens=256, messages=[{"role": "user", "content": "great"}], **params
                )
            except anthropic.APIStatusError as exc:
                return exc

    return asyncio.run(go())


FORCED = {
    "tools": [{"name": "label", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "tool", "name": "label"},
}


def test_the_anthropic_route_refuses_forced_tool_choice_only_when_switched_to(server: SimulatorThread) -> None:
    assert messages_create(server, **FORCED).stop_reason == "tool_use"  # "accept", the default
    server.configure(forced_tool_choice="refuse")
    refused = messages_create(server, **FORCED)
    assert isinstance(refused, anthropic.BadRequestError)
    assert "Tool choice must be auto" in str(refused.api_message)
    assert isinstance(messages_create(server, **{**FORCED, "tool_choice": {"type": "any"}}), anthropic.BadRequestError)
    assert messages_create(server, **{**FORCED, "tool_choice": {"type": "auto"}}).stop_reason == "tool_use"


def test_the_anthropic_route_limits_stop_sequences_only_when_switched_to(server: SimulatorThread) -> None:
    assert messages_create(server, stop_sequences=["a", "b"]).type == "message"
    server.configure(anthropic_max_stop_sequences=1)
    refused = messages_create(server, stop_sequences=["a", "b"])
    assert isinstance(refused, anthropic.BadRequestError) and refused.type == "1214"
    assert messages_create(server, stop_sequences=["a"]).type == "message"


def test_error_shape_native_drops_type_and_names_the_code(server: SimulatorThread) -> None:
    server.configure(faults=("429_1113",), fault_rate=1.0)
    anthropic_shaped = messages_create(server)
    assert anthropic_shaped.body == {
        "type": "error",
        "error": {"type": "1113", "message": anthropic_shaped.api_message},
        "request_id": anthropic_shaped.body["request_id"],
    }
    server.configure(error_shape="native")
    native_shaped = messages_create(server)
    assert isinstance(native_shaped, anthropic.RateLimitError)
    assert native_shaped.body == {"error": {"code": "1113", "message": anthropic_shaped.api_message}}
    assert native_shaped.type is None  # what the SDK (and a classifier reading only `type`) sees


def test_the_anthropic_route_can_think_by_default_as_the_native_api_does(server: SimulatorThread) -> None:
    assert [b.type for b in messages_create(server).content] == ["text"]
    server.configure(anthropic_thinking="model")
    assert [b.type for b in messages_create(server).content] == ["thinking", "text"]
    assert [b.type for b in messages_create(server, thinking={"type": "disabled"}).content] == ["text"]


def test_a_batch_job_with_two_stop_words_is_refused_before_sending(make_job, sim: SimulatorThread) -> None:
    job = make_job(model={"name": "glm-4-air-250414", "stop_sequences": ["END", "STOP"]}, run={"mode": "batch"})
    result = cli("validate", str(job.spec))
    assert result.exit_code == 2 and "single stop word" in result.stderr
    assert sim.stats()["requests"] == 0
