"""What the world sends, by class: each test names a class of hostile answers or inputs and checks the one
defence that makes the whole class pass, through the real CLI (or the real SDK) against the simulator or
a scripted endpoint of the test's own (conftest.messages_endpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from runner.files import read_json_object
from runner.job import catalog
from runner.job.inputs import NAMES_CHECK_VERSION, NAMES_CHECKED, content_identity
from runner.job.resolve import load_job
from runner.send.batch.errors import classify_api_error, status_error
from runner.send.batch.executor import NO_ROOM_LOOKS
from runner.send.batch.files import BatchFileWriter, queue_caps
from runner.send.batch.native_results import classify_failure, parse_result_line
from runner.send.retries import Verdict
from runner.simulator.config import BATCH_QUEUE_CAPS
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, messages_endpoint, sample_rows
from tests.test_error_shapes import online_fault

# ---- every business code has one meaning, on every wire and in either error shape ----------------------

CODES = [("400_1212", 400, "1212", Verdict.ABORT), ("500_1231", 500, "1231", Verdict.RETRY)]


@pytest.mark.parametrize("shape", ["anthropic", "native"])
@pytest.mark.parametrize(("fault", "status", "code", "verdict"), CODES, ids=[c[2] for c in CODES])
def test_method_unsupported_stops_and_a_duplicate_request_is_retried_on_the_messages_route(
    shape: str, fault: str, status: int, code: str, verdict: Verdict
) -> None:
    """1212 (method not supported) is the same for every row: the run stops, as for 1220-1222. 1231
    (duplicate request: the same one is being processed) is asked again later, and may be billed twice."""
    classified = online_fault(fault, shape)
    assert (classified.verdict, classified.type) == (verdict, f"{status}/{code}")
    assert classified.maybe_billed is (code == "1231")


@pytest.mark.parametrize("shape", ["code", "type"])
@pytest.mark.parametrize(("fault", "status", "code", "verdict"), CODES, ids=[c[2] for c in CODES])
def test_method_unsupported_and_duplicate_request_mean_the_same_in_batch_lines_and_batch_api_answers(
    shape: str, fault: str, status: int, code: str, verdict: Verdict
) -> None:
    """The code decides, whatever HTTP status it came with (both are undocumented: real-wire.md [G])."""
    body = {"error": {shape: code, "message": "refused"}}
    line = json.dumps({"custom_id": "r1", "response": {"status_code": 400, "body": body}})
    assert classify_failure(parse_result_line(line)) is verdict
    answer = status_error(400, json.dumps(body).encode(), {}, "POST /batches")
    assert classify_api_error(answer).verdict is verdict


def test_a_run_answered_1212_stops_at_once_naming_the_code_and_what_to_check(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(faults=("400_1212",), fault_rate=1.0, error_shape="native")
    files = make_job(sample_rows(200), run={"concurrency": 4})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "1212" in last and "model.endpoint" in last, last
    assert sim.stats()["requests"] <= 4 * 2  # the workers' first requests; none sent again


def test_a_run_answered_1231_now_and_then_answers_every_row_and_counts_what_may_be_billed_twice(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(faults=("500_1231",), fault_rate=0.3)
    files = make_job(sample_rows(40), run={"max_attempts": 12})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    refused = sim.stats()["outcomes"]["500_1231"]
    assert refused > 0
    summary = json.loads(files.summary.read_text())
    assert summary["cost"]["maybe_billed_twice"]["requests"] == refused


# ---- every input reader refuses a name that stands for two values ---------------------------------------


def _parquet_with_twice_named(path: Path, struct: bool) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    if struct:
        fields = pa.StructArray.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
        table = pa.Table.from_arrays([pa.array(["r1"]), fields], names=["id", "text"])
    else:
        table = pa.Table.from_arrays([pa.array(["r1"]), pa.array(["a"]), pa.array(["b"])], names=["id", "text", "text"])
    pq.write_table(table, path)


TWICE = {
    "csv header": ("in.csv", b"id,text,text\nr1,first,second\n", "the header", "text"),
    "jsonl line": (
        "in.jsonl",
        b'{"id":"r1","text":"a"}\n{"id":"r2","text":"first","text":"second"}\n',
        "line 2",
        "text",
    ),
    "jsonl nested object": ("in.ndjson", b'{"id":"r1","text":{"v":[{"k":1,"k":2}]}}\n', "line 1", "k"),
    "parquet column": ("in.parquet", False, "its schema", "text"),
    "parquet struct field": ("in.parquet", True, "its schema", "text"),
}


@pytest.mark.parametrize(("name", "content", "place", "key"), TWICE.values(), ids=TWICE.keys())
def test_an_input_naming_a_column_or_key_twice_is_refused_with_file_place_and_name_before_anything_is_sent(
    make_job: Callable[..., JobFiles],
    sim: SimulatorThread,
    tmp_path: Path,
    name: str,
    content: object,
    place: str,
    key: str,
) -> None:
    """Readers settle a repeated name silently (polars keeps a JSONL line's first `text`, renames a CSV's
    second one): every format is refused alike, naming the file, the line where there is one, and the name."""
    data = tmp_path / "data" / name
    data.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        _parquet_with_twice_named(data, struct=bool(content))
    files = make_job(input={"paths": [f"data/{name}"]})
    for command in ("validate", "run"):
        result = cli(command, str(files.spec))
        assert result.exit_code == 2, result.stderr[-2000:]
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert f"{name}: {place} names {key!r} twice" in line, line
    assert sim.stats()["requests"] == 0


def finished_jsonl_job(make_job: Callable[..., JobFiles], tmp_path: Path) -> tuple[Path, bytes, JobFiles]:
    """A job over a 20-line JSONL input (ids r0..r19, texts t0..t19) that has run to the end: the input,
    its bytes and the job's files."""
    data = tmp_path / "data" / "in.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    good = b"".join(json.dumps({"id": f"r{i}", "text": f"t{i}"}).encode() + b"\n" for i in range(20))
    data.write_bytes(good)
    files = make_job(input={"paths": ["data/in.jsonl"], "id_column": "id"})
    assert cli("run", str(files.spec)).exit_code == 0
    return data, good, files


