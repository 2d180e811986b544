"""The selection ops below every method: their specifications in plain PyTorch (`pyramidkv_select` for
PyramidKVSelect, and StreamingLLM's, ChunkKV's, KVzip's, PyramidInfer's selections), their ONNX functions
(`onnx_select`) and the graph patterns they share (`onnx_patterns`), the Triton-lang kernels spread over the GPU
(`triton_scores`, `triton_topk`, `triton_chunks`, `triton_streaming`; the chains they form: `select_stages`;
launched from Python by `triton_select`) and the TensorRT plugins that run them (`trt_plugin`, `trt_aot`,
`trt_chain`) — every implementation tested against its specification — and the small ONNX graph builder
(`onnx_graph`) the graph writer uses too."""
