"""The simulator's knobs (`SimConfig`) and the faults it can inject, with their Zhipu-shaped bodies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FAULTS = (
    "429_1302", "429_1305", "429_1113", "429_1308", "429_1304", "500", "529", "drop", "slow", "stream_error",
    "200_error", "400_1261", "400_1211", "401", "413", "200_html", "hang", "partial_json", "400_1214", "400_1210",
    "finish_network_error", "finish_sensitive", "400_1212", "500_1231",
)  # fmt: skip
# The mix used when a rate is given without naming faults: every retryable kind, none that abort a run.
# "slow" and "hang" are left out: each costs the client a whole timeout (600 s by default), which would
# make any default-mix run as slow as its timeout; name them to test timeouts.
RETRYABLE_FAULTS = (
    "429_1302", "429_1305", "500", "529", "drop", "stream_error", "200_error", "200_html", "partial_json",
)  # fmt: skip
# Faults after which the server has still generated the answer, so it bills it (real servers bill a
# request whose client timed out or whose body was cut in transit). Every other fault bills nothing.
BILLED_FAULTS = frozenset({"slow", "hang", "partial_json", "finish_network_error", "finish_sensitive"})
# Zhipu's documented per-model batch queue caps (requests in unfinished batches; shared/reference/batch.md).
BATCH_QUEUE_CAPS = {
    "glm-4-plus": 2_000_000,
    "glm-4-air-250414": 2_000_000,
    "glm-4-flashx-250414": 2_000_000,
    "glm-4": 500_000,
    "glm-4-long": 200_000,
    "glm-4v-plus": 10_000,
}
# The Batch API's documented bounds on a create's metadata: keys, and the length of a key and a value.
METADATA_MAX_KEYS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512

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
    "429_1308": (429, {"type": "error", "error": {"type": "1308", "message": "Usage limit reached for 5 hour."}}),
    "429_1304": (429, {"type": "error", "error": {"type": "1304", "message": "已达到当日调用次数限额"}}),
    "400_1211": (
        400,
        {"type": "error", "error": {"type": "1211", "message": "Unknown Model, please check the model code."}},
    ),
    "400_1261": (400, {"type": "error", "error": {"type": "1261", "message": "Prompt too long"}}),
    "400_1214": (400, {"type": "error", "error": {"type": "1214", "message": "Invalid parameter: stop_sequences"}}),
    "400_1210": (400, {"type": "error", "error": {"type": "1210", "message": "Invalid API parameter"}}),
    # Undocumented statuses (real-wire.md [G]): method not supported, duplicate request.
    "400_1212": (400, {"type": "error", "error": {"type": "1212", "message": "当前API不支持该调用方式"}}),
    "500_1231": (500, {"type": "error", "error": {"type": "1231", "message": "重复请求"}}),
    "413": (413, {"type": "error", "error": {"type": "request_too_large", "message": "Request too large"}}),
}


@dataclass
class SimConfig:
    """How the simulator behaves; any field can change while it runs (`configure`). Times are simulated
    wall-clock seconds (tests set them small): latency a Gaussian truncated at 0; a batch validates,
    processes `batch_lines_per_s` lines a second (None: all at once), finalizes, completes."""

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
    # Models of given skill (runner.simulator.skill): model name -> share of rows it answers wrong, and
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

    # ---- what the real service does that its docs leave open (shared/reference/real-wire.md) ---------
    # The native chat body (every batch line, /api/paas/v4/chat/completions) is always as strict as
    # Zhipu's OpenAPI: tool_choice auto only, one stop word, no json_schema, no images on text models,
    # temperature in [0, 1] and top_p in [0.01, 1], thinking on by default where the model thinks.
    # The Anthropic route's behaviour is unknown on these points; each is a switch:
    # "refuse": a tool_choice of {"type": "tool"} or {"type": "any"} is a 400 "Tool choice must be auto".
    forced_tool_choice: Literal["accept", "refuse"] = "accept"
    # "native": every error of the Anthropic route is {"error": {"code", "message"}}, no `type` (api.z.ai).
    error_shape: Literal["anthropic", "native"] = "anthropic"
    anthropic_max_stop_sequences: int | None = None  # None: any number; else more is a 400 code 1214
    # "requested": the Anthropic route thinks only when the request enables it; "model": as the native
    # API does, thinking models think unless the request disables it (GLM-4.7 whatever it says).
    anthropic_thinking: Literal["requested", "model"] = "requested"
    reasoning_tokens: int = 40  # how long a thinking model reasons before it answers (billed as output)

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
    # Requests a model may have queued in unfinished batches: this, else Zhipu's documented cap for the
    # model (BATCH_QUEUE_CAPS), else none.
    batch_queue_cap: int | None = None
    batch_refuse_ineligible: bool = False  # refuse models whose catalogue entry says batch: false
    # Real quirks (real-wire.md): a completed batch shows `output_file_id: ""` for this many looks more
    # (instructor#1745); every batch fails validation with these errors.data items ({code, line,
    # message, param}), the first `batch_fail_validation_times` batches only when that is set.
    batch_output_id_lag_polls: int = 0
    batch_fail_validation: tuple[dict[str, Any], ...] = ()
    batch_fail_validation_times: int | None = None
    batch_result_short_downloads: int = 0  # a result file's first downloads are cut to 60% (a torn last line)
    # Every look at a batch (GET /batches/{id}) / every result file download answers this status instead.
    batch_retrieve_status: int | None = None
    batch_create_status: int | None = None
    batch_upload_status: int | None = None  # every upload answers this (429: too frequent; 434: no file API)
    # An uploaded file is unknown to a create (404 "not found") for this long (GenAI-Showcase#175).
    batch_file_visible_after_s: float = 0.0
    # Unknown on the real service (real-wire.md [U]), so a switch: the list's order, and the unit of every
    # timestamp (real objects use milliseconds, the docs say seconds).
    batch_list_order: Literal["newest", "oldest"] = "newest"
    batch_timestamps: Literal["ms", "s"] = "ms"
    # The error file's line format is undocumented: "response" puts a failed line's status and error body
    # under `response`; "error" gives `response: null` and an `error` whose code is the HTTP status.
    batch_error_line_shape: Literal["response", "error"] = "response"
    # The first `batch_create_late_times` creates (POST /batches) land this long after they were asked:
    # the batch is made, and answered, only then. A client that timed out or died meanwhile never hears
    # of it, yet the batch is made and runs (the double-create window: a lookup finds nothing, a second
    # create follows, and the first lands after it). The delay is read while a create is held: set it
    # long to hold one, then 0 to let it land.
    batch_create_lands_after_s: float | None = None
    batch_create_late_times: int = 1
    batch_download_status: int | None = None
    # The first `batch_forget_times` batches are forgotten (404, as if purged) after this many looks each.
    batch_forget_after_looks: int | None = None
    batch_forget_times: int = 1
    batch_file_cap: int | None = 1000  # files an account may hold (Zhipu: 1,000); an upload past it is refused
    # This share of lines (fixed by custom_id and prompt) ends with finish_reason network_error (a cut
    # answer, billed) or sensitive (blocked, empty, billed).
    batch_network_error_rate: float = 0.0
    batch_sensitive_rate: float = 0.0
    # Answered result lines whose body has no `usage` (billed all the same): Zhipu documents usage on every
    # line, but a line without it must be kept and its tokens estimated, never sent again.
    batch_usage_missing_rate: float = 0.0
