"""pkv-export: LLaMA-3 / Mistral with a PyramidKV-compressed KV cache, exported into inference engines."""

__version__ = "0.1.0"
