"""The TensorRT backend writer: plans built from the tensorrt-target ONNX graphs, each selection node run as its
chain of `pkv` kernel plugins."""
