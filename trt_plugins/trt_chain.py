"""The selection nodes of the tensorrt-target graphs as TensorRT runs them: each node naming a `pkv` plugin
(`plugin_namespace`) is replaced by the nodes of its kernel chain (`select_stages`), one `pkv::<stage>` plugin
node per kernel, wired by fresh tensor names, their attributes the chain's compile-time constants.

    PyramidKVSelect(queries, keys, values, lengths, selected) -> kept_indices, keys_out, values_out[, scores]
    StreamingLLMSelect(keys, values, lengths, selected)       -> kept_indices, keys_out, values_out[, scores]
    ChunkKVSelect(queries, keys, values, lengths, selected)   -> kept_indices, keys_out, values_out, chunk_scores
    ChunkKVGather(chunk_scores, keys, values, lengths, selected) -> kept_indices, keys_out, values_out

The node's outputs become Identities of the chain's (PyramidKV's `scores` [B, Hc, 2, q]: the raw and pooled
scores concatenated, as the ONNX function gives them). The engine's own graphs keep the single node and its
model-local ONNX function (what onnxruntime runs and onnx.checker accepts); only the copy TensorRT's parser reads
is rewritten (`exporter/tensorrt/graphs.parser_input`), so a plan runs the same kernels the CPU tests run.
"""

from __future__ import annotations

import onnx
from onnx import helper

from trt_plugins import select_stages as st
from trt_plugins.onnx_graph import CUSTOM_DOMAIN


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _pyramidkv(a: dict, **blocks) -> dict:
    return st.pyramidkv_constants(a["num_heads"], a["num_kv_heads"], a["head_dim"], a["window"], a["kernel"],
                                  a["pooling"], a["granularity"], a["observe"], **blocks)


def _streaming(a: dict, programs: int = st.PROGRAMS, block_k: int = st.BLOCK_K, **_) -> dict:
    return st.streaming_constants(a["num_kv_heads"], a["head_dim"], a["window"], a["sinks"], programs=programs,
                                  block_k=block_k)


def _chunkkv(a: dict, **blocks) -> dict:
    return st.chunkkv_constants(a["num_heads"], a["num_kv_heads"], a["head_dim"], a["window"], a["chunk_size"],
                                a["kernel"], a["pooling"], **blocks)


def _chunk_gather(a: dict, **blocks) -> dict:
    return st.chunkkv_constants(a["num_kv_heads"], a["num_kv_heads"], a["head_dim"], a["window"], a["chunk_size"],
                                1, "none", **blocks)


# op_type -> (chain, its inputs, its outputs in the node's order, constants from the node's attributes)
CHAINS = {
    "PyramidKVSelect": (st.PYRAMIDKV, ("queries", "keys", "values", "lengths", "selected"),
                        ("kept", "keys_out", "values_out", "scores"), _pyramidkv),
    "StreamingLLMSelect": (st.STREAMINGLLM, ("keys", "values", "lengths", "selected"),
                           ("kept", "keys_out", "values_out", "scores"), _streaming),
    "ChunkKVSelect": (st.CHUNKKV, ("queries", "keys", "values", "lengths", "selected"),
                      ("kept", "keys_out", "values_out", "chunk_scores"), _chunkkv),
    "ChunkKVGather": (st.CHUNKKV_GATHER, ("chunk_scores", "keys", "values", "lengths", "selected"),
                      ("kept", "keys_out", "values_out"), _chunk_gather),
}


def chain_constants(node: onnx.NodeProto, **blocks) -> dict:
    """The constants of a selection node's chain, from its attributes (`blocks`: how the work is cut, see
    `select_stages.pyramidkv_constants`; the plugins' defaults unless given)."""
    attrs = _attrs(node)
    return CHAINS[node.op_type][3](attrs, **blocks) | {"MAX_SELECTED": attrs["max_selected"]}


def chain_nodes(node: onnx.NodeProto, **blocks) -> list[onnx.NodeProto]:
    """The plugin nodes that compute `node` (a selection node naming a pkv plugin)."""
    chain, inputs, outputs, _ = CHAINS[node.op_type]
    constants = chain_constants(node, **blocks)
    prefix = (node.name or node.output[0]) + "/"
    env = dict(zip(inputs, node.input, strict=True))
    nodes = []
    for i, step in enumerate(chain):
        stage, c = step.stage, constants | step.constants
        names = [f"{prefix}{i}.{stage.name}.{o}" for o in stage.outputs]
        attrs = {a: float(c[a]) if a == "SCALE" else int(c[a]) for a in stage.attributes}
        nodes.append(helper.make_node(stage.name, [env[step.source(p)] for p in stage.inputs], names,
                                      name=f"{prefix}{i}.{stage.name}", domain=CUSTOM_DOMAIN,
                                      plugin_namespace="pkv", plugin_version="1", **attrs))
        env.update(zip(stage.outputs, names, strict=True))
    for name, target in zip(outputs, node.output, strict=False):
        if not target:
            continue
        if name == "scores" and "raw" in env:  # [B, Hc, 2, q]: raw, pooled
            axes = prefix + "scores_axes"
            nodes.append(helper.make_node("Constant", [], [axes], value=helper.make_tensor(
                axes, onnx.TensorProto.INT64, [1], [2])))
            parts = [prefix + "raw2", prefix + "pooled2"]
            nodes += [helper.make_node("Unsqueeze", [env["raw"], axes], [parts[0]]),
                      helper.make_node("Unsqueeze", [env["pooled"], axes], [parts[1]])]
            nodes.append(helper.make_node("Concat", parts, [target], axis=2))
        else:
            nodes.append(helper.make_node("Identity", [env[name]], [target]))
    return nodes


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def is_plugin_selection(node: onnx.NodeProto) -> bool:
    return node.domain == CUSTOM_DOMAIN and node.op_type in CHAINS and any(
        a.name == "plugin_namespace" for a in node.attribute)


def expand_selections(model: onnx.ModelProto, **blocks) -> int:
    """Replace every plugin selection node of the model's graphs (If / Loop bodies included), in place, by its
    kernel chain; returns how many were replaced. `blocks` (splits, programs, block_k, align) cut the work
    differently from the plugins' defaults (the CPU tests use small shares to cross every edge)."""
    count = 0
    for graph in reversed(list(_graphs(model.graph))):  # subgraphs first: rebuilding a parent copies its nodes
        if not any(is_plugin_selection(node) for node in graph.node):
            continue
        nodes = []
        for node in graph.node:
            if is_plugin_selection(node):
                nodes += chain_nodes(node, **blocks)
                count += 1
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return count
