"""The pieces a cluster run (`run.engine: ray`) shares across its workers: one account-wide in-flight limit
and one spending cap, held by a named Ray actor (limiter.ClusterLimiter) and leased to workers in small
grants (slots.LeasedSlots). Sending needs the `ray` extra (`pip install -e ".[ray]"`); sender.RaySender
imports Ray only when a run has rows to render (runner.distributed.cluster).
"""