def rewrite_keeping_size_and_mtime(data: Path, content: bytes) -> None:
    """Write `content` over `data` in place, then put its mtime back (as rsync -t or touch -r would): the
    size, mtime and inode are as before, only the ctime tells."""
    before = data.stat()
    assert len(content) == before.st_size and content != data.read_bytes()
    data.write_bytes(content)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = data.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_an_input_passes_the_name_check_once_per_content_and_any_change_to_it_is_checked_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """The JSONL check parses every line in Python (about 1.5 s a million lines), so a cron re-run of an
    unchanged input does not pay it again: what passed is recorded by content identity in the state
    directory. A write in place, the same size and its mtime put back, changes the ctime: checked again."""
    data, good, files = finished_jsonl_job(make_job, tmp_path)
    record = load_job(files.spec).state_dir / NAMES_CHECKED
    assert (read_json_object(record) or {}).get("passed") == [content_identity(data)]

    rewrite_keeping_size_and_mtime(data, good.replace(b'{"id": "r1", "text": "t1"}', b'{"id": "r1", "id":   "t1"}'))
    for command in ("validate", "run"):
        result = cli(command, str(files.spec))
        assert result.exit_code == 2 and "line 2 names 'id' twice" in result.stderr, result.stderr[-2000:]

    # The record is what spares the parse: one naming this very content is trusted (here, forged).
    record.write_text(json.dumps({"version": NAMES_CHECK_VERSION, "passed": [content_identity(data)]}))
    assert "names 'id' twice" not in cli("validate", str(files.spec)).stderr


# ---- usage may come in message_start, message_delta, both, or neither --------------------------------------


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _start(usage: object = "absent") -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "glm-4.6",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if usage != "absent":
        message["usage"] = usage
    return {"type": "message_start", "message": message}


