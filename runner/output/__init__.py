"""The output: every input row joined with its answer, samples voted, written through a sink."""
