"""The op specification against a naive per-head Python loop written straight from design.md §4.2."""

import math

import pytest
import torch

from trt_plugins.pyramidkv_select import pyramidkv_select
from trt_plugins.streaming_select import streaming_select


def naive_select(queries, keys, values, selected, window, kernel, pooling, granularity, key_mask):
    """Loops over batch, head, key; float64; sorts by (-score, position)."""
    b_, h, n_obs, d = queries.shape
    hkv, q = keys.shape[1], keys.shape[2]
    g = h // hkv
    prefix = q - window
    kept_b = []
    for b in range(b_):
        real = [bool(x) for x in key_mask[b]]
        per_qhead = []
        for hh in range(h):
            kv = hh // g
            score = [0.0] * prefix
            for r in range(n_obs):
                qpos = q - n_obs + r
                if not real[qpos]:
                    continue
                logits = []
                for j in range(q):
                    if j <= qpos and real[j]:
                        dot = sum(float(queries[b, hh, r, t]) * float(keys[b, kv, j, t]) for t in range(d))
                        logits.append(dot / math.sqrt(d))
                    else:
                        logits.append(None)
                m = max(x for x in logits if x is not None)
                z = sum(math.exp(x - m) for x in logits if x is not None)
                for j in range(prefix):
                    if logits[j] is not None:
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
            pooled = [p if real[j] else -math.inf for j, p in enumerate(pooled)]
            order = sorted(range(prefix), key=lambda j: (-pooled[j], j))[:selected]
            kept_heads.append(sorted(order) + list(range(prefix, q)))
        kept_b.append(kept_heads)
    return torch.tensor(kept_b)


def make_inputs(seed, b=2, h=4, hkv=2, q=30, d=8, n_obs=4, pad=(0, 7)):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, h, n_obs, d, generator=g) * 2
    keys = torch.randn(b, hkv, q, d, generator=g)
    values = torch.randn(b, hkv, q, d, generator=g)
    mask = torch.ones(b, q, dtype=torch.bool)
    for i, p in enumerate(pad):
        mask[i, :p] = False
    return queries, keys, values, mask


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 7), ("max", 3), ("avg", 5), ("none", 1)])
@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_naive_loop(pooling, kernel, granularity, seed):
    queries, keys, values, mask = make_inputs(seed)
    selected, window = 9, 4
    idx, k, v = pyramidkv_select(queries, keys, values, selected, window, kernel, pooling, granularity, mask)
    expected = naive_select(queries, keys, values, selected, window, kernel, pooling, granularity, mask)
    assert torch.equal(idx, expected)
    hc = idx.shape[1]
    src_k = keys.repeat_interleave(hc // keys.shape[1], 1)
    src_v = values.repeat_interleave(hc // values.shape[1], 1)
    gi = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    assert torch.equal(k, torch.gather(src_k, 2, gi)) and torch.equal(v, torch.gather(src_v, 2, gi))


def test_h2o_style_all_queries_observe():
    queries, keys, values, mask = make_inputs(3, q=20, n_obs=20, pad=(0, 3))
    idx, _, _ = pyramidkv_select(queries, keys, values, 6, 4, 1, "none", "kv-head", mask)
    assert torch.equal(idx, naive_select(queries, keys, values, 6, 4, 1, "none", "kv-head", mask))


def test_ties_go_to_the_lower_position():
    # Zero queries: uniform attention, every prefix key scores the same except the causal tail.
    b, h, hkv, q, d = 1, 2, 1, 24, 4
    queries = torch.zeros(b, h, 4, d)
    keys, values = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    idx, _, _ = pyramidkv_select(queries, keys, values, 5, 4, 1, "none", "kv-head")
    assert idx[0, 0, :5].tolist() == [0, 1, 2, 3, 4]


def test_padding_fills_only_when_real_tokens_run_out():
    queries, keys, values, mask = make_inputs(5, b=1, q=20, pad=(12,))  # 8 real tokens, 4 of them the window
    idx, _, _ = pyramidkv_select(queries, keys, values, 6, 4, 7, "max", "kv-head", mask)
    prefix = idx[0, :, :6]
    real_picks = (prefix >= 12).sum(-1)
    assert torch.all(real_picks == 4), "all 4 real prefix tokens are kept before any padding"


def test_score_dtype_is_float32_whatever_the_input():
    queries, keys, values, mask = make_inputs(7)
    a = pyramidkv_select(queries, keys, values, 9, 4, 7, "max", "kv-head", mask)
    bq, bk, bv = (x.to(torch.bfloat16).float() for x in (queries, keys, values))
    b = pyramidkv_select(bq.bfloat16(), bk.bfloat16(), bv.bfloat16(), 9, 4, 7, "max", "kv-head", mask)
    ref = pyramidkv_select(bq, bk, bv, 9, 4, 7, "max", "kv-head", mask)
    assert torch.equal(b[0], ref[0]) and b[1].dtype == torch.bfloat16
    assert a[0].shape == b[0].shape


@pytest.mark.parametrize("bad", [dict(selected=27), dict(window=0), dict(granularity="x")])
def test_rejects_bad_arguments(bad):
    queries, keys, values, mask = make_inputs(0)
    args = dict(selected=5, window=4, kernel=7, pooling="max", granularity="kv-head") | bad
    with pytest.raises(ValueError):
        pyramidkv_select(queries, keys, values, key_mask=mask, **args)


def test_streaming_keeps_sinks_and_recent():
    b, hkv, q, d = 2, 2, 30, 4
    keys, values = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    mask = torch.ones(b, q, dtype=torch.bool)
    mask[1, :6] = False
    idx, k, _ = streaming_select(keys, values, selected=10, window=4, sinks=3, key_mask=mask)
    assert idx[0, 0].tolist() == [0, 1, 2] + list(range(19, 26)) + list(range(26, 30))
    assert idx[1, 1].tolist() == [6, 7, 8] + list(range(19, 26)) + list(range(26, 30))
    assert torch.equal(k[0, 0], keys[0, 0, idx[0, 0]])


@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
def test_per_row_budgets(granularity):
    """Row b keeps exactly what it keeps with its own budget alone; its unused slots are -1 with zero K/V."""
    queries, keys, values, mask = make_inputs(11)
    idx, k, _ = pyramidkv_select(queries, keys, values, torch.tensor([9, 5]), W_, 7, "max", granularity, mask)
    for b, own in enumerate([9, 5]):
        alone = naive_select(queries, keys, values, own, W_, 7, "max", granularity, mask)[b]  # [Hc, own + w]
        assert torch.equal(idx[b, :, :own], alone[:, :own]) and torch.equal(idx[b, :, -W_:], alone[:, own:])
        assert bool((idx[b, :, own:9] == -1).all()) and bool((k[b, :, own:9] == 0).all())


W_ = 4
