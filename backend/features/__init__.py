"""Feature dashboards: the precompute step, logit effects, DFA, the live per-prompt analysis, queries."""