def _delta(usage: object = "absent") -> dict[str, Any]:
    event: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if usage != "absent":
        event["usage"] = usage
    return event


_TEXT = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a fine product, " * 8}},
    {"type": "content_block_stop", "index": 0},
]
_ZERO = {"input_tokens": 0, "output_tokens": 0}
# (message_start usage, message_delta usage, input_tokens, output_tokens): None where it must be estimated.
USAGE_SHAPES = {
    "zhipu: zeros first, all in the delta": (_ZERO, {"input_tokens": 12, "output_tokens": 30}, 12, 30),
    "anthropic: input first, output in the delta": (
        {"input_tokens": 12, "output_tokens": 1},
        {"output_tokens": 30},
        12,
        30,
    ),
    "both carry all": ({"input_tokens": 12, "output_tokens": 1}, {"input_tokens": 12, "output_tokens": 30}, 12, 30),
    "no usage in message_start": ("absent", {"input_tokens": 12, "output_tokens": 30}, 12, 30),
    "null usage in message_start": (None, {"input_tokens": 12, "output_tokens": 30}, 12, 30),
    "delta lacks input_tokens, start has zeros": (_ZERO, {"output_tokens": 30}, None, 30),
    "delta's input_tokens null": (_ZERO, {"input_tokens": None, "output_tokens": 30}, None, 30),
    "no usage in message_delta": ({"input_tokens": 12, "output_tokens": 1}, "absent", 12, None),
    "null usage in message_delta": ({"input_tokens": 12, "output_tokens": 1}, None, 12, None),
    "all read from the cache: input 0 is a count": (
        _ZERO,
        {**_ZERO, "output_tokens": 30, "cache_read_input_tokens": 40},
        0,
        30,
    ),
    "no usage anywhere": ("absent", "absent", None, None),
    "null counts everywhere": (
        {"input_tokens": None, "output_tokens": None},
        {"input_tokens": None, "output_tokens": None},
        None,
        None,
    ),
}


@pytest.mark.parametrize(("start", "delta", "input_tokens", "output_tokens"), USAGE_SHAPES.values(), ids=USAGE_SHAPES)
def test_a_streamed_answer_is_kept_once_with_the_most_complete_usage_or_an_estimate_it_says_is_one(
    make_job: Callable[..., JobFiles],
    start: object,
    delta: object,
    input_tokens: int | None,
    output_tokens: int | None,
) -> None:
    """The answer was generated, so it is billed: it is kept (never asked again, paying twice), its usage
    the most complete of both events; a count no event gave is estimated (the prompt, the answer's text),
    never 0, and the row says which count is an estimate."""
    asked: list[int] = []

    async def handler(request: Any) -> Any:
        from aiohttp import web

        await request.read()
        asked.append(1)
        body = _sse(_start(start), *_TEXT, _delta(delta), {"type": "message_stop"})
        return web.Response(body=body, headers={"content-type": "text/event-stream"})

    with messages_endpoint(handler) as url:
        files = make_job(rows=sample_rows(3), model={"endpoint": url, "stream": True})
        result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert len(asked) == 3  # each row asked once: a billed answer is never asked again
    out = pl.read_parquet(files.output)
    for row in out.iter_rows(named=True):
        note = row["error_message"] or ""
        for name, expected in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            if expected is None:
                assert row[name] > 0 and f"{name} estimated" in note, (row[name], note)
            else:
                assert row[name] == expected and f"{name} estimated" not in note, (row[name], note)
        assert row["cost"] > 0
    if input_tokens is None or output_tokens is None:
        assert "usage_estimated" in result.stderr


STREAM_ERRORS = {
    "anthropic": {"type": "error", "error": {"type": "1113", "message": "arrears"}},
    "native": {"error": {"code": "1113", "message": "arrears"}},
}


