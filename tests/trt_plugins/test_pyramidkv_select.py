"""The op specification against a naive per-head Python loop written straight from the
selection's description (SnapKV scoring, pooling, top-k, the window: trt_plugins/pyramidkv_select.py)."""

import math

import pytest
import torch

from trt_plugins.pyramidkv_select import pyramidkv_select
from trt_plugins.streaming_select import streaming_select


def naive_select(queries, keys, values, lengths, selected, window, kernel, pooling, granularity, observe="window"):
    """Loops over batch, head, key; float64; sorts by (-score, position). Right padding, compact rows.
    queries [B, q, H, d]; selected: int or per-row list. Returns [B, Hc, max(selected) + min(window, q)]."""
    b_, q, h, d = queries.shape
    hkv = keys.shape[1]
    g = h // hkv
    sel = [selected] * b_ if isinstance(selected, int) else list(selected)
    width = max(sel) + min(window, q)
    kept_b = []
    for b in range(b_):
        n = int(lengths[b])
        w = min(window, n)
        prefix = n - w
        rows = range(n - min(window, q), n) if observe == "window" else range(n)
        per_qhead = []
        for hh in range(h):
            kv = hh // g
            score = [0.0] * prefix
            for qpos in rows:
                if qpos < 0:
                    continue
                logits = [sum(float(queries[b, qpos, hh, t]) * float(keys[b, kv, j, t]) for t in range(d))
                          / math.sqrt(d) for j in range(qpos + 1)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for j in range(min(prefix, qpos + 1)):
                    score[j] += math.exp(logits[j] - m) / z
            per_qhead.append(score)
        if granularity == "kv-head":
            heads = [[sum(per_qhead[kv * g + i][j] for i in range(g)) / g for j in range(prefix)] for kv in range(hkv)]
        else:
            heads = per_qhead
        kept_heads = []
        for score in heads:
            half = kernel // 2
            pooled = []
            for j in range(prefix):
                neigh = [score[t] for t in range(j - half, j + half + 1) if 0 <= t < prefix]
                if pooling == "max":
                    pooled.append(max(neigh))
                elif pooling == "avg":
                    pooled.append(sum(neigh) / kernel)
                else:
                    pooled.append(score[j])
            order = sorted(range(prefix), key=lambda j: (-pooled[j], j))[: sel[b]]
            row = sorted(order) + list(range(prefix, n))
            kept_heads.append(row + [-1] * (width - len(row)))
        kept_b.append(kept_heads)
    return torch.tensor(kept_b)


def make_inputs(seed, b=2, h=4, hkv=2, q=30, d=8, lengths=(30, 23)):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, q, h, d, generator=g) * 2
    keys = torch.randn(b, hkv, q, d, generator=g)
    values = torch.randn(b, hkv, q, d, generator=g)
    return queries, keys, values, torch.tensor(lengths)


def gathered(idx, keys):
    hc = idx.shape[1]
    src = keys.repeat_interleave(hc // keys.shape[1], 1)
    out = torch.gather(src, 2, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    return torch.where(idx.unsqueeze(-1) >= 0, out, torch.zeros(()))


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 7), ("max", 3), ("avg", 5), ("none", 1)])
@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_naive_loop(pooling, kernel, granularity, seed):
    queries, keys, values, lengths = make_inputs(seed)
    selected, window = 9, 4
    idx, k, v = pyramidkv_select(queries, keys, values, lengths, selected, window, kernel, pooling, granularity)
    assert torch.equal(idx, naive_select(queries, keys, values, lengths, selected, window, kernel, pooling,
                                         granularity))
    assert torch.equal(k, gathered(idx, keys)) and torch.equal(v, gathered(idx, values))


def test_h2o_style_all_queries_observe():
    queries, keys, values, lengths = make_inputs(3, q=20, lengths=(20, 17))
    idx, _, _ = pyramidkv_select(queries, keys, values, lengths, 6, 4, 1, "none", "kv-head", "all")
    assert torch.equal(idx, naive_select(queries, keys, values, lengths, 6, 4, 1, "none", "kv-head", "all"))


