"""glm-batch: run a YAML job of prompts over table rows against Zhipu's GLM models, durably and cheaply.

The pipeline is in `runner.engine`; every concern has a module of its own: spec, inputs, templates,
prompts, client, retries, limits, executor, store, accounting, progress, simulator, cli.
"""

import os

# polars allocates with jemalloc, which by default keeps freed pages for seconds; a run works in
# phases (send, compact, join, write) whose peaks then stack up. Returning pages at once kept a
# 200k-row run at 350 MB instead of 550 MB (bench/throughput.py). Must be set before polars loads;
# an operator's own setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")

__version__ = "0.1.0"
