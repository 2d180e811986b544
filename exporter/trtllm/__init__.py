"""The TensorRT-LLM checkpoint writer (config.json + rank{r}.safetensors) and its reader."""