def test_observation_in_many_blocks_equals_one_block(monkeypatch):
    import trt_plugins.pyramidkv_select as spec

    queries, keys, values, lengths = make_inputs(4, q=40, lengths=(40, 31))
    one = spec.pyramidkv_select(queries, keys, values, lengths, 10, 4, 5, "max", "kv-head", "all")
    monkeypatch.setattr(spec, "OBS_BLOCK_ELEMENTS", 40 * 3)  # 3 rows per block
    assert spec.observation_rows_per_block(40) == 3
    many = spec.pyramidkv_select(queries, keys, values, lengths, 10, 4, 5, "max", "kv-head", "all")
    assert torch.equal(one[0], many[0])


def test_ties_go_to_the_lower_position():
    # Zero queries: uniform attention, every prefix key scores the same except the causal tail.
    b, h, hkv, q, d = 1, 2, 1, 24, 4
    queries = torch.zeros(b, q, h, d)
    keys, values = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    idx, _, _ = pyramidkv_select(queries, keys, values, torch.tensor([q]), 5, 4, 1, "none", "kv-head")
    assert idx[0, 0, :5].tolist() == [0, 1, 2, 3, 4]


def test_rows_shorter_than_the_window_keep_everything_compactly():
    queries, keys, values, _ = make_inputs(5, q=20)
    lengths = torch.tensor([20, 3])  # row 1: 3 real tokens, a window of 4
    idx, k, _ = pyramidkv_select(queries, keys, values, lengths, torch.tensor([6, 0]), 4, 7, "max", "kv-head")
    assert idx.shape[-1] == 6 + 4
    assert idx[1, 0].tolist() == [0, 1, 2] + [-1] * 7
    assert bool((k[1, :, 3:] == 0).all())


def test_score_dtype_is_float32_whatever_the_input():
    queries, keys, values, lengths = make_inputs(7)
    bq, bk, bv = (x.to(torch.bfloat16).float() for x in (queries, keys, values))
    b = pyramidkv_select(bq.bfloat16(), bk.bfloat16(), bv.bfloat16(), lengths, 9, 4, 7, "max", "kv-head")
    ref = pyramidkv_select(bq, bk, bv, lengths, 9, 4, 7, "max", "kv-head")
    assert torch.equal(b[0], ref[0]) and b[1].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(selected=27), dict(window=0), dict(granularity="x"), dict(observe="some"),
                                 dict(selected=torch.tensor([5, 20]))])
def test_rejects_bad_arguments(bad):
    queries, keys, values, lengths = make_inputs(0)
    args = dict(selected=5, window=4, kernel=7, pooling="max", granularity="kv-head") | bad
    with pytest.raises(ValueError):
        pyramidkv_select(queries, keys, values, lengths, **args)


def test_streaming_keeps_sinks_and_recent():
    b, hkv, q, d = 2, 2, 30, 4
    keys, values = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    idx, k, _ = streaming_select(keys, values, torch.tensor([30, 24]), selected=10, window=4, sinks=3)
    assert idx[0, 0].tolist() == [0, 1, 2] + list(range(19, 26)) + list(range(26, 30))
    assert idx[1, 1].tolist() == [0, 1, 2] + list(range(13, 20)) + list(range(20, 24))
    assert torch.equal(k[0, 0], keys[0, 0, idx[0, 0]])


@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
def test_per_row_budgets(granularity):
    """Row b keeps exactly what it keeps with its own budget alone; its unused slots are -1 with zero K/V."""
    queries, keys, values, lengths = make_inputs(11)
    idx, k, _ = pyramidkv_select(queries, keys, values, lengths, torch.tensor([9, 5]), 4, 7, "max", granularity)
    for b, own in enumerate([9, 5]):
        alone = naive_select(queries, keys, values, lengths, own, 4, 7, "max", granularity)[b]  # [Hc, own + 4]
        assert torch.equal(idx[b, :, : own + 4], alone)
        assert bool((idx[b, :, own + 4 :] == -1).all()) and bool((k[b, :, own + 4 :] == 0).all())
