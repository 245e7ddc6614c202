"""The cascade (`output.cascade`): a cheap proxy model answers every row, an oracle model a calibration
sample and the rows the proxy is unsure of, with BARGAIN's guarantee on agreement with the oracle.
`threshold` is the method (pure, replayable), `bounds` its statistics, `stages` runs it on the engine."""
