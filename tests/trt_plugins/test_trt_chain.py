"""The graph TensorRT's parser is given computes the selections: each selection node naming a pkv plugin becomes
the chain of stage-plugin nodes (trt_plugins/trt_chain.py), and those nodes, run here node by node with each
plugin's own kernel launch and shape rule (`triton_select.launch`, what the JIT implementation runs; the AOT
payloads are the same kernels compiled), under the interpreter, equal the op specifications: indices and K/V in
the plugin's static width (-1 and zeros after each row's picks), PyramidKV's scores and ChunkKV's chunk scores."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from onnx import helper

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from trt_plugins import select_stages as st  # noqa: E402
from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select  # noqa: E402
from trt_plugins.onnx_graph import CUSTOM_DOMAIN  # noqa: E402
from trt_plugins.pyramidkv_select import pyramidkv_select  # noqa: E402
from trt_plugins.streaming_select import streaming_select  # noqa: E402
from trt_plugins.triton_select import launch  # noqa: E402
from trt_plugins.trt_chain import CHAINS, expand_selections  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, HKV, Q, D, WINDOW, MAX_SELECTED = 2, 4, 2, 40, 16, 4, 20
STAGES = {s.name: s for s in st.STAGES}


def selection_model(op: str, n_outputs: int, **attrs) -> onnx.ModelProto:
    """One selection node as the tensorrt target writes it (plugin attributes), inside an If branch as in the
    prefill graph, so the rewrite must reach subgraphs."""
    inputs = list(CHAINS[op][1])
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op, inputs, [f"sel{i}" for i in range(n_outputs)], domain=CUSTOM_DOMAIN,
                            plugin_namespace="pkv", plugin_version="1", window=WINDOW, max_selected=MAX_SELECTED,
                            head_dim=D, num_kv_heads=HKV, **attrs)
    branch = helper.make_graph([node, *[helper.make_node("Identity", [f"sel{i}"], [f"b{i}"])
                                        for i in range(n_outputs)]], "select", [],
                               [helper.make_tensor_value_info(f"b{i}", onnx.TensorProto.UNDEFINED, None)
                                for i in range(n_outputs)])
    keep = helper.make_graph([helper.make_node("Identity", [inputs[1]], [f"k{i}"]) for i in range(n_outputs)],
                             "keep", [], [helper.make_tensor_value_info(f"k{i}", onnx.TensorProto.UNDEFINED, None)
                                          for i in range(n_outputs)])
    graph = helper.make_graph([helper.make_node("If", ["cond"], outputs, then_branch=keep, else_branch=branch)],
                              "g", [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                                    for n in ["cond", *inputs]],
                              [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(CUSTOM_DOMAIN, 1)])


def run_graph(nodes, env: dict) -> dict:
    """Run the rewritten nodes in order: each plugin node with its stage's kernel and its attributes as the
    constants (as the plugin does), the few standard ops the rewrite adds with torch."""
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == CUSTOM_DOMAIN:
            assert attrs.pop("plugin_namespace") == b"pkv" and attrs.pop("plugin_version") == b"1"
            stage = STAGES[node.op_type]
            assert sorted(attrs) == sorted(stage.attributes), "the plugin's attributes, exactly"
            out = launch(stage, dict(zip(stage.inputs, (env[i] for i in node.input), strict=True)), attrs)
            env.update(zip(node.output, (out[o] for o in stage.outputs), strict=True))
        elif node.op_type == "If":
            branch = attrs["else_branch"]
            inner = run_graph(branch.node, dict(env))
            env.update(zip(node.output, (inner[o.name] for o in branch.output), strict=True))
        elif node.op_type == "Constant":
            env[node.output[0]] = torch.tensor(onnx.numpy_helper.to_array(attrs["value"]))
        elif node.op_type == "Unsqueeze":
            env[node.output[0]] = env[node.input[0]].unsqueeze(int(env[node.input[1]][0]))
        elif node.op_type == "Concat":
            env[node.output[0]] = torch.cat([env[i] for i in node.input], dim=attrs["axis"])
        else:
            assert node.op_type == "Identity", node.op_type
            env[node.output[0]] = env[node.input[0]]
    return env


def rewritten(op: str, n_outputs: int, **attrs) -> onnx.ModelProto:
    """The node rewritten with small shares (the interpreter runs every program; the plugins' defaults launch
    64 / 16 per head, which test_default_shares_are_the_plugins checks), so the chain crosses share edges."""
    model = selection_model(op, n_outputs, **attrs)
    assert expand_selections(model, splits=4, programs=4, block_k=16, align=8) == 1
    branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    plugins = [n.op_type for n in branch.node if n.domain == CUSTOM_DOMAIN]
    assert plugins == [step.stage.name for step in CHAINS[op][0]], "the chain, in order, and nothing else"
    return model


def test_default_shares_are_the_plugins():
    model = selection_model("PyramidKVSelect", 4, num_heads=H, kernel=7, pooling="max", granularity="kv-head",
                            observe="window")
    expand_selections(model)
    branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in branch.node
             if n.domain == CUSTOM_DOMAIN]
    assert {a.get("NS") for a in attrs} - {None} == {st.SPLITS} and {a["NT"] for a in attrs if "NT" in a} == \
        {st.PROGRAMS}
    assert attrs[-1]["MAX_SELECTED"] == MAX_SELECTED and attrs[3]["PASS"] == 1 and attrs[5]["PASS"] == 3
    assert all(a["plugin_namespace"] == b"pkv" for a in attrs)


def inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    queries = (torch.randn(B, Q, H, D, generator=g) * 2).to(dtype)
    keys, values = (torch.randn(B, HKV, Q, D, generator=g).to(dtype) for _ in range(2))
    return dict(queries=queries, keys=keys, values=values, lengths=torch.tensor([Q, 27]),
                selected=torch.tensor([MAX_SELECTED, 9]))


def assert_wide_equal(got, want):
    """The plugin's static width: the spec's slots first, then -1 and zero K/V."""
    n = want[0].shape[-1]
    assert got[0].shape[-1] == MAX_SELECTED + WINDOW >= n
    assert torch.equal(got[0][..., :n].cpu(), want[0]) and bool((got[0][..., n:] == -1).all())
    for g_, w in zip(got[1:3], want[1:3], strict=True):
        assert torch.equal(g_[..., :n, :].cpu(), w) and not g_[..., n:, :].any()


def feeds(x: dict, names) -> dict:
    return {"cond": torch.tensor(False)} | {n: x[n].to(DEVICE) for n in names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pyramidkv_chain_as_tensorrt_gets_it(dtype):
    model = rewritten("PyramidKVSelect", 4, num_heads=H, kernel=7, pooling="max", granularity="kv-head",
                      observe="window")
    x = inputs(0, dtype)
    out = run_graph(model.graph.node, feeds(x, CHAINS["PyramidKVSelect"][1]))
    want = pyramidkv_select(x["queries"], x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 7, "max")
    assert_wide_equal([out[f"out{i}"] for i in range(3)], want)
    assert out["out3"].shape == (B, HKV, 2, Q), "the scores output: raw and pooled"


def test_streaming_chain_as_tensorrt_gets_it():
    model = rewritten("StreamingLLMSelect", 3, sinks=3)
    x = inputs(1)
    out = run_graph(model.graph.node, feeds(x, CHAINS["StreamingLLMSelect"][1]))
    want = streaming_select(x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 3)
    assert_wide_equal([out[f"out{i}"] for i in range(3)], want)


def test_chunkkv_chains_as_tensorrt_gets_them():
    model = rewritten("ChunkKVSelect", 4, num_heads=H, chunk_size=6, kernel=3, pooling="avg")
    x = inputs(2)
    out = run_graph(model.graph.node, feeds(x, CHAINS["ChunkKVSelect"][1]))
    *want, scores = chunkkv_select(x["queries"], x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 6, 3,
                                   "avg")
    assert_wide_equal([out[f"out{i}"] for i in range(3)], want)
    torch.testing.assert_close(out["out3"].cpu(), scores, rtol=1e-6, atol=0)
    gather = rewritten("ChunkKVGather", 3, chunk_size=6)
    x["chunk_scores"] = scores
    x["selected"] = torch.tensor([14, 6])
    out = run_graph(gather.graph.node, feeds(x, CHAINS["ChunkKVGather"][1]))
    want = chunkkv_from_scores(scores, x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 6)
    assert_wide_equal([out[f"out{i}"] for i in range(3)], want)
