"""Validation of exported engines: LongBench v1 data, prompts and metrics."""
