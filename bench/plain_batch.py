"""The plain script batch mode is measured against: a 100k-row job through a Batch API by hand.

    python bench/plain_batch.py INPUT.parquet OUT_DIR --base http://127.0.0.1:PORT/api/paas/v4 \
        --template "Summarise: {{ text }}" --system "Be brief." --model glm-4-air-250414

What a careful person writes in an afternoon (issue 23): read the input with polars, render each row
with the sandboxed Jinja2 template, key it with blake2b over the sorted JSON body, write fsynced JSONL
chunks of 50,000 lines, upload each, create a batch each, poll until done, download the result files,
parse every line, and write one Parquet row per input row. No resume, no repairs, no money: the floor
`bench/batch_vs_plain.py` holds glm-batch's batch mode to. Standard library HTTP (urllib), one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHUNK_LINES = 50_000


def call(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """One HTTP call; the decoded JSON answer."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Authorization": "Bearer plain"})
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())


def upload(base: str, path: Path) -> str:
    """A multipart upload of one JSONL file (purpose=batch); the file id."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    answer = call("POST", f"{base}/files", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return str(answer["id"])


def write_chunks(
    frame: pl.DataFrame, template: str, system: str, model: str, out: Path
) -> tuple[list[Path], list[str]]:
    """Every row rendered, keyed and written into fsynced JSONL chunks; the chunk files and each row's key."""
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    tpl = env.from_string(template)
    keys: list[str] = []
    paths: list[Path] = []
    handle = None
    seen: set[str] = set()
    for row in frame.iter_rows(named=True):
        body = {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": tpl.render(row)}],
            "max_tokens": 64,
            "thinking": {"type": "disabled"},
        }
        key = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()
        keys.append(key)
        if key in seen:  # the same request twice: asked once
            continue
        seen.add(key)
        if handle is None or len(seen) % CHUNK_LINES == 1:
            if handle is not None:
                close_synced(handle)
            paths.append(out / f"chunk-{len(paths):04d}.jsonl")
            handle = open(paths[-1], "w", encoding="utf-8")  # noqa: SIM115
        line = {"custom_id": key, "method": "POST", "url": "/v4/chat/completions", "body": body}
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    if handle is not None:
        close_synced(handle)
    return paths, keys


def close_synced(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def run_batches(base: str, paths: list[Path], out: Path) -> list[Path]:
    """Upload, create, poll and download each chunk; the downloaded result files."""
    batches = []
    for path in paths:
        file_id = upload(base, path)
        body = json.dumps({"input_file_id": file_id, "endpoint": "/v4/chat/completions"}).encode()
        batches.append(call("POST", f"{base}/batches", body, {"Content-Type": "application/json"})["id"])
    results = []
    for batch_id in batches:
        wait = 0.05
        while (batch := call("GET", f"{base}/batches/{batch_id}"))["status"] not in ("completed", "failed", "expired"):
            time.sleep(wait)
            wait = min(wait * 2, 0.5)
        for kind in ("output_file_id", "error_file_id"):
            if batch.get(kind):
                dest = out / f"{batch_id}.{kind}.jsonl"
                url = f"{base}/files/{batch[kind]}/content"
                request = urllib.request.Request(url, headers={"Authorization": "Bearer plain"})
                with urllib.request.urlopen(request) as answer:
                    dest.write_bytes(answer.read())
                results.append(dest)
    return results


def read_results(paths: list[Path]) -> pl.DataFrame:
    """Every result line parsed: key, status, answer text and tokens."""
    columns: dict[str, list[Any]] = {k: [] for k in ("key", "status", "response_text", "input_tokens", "output_tokens")}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = json.loads(raw)
                body = line["response"]["body"]
                ok = line["response"]["status_code"] == 200
                columns["key"].append(line["custom_id"])
                columns["status"].append("ok" if ok else "error")
                columns["response_text"].append(body["choices"][0]["message"]["content"] if ok else None)
                usage = body.get("usage") or {}
                columns["input_tokens"].append(usage.get("prompt_tokens"))
                columns["output_tokens"].append(usage.get("completion_tokens"))
    return pl.DataFrame(columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--system", default="")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pl.read_parquet(args.input)
    paths, keys = write_chunks(frame, args.template, args.system, args.model, args.out)
    answers = read_results(run_batches(args.base, paths, args.out))
    output = frame.with_columns(pl.Series("key", keys)).join(answers, on="key", how="left", maintain_order="left")
    output.write_parquet(args.out / "output.parquet")
    assert output.height == frame.height and output["status"].null_count() == 0, "a row has no answer"


if __name__ == "__main__":
    main()