@pytest.mark.parametrize("named", [True, False, None], ids=["event: error", "data only", "plain JSON"])
@pytest.mark.parametrize("midway", [False, True], ids=["at once", "midway"])
@pytest.mark.parametrize("shape", STREAM_ERRORS)
def test_a_stream_ending_in_no_balance_stops_the_run_whatever_the_error_events_shape(
    make_job: Callable[..., JobFiles], shape: str, midway: bool, named: bool | None
) -> None:
    """A stream's error event, in either of Zhipu's shapes, named `event: error` or sent as `data:` alone
    (as OpenAI-style streams send errors; the SDK skips an event with no name, so the stream only looked
    cut off and every row was asked again): a 1113 stops the run at the first row."""
    asked: list[int] = []

    async def handler(request: Any) -> Any:
        from aiohttp import web

        await request.read()
        asked.append(1)
        if named is None:  # the whole body, as a JSON error answer with status 200
            return web.json_response(STREAM_ERRORS[shape])
        error = ("event: error\n" if named else "") + f"data: {json.dumps(STREAM_ERRORS[shape])}\n\n"
        body = (_sse(_start(_ZERO), *_TEXT[:2]) if midway else b"") + error.encode()
        return web.Response(body=body, headers={"content-type": "text/event-stream"})

    with messages_endpoint(handler) as url:
        files = make_job(rows=sample_rows(10), model={"endpoint": url, "stream": True}, run={"concurrency": 1})
        result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    assert "1113" in result.stderr.strip().splitlines()[-1]
    assert len(asked) == 1


WHOLE_USAGE = {
    "input null": ({"input_tokens": None, "output_tokens": 30}, None, 30),
    "input zero": ({"input_tokens": 0, "output_tokens": 30}, None, 30),
    "output left out": ({"input_tokens": 12}, 12, None),
    "usage null": (None, None, None),
    "input 0, all read from the cache": ({"input_tokens": 0, "output_tokens": 3, "cache_read_input_tokens": 40}, 0, 3),
    "usage left out": ("absent", None, None),
}


@pytest.mark.parametrize(("usage", "input_tokens", "output_tokens"), WHOLE_USAGE.values(), ids=WHOLE_USAGE)
def test_a_whole_answer_without_a_count_is_kept_once_with_an_estimate_it_says_is_one(
    make_job: Callable[..., JobFiles], usage: object, input_tokens: int | None, output_tokens: int | None
) -> None:
    asked: list[int] = []

    async def handler(request: Any) -> Any:
        from aiohttp import web

        await request.read()
        asked.append(1)
        body: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "glm-4.6"}
        body |= {"content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn"}
        if usage != "absent":
            body["usage"] = usage
        return web.json_response(body)

    with messages_endpoint(handler) as url:
        files = make_job(rows=sample_rows(2), model={"endpoint": url})
        result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert len(asked) == 2
    for row in pl.read_parquet(files.output).iter_rows(named=True):
        for name, expected in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            assert row[name] == expected if expected is not None else row[name] > 0
            assert (f"{name} estimated" in (row["error_message"] or "")) is (expected is None)


# ---- a batch chunk never exceeds a limit it could not pass, nor waits for room that cannot come -------------

BATCH_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.05}


