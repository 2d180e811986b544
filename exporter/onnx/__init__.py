"""The ONNX backend writer: prefill and decode graphs (with the hooks of the chosen method), external weights, the
engine directory."""
