"""The simulator's knobs (`SimConfig`) and the faults it can inject, with their Zhipu-shaped bodies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAULTS = (
    "429_1302", "429_1305", "429_1113", "429_1308", "500", "529", "drop", "slow", "stream_error", "200_error",
    "400_1261", "400_1211", "401", "413", "200_html", "hang", "partial_json",
)  # fmt: skip
# The mix used when a rate is given without naming faults: every retryable kind, none that abort a run.
# "slow" and "hang" are left out: each costs the client a whole timeout (600 s by default), which would
# make any default-mix run as slow as its timeout; name them to test timeouts.
RETRYABLE_FAULTS = (
    "429_1302", "429_1305", "500", "529", "drop", "stream_error", "200_error", "200_html", "partial_json",
)  # fmt: skip
# Faults after which the server has still generated the answer, so it bills it (real servers bill a
# request whose client timed out or whose body was cut in transit). Every other fault bills nothing.
BILLED_FAULTS = frozenset({"slow", "hang", "partial_json"})

HTML_502 = "<html><body>502 Bad Gateway</body></html>"

ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "429_1302": (
        429,
        {"type": "error", "error": {"type": "1302", "message": "您的账户已达到速率限制，请您控制请求频率"}},
    ),
    "429_1305": (429, {"error": {"type": "1305", "message": "该模型当前访问量过大，请您稍后再试"}, "type": "error"}),
    "429_1113": (429, {"type": "error", "error": {"type": "1113", "message": "余额不足或无可用资源包,请充值。"}}),
    "500": (500, {"type": "error", "error": {"type": "500", "message": "Internal Error"}}),
    "529": (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "401": (401, {"error": {"message": "token expired or incorrect", "type": "401"}}),
    "1001": (401, {"error": {"message": "Authentication parameter not received in Header", "type": "1001"}}),
    "1211": (
        400,
        {"type": "error", "error": {"type": "1211", "message": "Unknown Model, please check the model code."}},
    ),
    "429_1308": (429, {"type": "error", "error": {"type": "1308", "message": "Usage limit reached for 5 hour."}}),
    "400_1211": (
        400,
        {"type": "error", "error": {"type": "1211", "message": "Unknown Model, please check the model code."}},
    ),
    "400_1261": (400, {"type": "error", "error": {"type": "1261", "message": "Prompt too long"}}),
    "413": (413, {"type": "error", "error": {"type": "request_too_large", "message": "Request too large"}}),
}


@dataclass
class SimConfig:
    """How the simulator behaves; every field can be changed while it runs (`configure`).

    Latency: each answer waits a Gaussian draw with mean `latency_s` and standard deviation
    `latency_jitter_s`, truncated at 0. Refusals over `concurrency_cap` are answered at once.

    Batch API (`/api/paas/v4/files`, `/batches`): a batch validates for `batch_validating_s`, then
    processes `batch_lines_per_s` lines a second (None: all at once), finalizes for
    `batch_finalizing_s` and completes. Times are simulated wall-clock seconds, so tests set them small.
    """

    latency_s: float = 0.0
    latency_jitter_s: float = 0.0  # standard deviation of the latency's Gaussian noise
    concurrency_cap: int | None = None  # per model; above it: 429 with code 1302
    fault_rate: float = 0.0
    faults: tuple[str, ...] = RETRYABLE_FAULTS
    # Deterministic faults: each prompt's first `fault_attempts` requests get faults[0], later ones succeed.
    fault_attempts: int = 0
    fault_match: str | None = None  # when set, only prompts containing this text are ever faulted
    # Structured answers: this share of prompts gets a schema-invalid answer on its first
    # `invalid_turns` turns (a repair turn then gets a valid one, unless invalid_turns is larger).
    invalid_rate: float = 0.0
    invalid_turns: int = 1
    # Sampling: this share of the times a prompt is asked (temperature not 0) gets a different structured
    # answer (another label, other values); twice the share, up to half, for prompts it is unsure of.
    sample_disagreement: float = 0.0
    # Models of given skill (runner.testing.skill): model name -> share of rows it answers wrong, and
    # whether its sample agreement tracks its errors ("informative") or says nothing of them ("flat").
    model_error: dict[str, float] = field(default_factory=dict)
    confidence: str = "informative"

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown simulator faults {sorted(unknown)}; known: {', '.join(FAULTS)}")

    slow_s: float = 30.0  # how long a "slow" fault holds the answer, and a "hang" takes to generate it
    retry_after_s: float | None = None  # sent with 429s when set
    api_keys: tuple[str, ...] | None = None  # None: any non-empty key is valid
    token_scale: float = 1.0  # multiplies every token count (a tokenizer unlike the estimator's)
    seed: int = 0

    # ---- Batch API -------------------------------------------------------------------------------
    batch_max_lines: int = 50_000  # per uploaded file (Zhipu's limit)
    batch_max_bytes: int = 100 * 1024 * 1024  # per uploaded file (Zhipu's limit: 100 MB)
    # True: a file with bad JSON, a bad line, a duplicate custom_id or two models is refused at upload.
    # False: the upload is accepted and the batch made from it fails while validating.
    batch_check_on_upload: bool = True
    batch_validating_s: float = 0.0
    batch_lines_per_s: float | None = None
    batch_finalizing_s: float = 0.0
    batch_cancelling_s: float = 0.0
    batch_expire_after_s: float | None = None  # a batch still in progress this long after it started expires
    # This share of lines (fixed by custom_id and prompt) fails transiently: a 500 or a 429/1302 line.
    batch_error_rate: float = 0.0
    batch_output_404_s: float = 0.0  # result files answer 404 this long after a batch ends (instructor#1745)
    batch_queue_cap: int | None = None  # requests a model may have queued in unfinished batches
    batch_refuse_ineligible: bool = False  # refuse models whose catalogue entry says batch: false
