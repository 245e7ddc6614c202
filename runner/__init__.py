"""glm-batch: run a YAML job of prompts over table rows against Zhipu's GLM models, durably and cheaply.
The public API (runner.api) is imported on first use, so `import runner` stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunResult", "__version__", "aestimate_job", "arun_job", "estimate_job", "load_job", "run_job"]

if TYPE_CHECKING:
    from runner.api import RunResult, aestimate_job, arun_job, estimate_job, load_job, run_job


def __getattr__(name: str) -> Any:
    if name in __all__:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