def test_a_chunk_bigger_than_the_models_queue_stops_the_run_at_once_saying_what_to_lower(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The account's queue holds 150 requests of the model, the chunk is 300 and no batch of the job runs
    to make room: waiting would never end. The run stops (exit 3) in a few looks, names the knob, and
    leaves nothing at Zhipu: no batch made, its input file deleted, nothing billed."""
    sim.configure(batch_queue_cap=150)
    batch = {"mode": "batch", "batch": BATCH_POLL}
    files = make_job(rows=sample_rows(300), model={"name": "glm-4-air-250414"}, run=batch)
    run = subprocess.run(  # a child process: without the defence it waits for ever, and this bounds the test
        [sys.executable, "-m", "runner", "run", str(files.spec), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert run.returncode == 3, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "no room" in last and "lower run.batch.max_requests" in last and "300 requests" in last, last
    stats = sim.stats()
    assert stats["outcomes"]["batch_queue_full"] >= NO_ROOM_LOOKS  # a few looks, then the answer
    assert stats["outcomes"].get("batch_created", 0) == 0 and stats["files"] == 0
    assert stats["billed"]["batch"] == 0


def test_the_catalogue_knows_each_documented_queue_cap_and_a_file_is_never_bigger_than_its_models(
    tmp_path: Path,
) -> None:
    """configs/models.yaml holds Zhipu's per-model queue caps (the simulator's world holds the same);
    a batch file for a model with a cap below run.batch.max_requests is split at the cap."""
    known = queue_caps()
    assert known == {model: cap for model, cap in BATCH_QUEUE_CAPS.items() if model in catalog.models()}
    with BatchFileWriter(tmp_path, max_requests=50_000, queue_caps={"glm-4v-plus": 4}) as writer:
        for index in range(10):
            writer.add(f"r{index}", {"model": "glm-4v-plus", "messages": [{"role": "user", "content": "hi"}]})
            writer.add(f"s{index}", {"model": "glm-4-plus", "messages": [{"role": "user", "content": "hi"}]})
    lines = sorted((file.model, file.lines) for file in writer.files)
    assert lines == [("glm-4-plus", 10), ("glm-4v-plus", 2), ("glm-4v-plus", 4), ("glm-4v-plus", 4)]


def test_a_request_too_big_for_any_batch_file_fails_its_row_saying_why_and_the_others_are_answered(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    rows = sample_rows(6)
    rows[2]["text"] = "a long review " * 400  # about 5.6 kB: over the 3,000 bytes a file may hold here
    batch = {**BATCH_POLL, "max_bytes": 3000}
    files = make_job(rows=rows, model={"name": "glm-4-air-250414"}, run={"mode": "batch", "batch": batch})
    result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr[-2000:]  # a row failed; not an internal error (exit 70)
    out = pl.read_parquet(files.output).sort("id")
    assert out.get_column("status").to_list() == ["ok", "ok", "error", "ok", "ok", "ok"]
    failed = out.row(2, named=True)
    assert failed["error_type"] == "batch_line_too_large" and failed["attempts"] == 0
    assert "run.batch.max_bytes is 3,000" in failed["error_message"]
    assert sim.stats()["billed"]["batch"] == 5


# ---- every body read from the network or a file is bounded ------------------------------------------------

MB = 1 << 20
HUGE_MB = 200  # what the endpoint would send: far past MAX_ANSWER_BYTES (64 MB)


async def _huge(request: Any, shape: str, sent: list[int]) -> Any:
    """A body of HUGE_MB in `shape`, a megabyte at a time, counting in `sent` what the client took
    before it hung up."""
    from aiohttp import web

    status = 429 if shape == "error body" else 200
    stream = shape == "stream"
    response = web.StreamResponse(
        status=status, headers={"content-type": "text/event-stream" if stream else "application/json"}
    )
    if shape == "declared length":
        response.content_length = HUGE_MB * MB
    await response.prepare(request)
    piece = "x" * MB
    if stream:
        head = _sse(_start(_ZERO), _TEXT[0])
        chunk = _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
    else:
        head = b'{"type": "error", "error": {"type": "1302", "message": "' if status == 429 else b'{"a": "'
        chunk = piece.encode()
    try:
        await response.write(head)
        for _ in range(HUGE_MB):
            await response.write(chunk)
            sent.append(len(chunk))
    except ConnectionError:
        pass  # the client hung up: the point
    return response


@pytest.mark.parametrize("shape", ["whole answer", "declared length", "stream", "error body"])
def test_an_endless_answer_fails_its_row_without_taking_the_memory_and_the_others_are_answered(
    make_job: Callable[..., JobFiles], shape: str
) -> None:
    """One row's answer would be 200 MB (a JSON body, one that declares it, a stream, an error body):
    the client reads at most 64 MB of it and hangs up, the row fails as answer_too_large (not asked
    again: it would be as large), and the others are answered."""
    sent: list[int] = []

    async def handler(request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        if "HUGE" in json.dumps(body):
            return await _huge(request, shape, sent)
        events = _sse(
            _start(_ZERO), *_TEXT, _delta({"input_tokens": 12, "output_tokens": 30}), {"type": "message_stop"}
        )
        if body.get("stream"):
            return web.Response(body=events, headers={"content-type": "text/event-stream"})
        message = {"id": "m", "type": "message", "role": "assistant", "model": "glm-4.6", "stop_reason": "end_turn"}
        message |= {"content": [{"type": "text", "text": "fine"}], "usage": {"input_tokens": 12, "output_tokens": 3}}
        return web.json_response(message)

    rows = sample_rows(4)
    rows[1]["text"] = "HUGE"
    with messages_endpoint(handler) as url:
        files = make_job(rows=rows, model={"endpoint": url, "stream": shape == "stream"}, run={"max_attempts": 2})
        result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr[-2000:]
    out = pl.read_parquet(files.output).sort("id")
    assert out.get_column("status").to_list() == ["ok", "error", "ok", "ok"]
    failed = out.row(1, named=True)
    assert failed["error_type"] == "answer_too_large" and failed["attempts"] == 1, failed
    assert "past the 67,108,864 bytes" in failed["error_message"]
    assert sum(sent) < 96 * MB, sum(sent) / MB  # the bound, and what the sockets buffer on the way


# ---- the batch folder stops taking writes while results come back ------------------------------------------


def test_a_result_file_the_state_folder_cannot_take_stops_the_run_as_a_state_failure_and_the_next_run_collects_it(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Downloading a batch's result file into the job's state folder fails (here a directory stands where
    the file goes; a read-only or vanished folder, an I/O error alike): the run stops as a state failure
    (exit 74, one line, the resume command), not an internal error; the next run collects the batch,
    paid once."""
    files = make_job(
        rows=sample_rows(20), model={"name": "glm-4-air-250414"}, run={"mode": "batch", "batch": BATCH_POLL}
    )
    blocker = files.output.parent / ".glm-batch" / "job" / "batches" / "round-0000-0000.output.jsonl.part"
    blocker.mkdir(parents=True)
    first = cli("run", str(files.spec))
    assert first.exit_code == 74, first.stderr[-2000:]
    last = first.stderr.strip().splitlines()[-1]
    assert "stopped taking writes" in last and "Is a directory" in last and "glm-batch run" in last, last
    blocker.rmdir()
    again = cli("run", str(files.spec))
    assert again.exit_code == 0, again.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("status").to_list() == ["ok"] * 20
    assert sim.stats()["billed"]["batch"] == 20


