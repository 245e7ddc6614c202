"""glm-batch: run a YAML job of prompts over table rows against Zhipu's GLM models, durably and cheaply.

The pipeline is in `runner.engine`; every concern has a package or module of its own (see the README's
Layout section).
"""

__version__ = "0.1.0"
