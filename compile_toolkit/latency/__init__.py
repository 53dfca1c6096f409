"""Pruning to a latency budget: a per-layer latency table measured in the deployment runtime
(:mod:`.table`), the compute layers of a captured graph and the channel groups they read and write
(:mod:`.layers`), and each group's kept width chosen to meet the budget with the most importance
(:mod:`.widths`)."""
