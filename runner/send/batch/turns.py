"""The billed turns a later batch round continues (a repair's earlier answers, a cut answer's tokens),
kept in `<round>/turns.jsonl` so a run killed between rounds loses none from its rows' tokens and cost."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from runner.files import space_checked, write_bytes_atomic
from runner.records import Answer, Request
from runner.send.base import Conversation
from runner.send.batch.book import Chunk, read_requests
from runner.send.batch.harvest import Harvester

TURNS = "turns.jsonl"


def save_turns(harvester: Harvester, requests: Iterable[Request], folder: Path) -> None:
    """Write what the harvester holds for `requests` (the next round's) into `folder`'s turns file, a
    line each: `{"key", "turns": [[input, output, thinking, cache_read, cache_creation, model], ...],
    "carry": [input, output, thinking] | null}` (an earlier turn's tokens; its text is the repair's)."""
    lines = []
    for request in requests:
        conversation = harvester.conversations.get(request.key)
        carried = harvester.carry.get(request.key)
        if conversation is None and carried is None:
            continue
        turns = [_tokens(answer) for answer in conversation.answers] if conversation is not None else []
        lines.append(json.dumps({"key": request.key, "turns": turns, "carry": carried}) + "\n")
    if lines:
        folder.mkdir(parents=True, exist_ok=True)
        with space_checked(folder / TURNS):
            write_bytes_atomic("".join(lines).encode("utf-8"), folder / TURNS)


def restore_turns(harvester: Harvester, chunks: Iterable[Chunk]) -> None:
    """Give the harvester back what the turns files of the open chunks' rounds hold."""
    for requests_file in sorted({chunk.requests for chunk in chunks}):
        path = Path(requests_file).parent / TURNS
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        repairing = {r["key"] for r in records if r["turns"]}
        bodies = read_requests(requests_file, repairing)
        for record in records:
            key = record["key"]
            if record["carry"] is not None:
                harvester.carry[key] = tuple(record["carry"])
            if record["turns"] and key in bodies:
                earlier = [_answer(turn) for turn in record["turns"]]
                harvester.conversations[key] = Conversation.resumed(Request(key, bodies[key]), harvester.shape, earlier)


def _tokens(answer: Answer) -> list[int | str | None]:
    return [
        answer.input_tokens,
        answer.output_tokens,
        answer.thinking_tokens,
        answer.cache_read_input_tokens,
        answer.cache_creation_input_tokens,
        answer.model,
    ]


def _answer(turn: list[int | str | None]) -> Answer:
    """An earlier turn as far as a Result needs it: its tokens (its text was the repair's to quote)."""
    input_tokens, output_tokens, thinking, cache_read, cache_creation, model = turn
    return Answer(
        text="",
        thinking=None,
        stop_reason=None,
        input_tokens=int(input_tokens or 0),
        output_tokens=int(output_tokens or 0),
        cache_read_input_tokens=None if cache_read is None else int(cache_read),
        cache_creation_input_tokens=None if cache_creation is None else int(cache_creation),
        request_id=None,
        model=None if model is None else str(model),
        thinking_tokens=int(thinking or 0),
    )
