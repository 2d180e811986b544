"""Validation of engines against the PyTorch reference: NIAH and LongBench v1 (data, official prompts and metrics),
resumable and shardable runs, one-context-many-questions runs, sweeps of accuracy against KV cache size, and
their JSON / Markdown / plot reports."""
