"""The TensorRT backend writer: plans built from the tensorrt-target ONNX graphs with the PyramidKVSelect plugin."""
