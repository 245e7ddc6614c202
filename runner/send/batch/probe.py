"""The Batch API probe behind `glm-batch doctor --batch`: a 2-line batch on one model, watched up to a
limit, then read for what matters on a first real batch (did it validate; the batch object's shape).
What it uploads and its result files are deleted afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runner.files import write_bytes_atomic
from runner.send.probe import PROMPT, cut


async def probe_batch(native_url: str, key: str, model: str, wait_s: float, label: str) -> dict[str, Any]:
    """A 2-line batch on `model`: upload, create, wait (with a visible timer) up to `wait_s`; what came
    back, the batch object's shape, and whether it passed validation (None: not known in time)."""
    from runner.send.batch.api import BatchAPI
    from runner.send.batch.errors import BatchAPIError, BatchStatusError, classify_api_error
    from runner.send.retries import METHOD_UNSUPPORTED, Verdict

    lines = [
        {
            "custom_id": f"doctor-{i}",
            "method": "POST",
            "url": "/v4/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1},
        }
        for i in (1, 2)
    ]
    out: dict[str, Any] = {"model": model, "label": label, "eligible": None}
    with tempfile.TemporaryDirectory(prefix="glm-batch-doctor-") as tmp:
        path = Path(tmp) / "doctor.jsonl"
        write_bytes_atomic("".join(json.dumps(line) + "\n" for line in lines).encode("utf-8"), path)
        async with BatchAPI(native_url, key, max_attempts=2, not_ready_attempts=2, not_ready_wait_s=0.5) as api:
            try:
                uploaded = await api.upload(path)
            except BatchAPIError as exc:
                out.update(result=f"upload refused: {cut(str(exc), 120)}")
                return out
            try:
                batch = await api.create(uploaded.id, metadata={"glm_batch_doctor": model})
            except BatchAPIError as exc:
                # The request refused (a 4xx that is not the account's or a full queue), or the method refused
                # for this model (1212, which stops a run): not eligible.
                refused = isinstance(exc, BatchStatusError) and (
                    classify_api_error(exc).verdict is Verdict.FAIL or exc.code == METHOD_UNSUPPORTED
                )
                out.update(eligible=False if refused else None, result=f"refused at create: {cut(str(exc), 120)}")
                with contextlib.suppress(BatchAPIError):
                    await api.delete_file(uploaded.id)  # an account holds at most 1,000 files
                return out
            started = time.monotonic()
            timer = _Timer(label)
            delay = 0.2
            while not batch.done and time.monotonic() - started < wait_s:
                timer.show(batch.status, time.monotonic() - started, wait_s)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                batch = await api.retrieve(batch.id)
            timer.close()
            out["shape"] = batch_shape(batch.raw)
            out["status"] = batch.status
            out["seconds"] = round(time.monotonic() - started, 1)
            if batch.status == "failed":
                errors = [f"{e.code} line {e.line}: {e.message}" for e in batch.errors[:3]]
                out.update(eligible=False, result=f"failed validation: {'; '.join(errors) or 'no errors given'}")
            elif batch.status in ("in_progress", "finalizing", "completed"):
                out.update(eligible=True, result=f"passed validation ({batch.status} after {out['seconds']} s)")
            else:
                out.update(result=f"{batch.status} after {out['seconds']} s (validation not known)")
            if not batch.done:
                with contextlib.suppress(BatchAPIError):
                    await api.cancel(batch.id)
                out["result"] += "; cancelled"
            elif batch.output_file_id:
                out["usage"] = await _usage(api, batch.output_file_id, Path(tmp) / "out.jsonl")
            for file_id in (batch.output_file_id, batch.error_file_id):  # at most 1,000 files an account
                if file_id and batch.done:
                    with contextlib.suppress(BatchAPIError):
                        await api.delete_file(file_id)
    return out


async def _usage(api: Any, file_id: str, dest: Path) -> dict[str, int]:
    """Input and output tokens of a result file (what the 2 lines cost)."""
    from runner.send.batch.errors import BatchAPIError

    totals = {"input_tokens": 0, "output_tokens": 0}
    with contextlib.suppress(BatchAPIError, OSError):
        await api.download(file_id, dest)
        text = await asyncio.to_thread(dest.read_text, encoding="utf-8")  # two lines, but off the loop
        for raw in text.splitlines():
            with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):  # a line without usage
                usage = json.loads(raw)["response"]["body"]["usage"]
                totals["input_tokens"] += int(usage.get("prompt_tokens") or 0)
                totals["output_tokens"] += int(usage.get("completion_tokens") or 0)
    return totals


def batch_shape(raw: dict[str, Any]) -> dict[str, Any]:
    """What the batch object looks like: timestamp units, empty ids, counts (docs and service differ)."""
    stamps = {k: v for k, v in raw.items() if k.endswith("_at") and isinstance(v, int | float) and v}
    unit = None
    if stamps:
        unit = "milliseconds" if max(stamps.values()) > 10**11 else "seconds"
    return {
        "id": raw.get("id"),
        "status": raw.get("status"),
        "timestamps": unit,
        "created_at": raw.get("created_at"),
        "output_file_id": raw.get("output_file_id"),
        "error_file_id": raw.get("error_file_id"),
        "request_counts": raw.get("request_counts"),
    }


class _Timer:
    """A visible wait on stderr: rewritten in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tty = sys.stderr.isatty()
        self._last = -10.0

    def show(self, status: str, elapsed: float, limit: float) -> None:
        text = f"batch {self._label}: {status}, {elapsed:.0f} s of at most {limit:.0f} s"
        if self._tty:
            print(f"\r{text}   ", end="", file=sys.stderr, flush=True)
        elif elapsed - self._last >= 10:
            print(text, file=sys.stderr, flush=True)
            self._last = elapsed

    def close(self) -> None:
        if self._tty:
            print(file=sys.stderr)
