"""Multi-rank tests on real gloo process groups (CPU)."""
