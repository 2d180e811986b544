"""The ONNX backend writer: prefill and decode graphs, external weights, the engine directory."""
