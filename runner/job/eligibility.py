"""The one batch rule: may a job's model go to Zhipu's Batch API on its endpoint, and on what grounds.
The endpoint must have a Batch API, and the model be on Zhipu's list (configs/models.yaml), proved here
by `glm-batch doctor --batch`, or accepted at risk (`run.batch.allow_unconfirmed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from runner.job import catalog
from runner.job.facts import Facts


@dataclass(frozen=True)
class BatchEligibility:
    """Whether a model may go to the Batch API on an endpoint: `basis` is "catalogue" (Zhipu's list),
    "doctor" (proved on this account), "unconfirmed" (run.batch.allow_unconfirmed) or "refused",
    with `why` the one line a refusal prints."""

    allowed: bool
    basis: str
    why: str = ""


BATCH_MODELS_HINT = "glm-4-air-250414, glm-4-plus, glm-4-flashx-250414, glm-4-long or glm-4-flash (free)"


def batch_eligibility(
    model: str,
    info: catalog.ModelInfo,
    endpoint: str,
    base_url: str | None,
    known: Facts,
    allow_unconfirmed: bool,
) -> BatchEligibility:
    """The one batch rule: the Batch API exists on the endpoint, and the model is on Zhipu's list, or
    `glm-batch doctor --batch` proved it here, or the job accepts the risk (allow_unconfirmed)."""
    host = (urlsplit(base_url).hostname or "") if base_url else ""
    if host == "z.ai" or host.endswith(".z.ai"):  # api.z.ai has no Batch API (real-wire.md, Hosts)
        return BatchEligibility(
            False,
            "refused",
            f"endpoint {endpoint} (api.z.ai) has no Batch API; use model.endpoint: zhipu (open.bigmodel.cn) "
            "with a zhipu key for batch and hybrid, or run.mode: online",
        )
    if info.batch.eligible:
        return BatchEligibility(True, "catalogue")
    if known.batch_eligible is True:
        return BatchEligibility(True, "doctor")
    if allow_unconfirmed:
        return BatchEligibility(
            True,
            "unconfirmed",
            f"{model} is not on Zhipu's Batch API list; the batch may fail at validation",
        )
    proved = " (glm-batch doctor --batch found it refused)" if known.batch_eligible is False else ""
    return BatchEligibility(
        False,
        "refused",
        f"{model} is not on Zhipu's Batch API eligibility list{proved}, so its batches would fail at validation; "
        f"use an eligible model ({BATCH_MODELS_HINT}), prove it with `glm-batch doctor JOB --batch`, "
        "or set run.batch.allow_unconfirmed: true to try anyway",
    )
