"""What onnxruntime's CUDA execution provider cannot run of an onnxruntime-target engine, found before a session
is made, so `--device cuda` refuses it in one line instead of running it wrongly or on the CPU.

`com.microsoft.GroupQueryAttention` on CUDA (onnxruntime 1.31, contrib_ops/cuda/bert/group_query_attention.cc):
kernels are registered for fp16 and bf16 only, so in an fp32 graph the node silently falls back to the CPU
provider (every step copies the caches between devices); and the CUDA kernel refuses an `attention_bias` input.
The graphs pass one where the op's own masking (causal, `seqlens_k`, a slot-based `local_window_size`) cannot
say what is visible: per-head cache lengths (KVzip's decode), a sliding window over a compressed cache measured
by the tokens' absolute positions (decode of a sliding-window model, e.g. Mistral v0.1), and PyramidInfer's
prefill on such a model (its gathered tokens are not consecutive).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporter.onnx.chunk import CHUNK, SELECT
from exporter.onnx.mixed import MIXED

GQA = ("com.microsoft", "GroupQueryAttention")
ATTENTION_BIAS_INPUT = 10  # query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
# sin_cache, position_ids, attention_bias, head_sink


def gqa_with_bias(graph_path: Path) -> int:
    """How many GroupQueryAttention nodes of a graph (subgraphs and local functions included) take an
    attention_bias."""
    model = onnx.load(str(graph_path), load_external_data=False)
    pending, count = [model.graph], 0
    nodes = [f.node for f in model.functions]
    while pending:
        graph = pending.pop()
        nodes.append(graph.node)
        for node in graph.node:
            pending.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    for group in nodes:
        for node in group:
            if (node.domain, node.op_type) == GQA and len(node.input) > ATTENTION_BIAS_INPUT \
                    and node.input[ATTENTION_BIAS_INPUT]:
                count += 1
    return count


def cuda_problems(engine_dir: Path, manifest: dict) -> list[str]:
    """Reasons the CUDA execution provider cannot run this engine as built ([] when it can)."""
    if manifest["onnx"]["target"] != "onnxruntime":
        return []  # the tensorrt target runs standard ops only (ONNX Attention), which have CUDA kernels
    problems = []
    if manifest["dtype"] == "fp32":
        problems.append("GroupQueryAttention has CUDA kernels for fp16/bf16 only, so an fp32 engine would run "
                        "its attention on the CPU provider (rebuild with --dtype fp16 or bf16)")
    # the chunked prefill's graphs run only in the in-flight scheduler, on the CPU provider
    served = [g for g in manifest["onnx"]["graphs"] if g not in (CHUNK, SELECT, MIXED)]
    biased = [g for g in served if gqa_with_bias(Path(engine_dir) / g)]
    if biased:
        problems.append(f"{', '.join(biased)} give GroupQueryAttention an attention_bias, which its CUDA kernel "
                        "refuses (per-head cache lengths of KVzip, or a sliding window over a compressed cache: "
                        "run such engines with --device cpu)")
    return problems
