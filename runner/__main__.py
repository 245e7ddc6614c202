"""`python -m runner` is the same as the `glm-batch` command."""

from runner.cli import main

main()