# ---- the key goes to the endpoint and nowhere else ----------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_an_endpoint_that_redirects_stops_the_run_and_the_key_never_reaches_where_it_points(
    make_job: Callable[..., JobFiles], status: int
) -> None:
    """A proxy or a moved endpoint answers with a redirect to another host. Following it would send the
    key along (httpx drops Authorization across hosts, but not x-api-key): the run stops (exit 3) saying
    so, and the other host never hears from us."""
    reached: list[dict[str, str]] = []

    async def elsewhere(request: Any) -> Any:
        from aiohttp import web

        reached.append(dict(request.headers))
        return web.json_response({})

    with messages_endpoint(elsewhere) as other:

        async def redirect(request: Any) -> Any:
            from aiohttp import web

            return web.Response(status=status, headers={"location": f"{other}/v1/messages"})

        with messages_endpoint(redirect) as url:
            files = make_job(rows=sample_rows(5), model={"endpoint": url})
            result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"({status}" in last and "redirects elsewhere" in last and "model.endpoint" in last, last
    assert reached == []


# ---- a batch result line may come without usage: kept, estimated, never paid twice -------------------------


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_batch_answer_without_usage_is_kept_once_with_an_estimate_it_says_is_one(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, rate: float
) -> None:
    """Zhipu documents `usage` on every result line, but a line without it was answered and billed all the
    same: the row keeps the answer, its counts estimated (the prompt from the request, the output from
    the answer's text), never 0, and it says which counts are estimates. Nothing is sent twice, and a
    re-run sends nothing."""
    sim.configure(batch_usage_missing_rate=rate)
    rows = sample_rows(40)
    files = make_job(rows=rows, model={"name": "glm-4-air-250414"}, run={"mode": "batch", "batch": BATCH_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert out.get_column("status").to_list() == ["ok"] * len(rows)
    estimated = out.filter(pl.col("error_message").fill_null("").str.contains("input_tokens estimated"))
    assert estimated.height == len(rows) if rate == 1.0 else 0 < estimated.height < len(rows)
    assert (estimated.get_column("input_tokens") > 0).all() and (estimated.get_column("cost") > 0).all()
    stats = sim.stats()
    assert stats["prompts_billed_twice"] == 0 and stats["billed"]["online"] == 0, stats
    assert cli("run", str(files.spec)).exit_code == 0
    assert sim.stats()["billed"] == stats["billed"]


def test_doctor_reads_a_probe_batch_whose_lines_have_no_usage_without_a_traceback(sim: SimulatorThread) -> None:
    """doctor --batch sums what its 2-line batches cost: a line without usage counts nothing, and the
    probe still reports the batch as taken."""
    sim.configure(batch_usage_missing_rate=1.0)
    result = cli("doctor", "--endpoint", sim.url, "--model", "glm-4.6", "--batch", "--batch-wait", "20", "--json")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    report = json.loads(result.stdout)
    found = {c["name"]: c for c in report["checks"]}
    assert found["batch glm-4.6"]["ok"] is True, found


# ---- every HTTP body is read bounded, the tokenizer's too ------------------------------------------------

TOKENIZER_ANSWERS = {
    "over a megabyte": (200, b'{"usage": {"prompt_tokens": 7}, "pad": "' + b"x" * (8 << 20) + b'"}'),
    "html": (200, b"<html><body>502 Bad Gateway</body></html>"),
    "an error object": (200, b'{"error": {"code": "1214", "message": "bad"}}'),
    "a count that is not one": (200, b'{"usage": {"prompt_tokens": "many"}}'),
    "no usage": (200, b'{"id": "tok"}'),
    "a redirect": (302, b""),
}


@pytest.mark.parametrize(("status", "body"), TOKENIZER_ANSWERS.values(), ids=TOKENIZER_ANSWERS)
def test_estimate_exact_refuses_a_tokenizer_answer_that_is_no_count_in_one_line_reading_at_most_a_bound(
    make_job: Callable[..., JobFiles], status: int, body: bytes
) -> None:
    """`estimate --exact` reads each tokenizer answer through the one bounded reader (runner.send.base.
    read_at_most): a body over its bound, or one that holds no token count, ends the estimate with one
    line saying to try without --exact (exit 2), no traceback, no redirect followed."""
    served: list[int] = []

    async def handler(request: Any) -> Any:
        from aiohttp import web

        await request.read()
        served.append(1)
        headers = {"location": "http://127.0.0.1:9/elsewhere"} if status == 302 else {}
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    with messages_endpoint(handler, path="/api/paas/v4/tokenizer") as url:
        files = make_job(rows=sample_rows(3), model={"endpoint": url})
        result = cli("estimate", str(files.spec), "--exact")
    assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:])
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "tokenizer API" in line and "without --exact" in line, line
    assert served


