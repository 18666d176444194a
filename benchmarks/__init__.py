"""Benchmarks of ADNet models: each runs as `python -m benchmarks.<name>` from the repository root."""
