"""The PyramidKVSelect op: its reference semantics (the specification), and later its ONNX function, GPU kernel
and TensorRT plugin, all of which are tested against `trt_plugins.pyramidkv_select.pyramidkv_select`."""
