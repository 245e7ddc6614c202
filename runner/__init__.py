"""glm-batch: run a YAML job of prompts over table rows against Zhipu's GLM models, durably and cheaply.

The pipeline is in `runner.engine`; every concern has a module of its own: spec, inputs, templates,
prompts, client, retries, limits, executor, store, accounting, progress, simulator, cli.
"""

__version__ = "0.1.0"
