"""Benchmark scripts: each prints its figures, the last line one JSON object."""