def test_no_module_reads_an_http_body_but_through_a_bounded_reader() -> None:
    """The class, not the case: aiohttp bodies are read by runner.send.base.read_at_most only, and the
    SDK's by its bounded transport (runner.send.client.BoundedTransport); the simulator serves, it is
    not a client. A new `await x.json()` / `.read()` / `.text()` on a response anywhere else fails here."""
    import re

    package = Path(__file__).parent.parent / "runner"
    unbounded = re.compile(r"await [\w.]+\.(json|read|text)\(\)|\.content\.read\(")
    bounded_by_transport = {"send/client.py"}  # reads what BoundedTransport already cut at MAX_ANSWER_BYTES
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if "simulator" not in path.parts and str(path.relative_to(package)) not in bounded_by_transport
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if unbounded.search(line)
    ]
    assert found == []


# ---- a refusal's advice names the knob that mends it, in the direction that mends it ----------------------


def test_an_upload_refused_for_the_accounts_file_count_says_to_delete_files_or_use_fewer_larger_ones(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Zhipu keeps at most 1,000 files an account (the refusal's code is undocumented). Smaller files
    (a lower run.batch.max_requests) would make it worse: the advice says to delete files (naming the
    command) or raise max_requests. A create refused after the upload is the file against the account's
    limits: there, lowering them is the advice."""
    sim.configure(batch_file_cap=0)
    batch = {"mode": "batch", "batch": {**BATCH_POLL, "max_requests": 10}}
    files = make_job(rows=sample_rows(30), model={"name": "glm-4-air-250414"}, run=batch)
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "glm-batch cancel JOB.yaml --purge" in last and "raise run.batch.max_requests, now 10" in last, last
    assert "lower run.batch.max_requests" in last.split("if the file is over")[1], last
    assert sim.stats()["billed"]["batch"] == 0

    sim.configure(batch_file_cap=1000, batch_create_status=400)
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "POST /batches" in last and "lower them to match" in last and "--purge" not in last, last
    assert sim.stats()["files"] == 0 and sim.stats()["billed"]["batch"] == 0


# ---- the state directory is the runner's own: never a folder holding the job's files ----------------------


@pytest.mark.parametrize("state_dir", ["data", ".", "{tmp}"], ids=["the input's folder", "the spec's", "absolute"])
def test_a_state_directory_holding_the_input_or_the_spec_is_refused_before_anything_is_written(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path, state_dir: str
) -> None:
    """The runner manages everything in its state directory (a crash sweep deletes `*.tmp` files in it at any
    depth, journals found there are read and removed): `output.state_dir: data` would sweep the user's
    files beside the input. Refused in one line (exit 2), and the user's file is untouched."""
    files = make_job(rows=sample_rows(3))
    mine = tmp_path / "data" / "notes.tmp"
    mine.write_text("the user's own")
    for command in ("validate", "run"):
        result = cli(command, str(files.spec), "--set", f"output.state_dir={state_dir.format(tmp=tmp_path)}")
        assert result.exit_code == 2, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert "output.state_dir" in line and "a folder of its own" in line and "Traceback" not in line, line
    assert mine.read_text() == "the user's own"
    assert sim.stats()["requests"] == 0


def test_a_structured_batch_answer_without_usage_is_repaired_and_kept_never_paid_twice(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The same on a schema job where half the first answers break the schema: an answer without usage
    waits for its request's body to be priced, then goes on to its repair turn like any other."""
    sim.configure(batch_usage_missing_rate=1.0, invalid_rate=0.5, invalid_turns=1)
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
        "required": ["sentiment"],
    }
    files = make_job(
        rows=sample_rows(30),
        model={"name": "glm-4-air-250414"},
        run={"mode": "batch", "batch": BATCH_POLL},
        output={"path": "out/job.parquet", "schema": schema, "max_repairs": 1},
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert set(out.get_column("status")) == {"ok"}
    assert out.get_column("repairs").sum() > 0
    assert out.get_column("error_message").str.contains("input_tokens estimated").all()
    assert sim.stats()["prompts_billed_twice"] == 0


def test_an_input_rewritten_in_place_with_its_size_and_mtime_put_back_is_planned_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """The row map says which request answers which row; it is reused while its inputs are unchanged. A
    write in place that keeps the size and puts the mtime back (rsync -t, touch -r) still changes the
    ctime, so the changed row is asked again and its old answer is not given to its new text."""
    data, good, files = finished_jsonl_job(make_job, tmp_path)
    asked = sim.stats()["requests"]

    rewrite_keeping_size_and_mtime(data, good.replace(b'"text": "t1"}', b'"text": "u1"}'))
    assert cli("run", str(files.spec)).exit_code == 0
    assert sim.stats()["requests"] == asked + 1  # the changed row alone, the other 19 from earlier answers
