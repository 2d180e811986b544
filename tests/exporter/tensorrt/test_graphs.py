"""What TensorRT's parser is given (exporter/tensorrt/graphs.py): every ONNX Attention node of the tensorrt-target
graphs marked `TRT_decomposable=1` (so TensorRT may split it when no fused kernel fits: fp32, head_dim 16), in a
copy beside the graphs; the engine's own graphs stay what onnxruntime and onnx.checker accept."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from exporter.tensorrt.graphs import DECOMPOSABLE, mark_decomposable, parser_input
from methods import make_policy


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "engine"
    # tiny-mistral: both Attention forms (the window's explicit mask in prefill, the cache mask in decode)
    build_onnx_engine(load_model("tiny-mistral"), make_policy("pyramidkv", kv_budget=32, window=4), out,
                      max_input_len=256, target="tensorrt")
    return out


def attention_nodes(model):
    return [n for n in model.graph.node if n.op_type == "Attention"]


@pytest.mark.parametrize("graph", ["prefill.onnx", "decode.onnx"])
def test_parser_input_marks_every_attention_decomposable(graphs, graph):
    source = graphs / graph
    before = source.read_bytes()
    marked = onnx.load(str(parser_input(source)), load_external_data=False)
    nodes = attention_nodes(marked)
    assert len(nodes) == 4, "one Attention per layer"
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs[DECOMPOSABLE] == 1 and "scale" in attrs and "is_causal" in attrs
    assert source.read_bytes() == before, "the engine's own graph is untouched"
    full = onnx.load(str(graphs / f"{source.stem}.tensorrt-parser.onnx"))  # external weights resolve beside it
    assert any(t.name == "model.embed_tokens.weight" and len(onnx.numpy_helper.to_array(t)) for t in
               full.graph.initializer)


def test_the_attribute_is_why_the_marked_copy_is_not_the_engine(graphs):
    """onnxruntime refuses the attribute on a standard op, so the engine's graphs must not carry it."""
    model = onnx.load(str(graphs / "decode.onnx"), load_external_data=False)
    assert not any(a.name == DECOMPOSABLE for n in attention_nodes(model) for a in n.attribute)
    tiny = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Attention", ["q", "q", "q"], ["o"], is_causal=1)], "g",
        [onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [1, 2, 4, 8])],
        [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [1, 2, 4, 8])]),
        opset_imports=[onnx.helper.make_opsetid("", 23)], ir_version=10)
    ort.InferenceSession(tiny.SerializeToString()).run(None, {"q": np.ones((1, 2, 4, 8), np.float32)})
    assert mark_decomposable(tiny) == 1
    with pytest.raises(Exception, match=DECOMPOSABLE):
        ort.InferenceSession(tiny.SerializeToString())


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def test_parser_input_runs_each_selection_as_its_kernel_chain(graphs):
    """TensorRT gets one pkv plugin node per GPU kernel of the selection (trt_plugins/trt_chain.py), never the
    single PyramidKVSelect node (an AOT plugin runs one kernel); the engine's own prefill graph keeps the node,
    its ONNX function and nothing of the chain (onnxruntime runs it)."""
    pytest.importorskip("triton", reason="the chain's stage table names the Triton kernels")
    from trt_plugins.select_stages import PYRAMIDKV

    own = onnx.load(str(graphs / "prefill.onnx"), load_external_data=False)
    assert sum(n.op_type == "PyramidKVSelect" for n in _all_nodes(own.graph)) == 4
    marked = onnx.load(str(parser_input(graphs / "prefill.onnx")), load_external_data=False)
    nodes = list(_all_nodes(marked.graph))
    assert not any(n.op_type == "PyramidKVSelect" for n in nodes)
    plugins = [n for n in nodes if n.domain == "pkv"]
    assert [n.op_type for n in plugins] == [step.stage.name for step in PYRAMIDKV] * 4, "one chain per layer"
    for node in plugins:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"pkv" and attrs["plugin_version"] == b"1"
    emits = [n for n in plugins if n.op_type == "SelectEmit"]
    budgets = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["MAX_SELECTED"] for n in emits]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1], "each layer's own width (pyramid)"
