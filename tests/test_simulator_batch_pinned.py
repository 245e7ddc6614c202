"""The simulated Batch API's result lines, pinned byte for byte: answering a batch in bulk (one parse
a line, the ask made once, bodies not held) gives exactly the lines the line-by-line code gave, for
plain, CJK, tool, JSON-object, thinking, truncated and refused lines, with transient errors, cut and
blocked answers drawn. Only what is random or the clock's (ids, request ids, `created`) is masked."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread

KEY = "pin-key"
PINNED = Path(__file__).parent / "fixtures" / "simulator_batch_lines.jsonl"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}}}
_MASKS = (
    (re.compile(rb'"(id|request_id)": "[0-9]{14}[0-9a-f]{16}"'), rb'"\1": "<id>"'),
    (re.compile(rb'"id": "batch_[0-9]{14}[0-9a-f]{16}"'), rb'"id": "<batch>"'),
    (re.compile(rb'"id": "batch_req_[0-9]{14}[0-9a-f]{16}"'), rb'"id": "<req>"'),
    (re.compile(rb'"created": [0-9]+'), rb'"created": 0'),
)


def body(text: str, model: str = "glm-4.6", system: str = "Be brief.", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return {"model": model, "messages": messages, "max_tokens": 256, "thinking": {"type": "disabled"}, **extra}


def batch_file() -> bytes:
    """Lines of every shape the simulator answers differently."""
    bodies = [body(f"review {i}: it was good") for i in range(8)]
    bodies += [
        body("这个产品很好，我很喜欢"),
        body("label it", tools=[{"type": "function", "function": {"name": "label", "parameters": SCHEMA}}]),
        body("label it", response_format={"type": "json_object"}),
        body("think first", thinking={"type": "enabled"}),
        body("a long answer please " * 3, max_tokens=3),
        body("refused", tool_choice="required"),
        body("text mode", system=f"Answer with JSON that matches this JSON Schema: {json.dumps(SCHEMA)}"),
        body("no max tokens", max_tokens=None),
    ]
    lines = [
        {"custom_id": f"c{i:02d}", "method": "POST", "url": "/v4/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def masked(data: bytes) -> list[bytes]:
    """A result file's lines, ordered by custom_id, with the random and the clock's parts masked."""
    lines = [ln for ln in data.split(b"\n") if ln]
    for pattern, replacement in _MASKS:
        lines = [pattern.sub(replacement, ln) for ln in lines]
    return sorted(lines, key=lambda ln: json.loads(ln)["custom_id"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {KEY}"}) as session:
        yield session


async def results(http: aiohttp.ClientSession, base: str) -> list[bytes]:
    """Upload the file, make a batch, wait for its end; its output and error lines, masked."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", batch_file(), filename="in.jsonl", content_type="application/jsonl")
    async with http.post(f"{base}/files", data=form) as resp:
        file = await resp.json()
    payload = {"input_file_id": file["id"], "endpoint": "/v4/chat/completions"}
    async with http.post(f"{base}/batches", json=payload) as resp:
        batch = await resp.json()
    for _ in range(400):
        async with http.get(f"{base}/batches/{batch['id']}") as resp:
            batch = await resp.json()
        if batch["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    assert batch["status"] == "completed", batch
    out: list[bytes] = []
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        async with http.get(f"{base}/files/{file_id}/content") as resp:
            out += masked(await resp.read())
    return out


async def test_result_lines_are_those_the_line_by_line_simulator_gave(http: aiohttp.ClientSession) -> None:
    config = SimConfig(
        api_keys=(KEY,), seed=7, batch_error_rate=0.1, batch_network_error_rate=0.15, batch_sensitive_rate=0.1
    )
    with SimulatorThread(config) as sim:
        got = await results(http, sim.native_url)
    assert got == PINNED.read_bytes().splitlines()
