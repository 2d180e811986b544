"""The PyramidKVSelect / StreamingLLMSelect ONNX functions, run by onnxruntime, equal the op specification."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from exporter.onnx.budget_table import selected_counts
from methods import make_policy, options_for
from methods.budgets import pyramid_selected
from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, OPSET, GraphBuilder
from trt_plugins.onnx_select import pyramidkv_select_function, streaming_select_function
from trt_plugins.pyramidkv_select import pyramidkv_select
from trt_plugins.streaming_select import streaming_select

H, HKV, D, W = 4, 2, 8, 4
OUT_INFOS = [helper.make_tensor_value_info("kept_indices", TP.INT64, ["b", "hc", "k"]),
             helper.make_tensor_value_info("keys_out", TP.FLOAT, ["b", "hc", "k", "d"]),
             helper.make_tensor_value_info("values_out", TP.FLOAT, ["b", "hc", "k", "d"])]


def session(function: onnx.FunctionProto, inputs: list[tuple[str, int, list]], attrs: dict) -> ort.InferenceSession:
    node = helper.make_node(function.name, [n for n, _, _ in inputs], [o.name for o in OUT_INFOS],
                            domain=CUSTOM_DOMAIN, **attrs)
    graph = helper.make_graph([node], "select", [helper.make_tensor_value_info(*i) for i in inputs], OUT_INFOS)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=[function])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


SELECT_INPUTS = [("queries", TP.FLOAT, ["b", "q", H, D]), ("keys", TP.FLOAT, ["b", HKV, "q", D]),
                 ("values", TP.FLOAT, ["b", HKV, "q", D]), ("lengths", TP.INT64, ["b"]),
                 ("selected", TP.INT64, ["b"])]


def inputs(seed, q=30, lengths=(30, 23), zero_queries=False):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    queries = torch.randn(b, q, H, D, generator=g) * 2
    if zero_queries:
        queries = torch.zeros_like(queries)
    keys, values = torch.randn(b, HKV, q, D, generator=g), torch.randn(b, HKV, q, D, generator=g)
    return queries, keys, values, torch.tensor(lengths)


def run_both(sess, queries, keys, values, lengths, selected, spec_args):
    got = sess.run(None, {"queries": queries.numpy(), "keys": keys.numpy(), "values": values.numpy(),
                          "lengths": lengths.numpy(), "selected": selected.numpy()})
    return got, pyramidkv_select(queries, keys, values, lengths, selected, *spec_args)


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 7), ("avg", 3), ("none", 1)])
@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
@pytest.mark.parametrize("case", ["random", "ties", "short-rows", "h2o"])
def test_pyramidkv_function_equals_spec(pooling, kernel, granularity, case):
    observe = "all" if case == "h2o" else "window"
    fn = pyramidkv_select_function(W, kernel, pooling, granularity, H, HKV, D, observe)
    sess = session(fn, SELECT_INPUTS, dict(window=W, kernel=kernel, pooling=pooling, granularity=granularity,
                                           observe=observe))
    selected = torch.tensor([9, 5])  # per-row budgets
    if case == "ties":
        queries, keys, values, lengths = inputs(1, zero_queries=True, lengths=(30, 30))
    elif case == "short-rows":  # row 1: fewer real tokens than the window; row 0: exactly its budget
        queries, keys, values, lengths = inputs(2, lengths=(13, 3))
        selected = torch.tensor([9, 0])
    else:
        queries, keys, values, lengths = inputs(0 if case == "random" else 3)
    got, want = run_both(sess, queries, keys, values, lengths, selected,
                         (W, kernel, pooling, granularity, observe))
    if case == "random":
        assert (want[0][1, :, 9:] == -1).all() and (want[1][1, :, 9:] == 0).all(), "row 1's unused slots"
    assert np.array_equal(got[0], want[0].numpy())
    np.testing.assert_array_equal(got[1], want[1].numpy())
    np.testing.assert_array_equal(got[2], want[2].numpy())


def test_h2o_observation_loop_over_many_blocks(monkeypatch):
    import trt_plugins.pyramidkv_select as spec

    monkeypatch.setattr(spec, "OBS_BLOCK_ELEMENTS", 30 * 4)  # 4 rows per block: 8 loop iterations at q = 30
    fn = pyramidkv_select_function(W, 7, "max", "kv-head", H, HKV, D, "all")
    loop = [n for n in fn.node if n.op_type == "Loop"]
    assert len(loop) == 1
    sess = session(fn, SELECT_INPUTS, dict(window=W, kernel=7, pooling="max", granularity="kv-head", observe="all"))
    queries, keys, values, lengths = inputs(5)
    got, want = run_both(sess, queries, keys, values, lengths, torch.tensor([9, 7]),
                         (W, 7, "max", "kv-head", "all"))
    assert np.array_equal(got[0], want[0].numpy())


@pytest.mark.parametrize("sinks", [0, 3])
def test_streaming_function_equals_spec(sinks):
    fn = streaming_select_function(W, sinks, HKV, D)
    sess = session(fn, SELECT_INPUTS[1:], dict(window=W, sinks=sinks))
    _, keys, values, lengths = inputs(4, lengths=(30, 21))
    selected = torch.tensor([10, 7])
    got = sess.run(None, {"keys": keys.numpy(), "values": values.numpy(), "lengths": lengths.numpy(),
                          "selected": selected.numpy()})
    want = streaming_select(keys, values, lengths, selected, W, sinks)
    assert np.array_equal(got[0], want[0].numpy()) and np.array_equal(got[1], want[1].numpy())


@pytest.mark.parametrize("name,kw", [("pyramidkv", {}), ("pyramidkv", {"schedule": "mean"}), ("snapkv", {}),
                                     ("pyramidkv", {"kv_budget": 20, "window": 8, "beta": 3})])
def test_in_graph_budgets_equal_the_budget_function(name, kw):
    policy = make_policy(name, **options_for(name, {"kv_budget": 32, "window": 4}) | kw)
    layers = 5
    g = GraphBuilder()
    outs = [g.unsqueeze(x, [0]) for x in selected_counts(g, policy, layers, "lengths")]
    g.op("Concat", *outs, axis=0, outputs=["budgets"])
    graph = helper.make_graph(g.nodes, "budgets", [helper.make_tensor_value_info("lengths", TP.INT64, ["b"])],
                              [helper.make_tensor_value_info("budgets", TP.INT64, [layers, "b"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths = list(range(1, 200)) + [500, 1000, 8000, 100000]
    got = sess.run(None, {"lengths": np.array(lengths, dtype=np.int64)})[0]  # [L, B]: one batch, every length
    for b, q_len in enumerate(lengths):
        want = policy.layer_selected(layers, q_len)
        if want is None:  # no compression: keep the whole prefix
            want = [max(q_len - policy.window, 0)] * layers
        assert got[:, b].tolist() == want, q_len
    if name == "pyramidkv" and not kw:
        assert want == pyramid_selected(layers, 32, 4, 100000)
