"""Money: prices and tiers, a run's tally and budget, counting tokens before sending, the usage ledger."""
