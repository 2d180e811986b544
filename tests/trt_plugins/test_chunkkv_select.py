"""ChunkKV's selection: the spec against a naive loop written from the paper's Algorithm 1 on kvpress's chunk grid,
the ONNX functions (scoring and index reuse) against the spec, run by onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select
from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, OPSET
from trt_plugins.onnx_select import chunkkv_gather_function, chunkkv_select_function

H, HKV, D, W = 4, 2, 8, 4


def inputs(seed, q=40, lengths=(40, 29)):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    return (torch.randn(b, q, H, D, generator=g) * 2, torch.randn(b, HKV, q, D, generator=g),
            torch.randn(b, HKV, q, D, generator=g), torch.tensor(lengths))


def naive(queries, keys, lengths, selected, window, c, kernel=1, pooling="avg"):
    """Per row: token score = the window rows' softmax attention summed, averaged over each KV head's query group,
    pooled along the prefix (zeros around it; avg divides by the kernel), summed over the KV heads; the row cut
    into chunks from position 0 (kvpress's grid); the chunks holding a window token always, then the top
    (sel + w - t) // c other chunks by summed score (ties to the lower chunk), t = the window chunks' tokens."""
    b_, q = keys.shape[0], keys.shape[2]
    group = H // HKV
    rows = []
    for b in range(b_):
        n = int(lengths[b])
        w = min(window, n)
        prefix = n - w
        per_head = [[0.0] * q for _ in range(H)]
        for h in range(H):
            kv = h // group
            for pos in range(n - min(window, q), n):
                if pos < 0:
                    continue
                logits = [sum(float(queries[b, pos, h, t]) * float(keys[b, kv, j, t]) for t in range(D)) / math.sqrt(D)
                          for j in range(pos + 1)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for j in range(pos + 1):
                    per_head[h][j] += math.exp(logits[j] - m) / z
        score = [0.0] * q
        for kv in range(HKV):
            mean = [sum(per_head[kv * group + g][j] for g in range(group)) / group if j < prefix else 0.0
                    for j in range(q)]
            for j in range(prefix):
                near = [mean[i] if 0 <= i < prefix else 0.0 for i in range(j - kernel // 2, j + kernel // 2 + 1)]
                score[j] += sum(near) / kernel if pooling == "avg" else max(near)
        first = prefix // c
        t = n - first * c
        others = [(i, sum(score[j] for j in range(i * c, (i + 1) * c))) for i in range(first)]
        top = sorted(others, key=lambda x: (-x[1], x[0]))[: max(0, (selected[b] + w - t) // c)]
        rows.append(sorted(j for i, _ in top for j in range(i * c, (i + 1) * c)) + list(range(first * c, n)))
    return rows


def held(idx):
    return [[sorted(x for x in head if x >= 0) for head in row] for row in idx.tolist()]


@pytest.mark.parametrize("chunk,seed,kernel,pooling", [(10, 0, 1, "avg"), (4, 1, 1, "avg"), (7, 2, 1, "avg"),
                                                       (6, 3, 5, "avg"), (3, 4, 3, "max")])
def test_spec_equals_naive_loop(chunk, seed, kernel, pooling):
    queries, keys, values, lengths = inputs(seed)
    selected = [20, 13]
    idx, k, _, scores = chunkkv_select(queries, keys, values, lengths, torch.tensor(selected), W, chunk, kernel,
                                       pooling)
    want = naive(queries, keys, lengths, selected, W, chunk, kernel, pooling)
    for b, row in enumerate(held(idx)):
        assert all(head == want[b] for head in row), (b, row[0], want[b])
    assert scores.shape == (2, -(-40 // chunk))
    for b in range(2):
        for h in range(HKV):
            used = idx[b, h][idx[b, h] >= 0]
            assert torch.equal(k[b, h, : len(used)], keys[b, h, used])


def test_reuse_from_another_layers_scores_equals_selecting_with_them():
    queries, keys, values, lengths = inputs(3)
    first = chunkkv_select(queries, keys, values, lengths, torch.tensor([20, 10]), W, 5)
    _, keys2, values2, _ = inputs(4)  # another layer's K/V, the first layer's ranking
    reused = chunkkv_from_scores(first[3], keys2, values2, lengths, torch.tensor([20, 10]), W, 5)
    assert torch.equal(reused[0], first[0]), "the same chunks for the same budgets"
    smaller = chunkkv_from_scores(first[3], keys2, values2, lengths, torch.tensor([10, 10]), W, 5)
    assert set(held(smaller[0])[0][0]) <= set(held(first[0])[0][0]), "a smaller budget takes the best of them"


def session(fn, names, attrs, n_out):
    infos = {"queries": helper.make_tensor_value_info("queries", TP.FLOAT, ["b", "q", H, D]),
             "chunk_scores": helper.make_tensor_value_info("chunk_scores", TP.FLOAT, ["b", "c"]),
             "keys": helper.make_tensor_value_info("keys", TP.FLOAT, ["b", HKV, "q", D]),
             "values": helper.make_tensor_value_info("values", TP.FLOAT, ["b", HKV, "q", D]),
             "lengths": helper.make_tensor_value_info("lengths", TP.INT64, ["b"]),
             "selected": helper.make_tensor_value_info("selected", TP.INT64, ["b"])}
    outs = ["kept_indices", "keys_out", "values_out", "chunk_scores_out"][:n_out]
    node = helper.make_node(fn.name, names, outs, domain=CUSTOM_DOMAIN, **attrs)
    types = [TP.INT64, TP.FLOAT, TP.FLOAT, TP.FLOAT]
    shapes = [["b", "h", "k"], ["b", "h", "k", "d"], ["b", "h", "k", "d"], ["b", "c"]]
    graph = helper.make_graph([node], "g", [infos[n] for n in names],
                              [helper.make_tensor_value_info(*x) for x in zip(outs, types, shapes, strict=False)])
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=[fn])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("chunk,lengths,selected,kernel,pooling", [
    (10, (40, 29), (20, 13), 1, "avg"), (3, (40, 7), (25, 2), 1, "avg"), (10, (40, 40), (5, 5), 1, "avg"),
    (4, (40, 31), (20, 13), 5, "avg"), (7, (40, 23), (18, 11), 3, "max")])
def test_onnx_functions_equal_the_spec(chunk, lengths, selected, kernel, pooling):
    queries, keys, values, lens = inputs(5, lengths=lengths)
    sel = torch.tensor(selected)
    want = chunkkv_select(queries, keys, values, lens, sel, W, chunk, kernel, pooling)
    feeds = {"queries": queries.numpy(), "keys": keys.numpy(), "values": values.numpy(), "lengths": lens.numpy(),
             "selected": sel.numpy()}
    sess = session(chunkkv_select_function(W, chunk, H, HKV, D, kernel, pooling),
                   ["queries", "keys", "values", "lengths", "selected"],
                   dict(window=W, chunk_size=chunk, kernel=kernel, pooling=pooling), 4)
    got = sess.run(None, feeds)
    assert np.array_equal(got[0], want[0].numpy()) and np.array_equal(got[1], want[1].numpy())
    np.testing.assert_allclose(got[3], want[3].numpy(), rtol=1e-5)
    gather = session(chunkkv_gather_function(W, chunk, HKV, D), ["chunk_scores", "keys", "values", "lengths",
                                                                   "selected"], dict(window=W, chunk_size=chunk), 3)
    again = gather.run(None, {**{k: v for k, v in feeds.items() if k != "queries"}, "chunk_scores": got[3]})
    assert np.array_equal(again[0], want[0].numpy())
