"""The KVzip op contract (trt_plugins.kvzip_select): reconstruction inputs, scores, and the global top-k."""

import torch

from trt_plugins.kvzip_select import (
    SINK_SCORE,
    chunk_count,
    chunk_inputs,
    chunk_scores,
    chunk_span,
    kvzip_select,
    reconstruction_attention,
)

FIRST, LATER, PAD = [101, 102], [201, 202, 203], 0


def test_chunk_inputs_follow_the_papers_prompts():
    context = torch.arange(1, 21).expand(2, 20).clone()  # row 1 has 7 real tokens, then padding
    lengths = torch.tensor([20, 7])
    context[1, 7:] = PAD
    assert chunk_count(20, 8) == 3 and chunk_count(1, 8) == 1
    ids, pos, part = chunk_inputs(context, lengths, 0, 8, 3, FIRST, LATER, PAD)
    assert ids[0].tolist() == FIRST + list(range(1, 9))
    assert pos[0].tolist() == list(range(20, 30)) and pos[1].tolist() == list(range(7, 17))
    assert part[0].all() and part[1].tolist() == [True] * 9 + [False]  # row 1's context ends after 7 tokens
    assert ids[1, -1].item() == PAD
    ids, pos, part = chunk_inputs(context, lengths, 1, 8, 3, FIRST, LATER, PAD)
    assert ids[0].tolist() == LATER + [6, 7, 8] + list(range(9, 17))  # the previous chunk's last 3 tokens
    assert not part[1].any() and bool((ids[1] == PAD).all())  # row 1 ended in chunk 0: it takes no part
    ids, _, _ = chunk_inputs(context, lengths, 2, 8, 30, FIRST, LATER, PAD)
    assert ids[0].tolist() == LATER + list(range(9, 17)) + list(range(17, 21))  # postfix capped at one chunk


def test_chunks_start_after_the_sinks():
    """The sinks play the official code's system prompt: the reconstructed context starts after them."""
    context = torch.arange(1, 21).expand(1, 20).clone()
    lengths = torch.tensor([20])
    assert chunk_count(20, 8, sinks=4) == 2 and chunk_count(20, 8, sinks=20) == 1
    assert chunk_span(0, 20, 8, 4) == (4, 12) and chunk_span(1, 20, 8, 4) == (12, 20)
    ids, _, _ = chunk_inputs(context, lengths, 0, 8, 3, FIRST, LATER, PAD, sinks=4)
    assert ids[0].tolist() == FIRST + list(range(5, 13))
    ids, _, _ = chunk_inputs(context, lengths, 1, 8, 3, FIRST, LATER, PAD, sinks=4)
    assert ids[0].tolist() == LATER + [10, 11, 12] + list(range(13, 21))


def test_reconstruction_forward_equals_a_written_out_softmax():
    torch.manual_seed(0)
    b, h, hkv, q, s, d = 2, 4, 2, 10, 5, 8
    lengths = torch.tensor([10, 6])
    query = torch.randn(b, h, s, d)
    own_k, own_v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    cache_k, cache_v = torch.randn(b, hkv, q, d), torch.randn(b, hkv, q, d)
    positions = lengths[:, None] + torch.arange(s)
    part = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for window in (None, 9):
        out = reconstruction_attention(query, own_k, own_v, cache_k, cache_v, lengths, positions, part, window)
        for row in range(b):
            n = int(lengths[row])
            for head in range(h):
                kv = head // (h // hkv)
                for i in range(s):
                    p = int(positions[row, i])
                    seen = n if part[row, i] else 0  # a token that takes no part sees its own input only
                    keys = torch.cat([cache_k[row, kv, :seen], own_k[row, kv, : i + 1]])
                    vals = torch.cat([cache_v[row, kv, :seen], own_v[row, kv, : i + 1]])
                    key_pos = torch.cat([torch.arange(seen), positions[row, : i + 1]])
                    logits = keys @ query[row, head, i] / d**0.5
                    if window is not None:
                        logits = logits.masked_fill(p - key_pos >= window, float("-inf"))
                    torch.testing.assert_close(out[row, i, head], torch.softmax(logits, -1) @ vals, atol=1e-5,
                                               rtol=1e-5)


def test_chunk_scores_are_the_official_softmax_over_sinks_slice_and_self():
    """KVzip's `_get_score` written out: each input token's softmax over the sink keys, the keys of the slice its
    chunk repeats and its own input up to itself; a slice token's score is the max over input tokens and the
    query group; tokens outside the slice get nothing from this chunk. The sinks and the rest of the context are
    not in that softmax: a strong key elsewhere in the context changes no score."""
    torch.manual_seed(0)
    b, h, hkv, q, s, d, sinks = 2, 4, 2, 16, 5, 8, 2
    lengths = torch.tensor([16, 9])
    query = torch.randn(b, h, s, d)
    own_k = torch.randn(b, hkv, s, d)
    cache_k = torch.randn(b, hkv, q, d)
    part = torch.tensor([[True] * 5, [True, True, True, False, False]])
    start, end = 6, 11
    scores = chunk_scores(query, own_k, cache_k, lengths, part, start, end, sinks)
    want = torch.zeros(b, hkv, q)
    for row in range(b):
        n = int(lengths[row])
        cols = [c for c in [*range(sinks), *range(start, end)] if c < n]
        for head in range(h):
            kv = head // (h // hkv)
            for i in range(s):
                if not part[row, i]:
                    continue
                keys = torch.cat([cache_k[row, kv, cols], own_k[row, kv, : i + 1]])
                probs = torch.softmax(keys @ query[row, head, i] / d**0.5, -1)
                for c, p in zip(cols, probs[: len(cols)], strict=True):
                    if c >= start:
                        want[row, kv, c] = torch.maximum(want[row, kv, c], p)
    torch.testing.assert_close(scores, want, atol=1e-6, rtol=1e-5)
    assert bool((scores[1, :, 9:] == 0).all()) and bool((scores[:, :, :start] == 0).all())
    louder = cache_k.clone()
    louder[:, :, 12] = 50 * query.mean(dim=(1, 2))[:, None]  # a key outside the slice that every query likes
    torch.testing.assert_close(chunk_scores(query, own_k, louder, lengths, part, start, end, sinks), scores)


def test_global_topk_budget_sinks_padding_and_ties():
    torch.manual_seed(1)
    layers, b, hkv, q, d = 3, 2, 2, 12, 4
    lengths = torch.tensor([12, 9])
    scores = [torch.rand(b, hkv, q) for _ in range(layers)]
    keys = [torch.randn(b, hkv, q, d) for _ in range(layers)]
    values = [torch.randn(b, hkv, q, d) for _ in range(layers)]
    picked = kvzip_select(scores, keys, values, lengths, kv_budget=5, sinks=2)
    flat = torch.stack(scores, 1).clone()  # [B, L, Hkv, q]
    flat[..., :2] = SINK_SCORE
    for row, n in enumerate(lengths.tolist()):
        flat[row, ..., n:] = -1
        threshold = flat[row].flatten().sort(descending=True).values[5 * layers * hkv - 1]
        total = 0
        for layer, (idx, k, v) in enumerate(picked):
            assert idx.shape[-1] == int((idx >= 0).sum(-1).max()), "the layer spans its longest head, no more"
            for head in range(hkv):
                valid = idx[row, head][idx[row, head] >= 0]
                total += len(valid)
                assert valid[:2].tolist() == [0, 1], "the sinks, in every head"
                assert bool((valid < n).all()) and bool((valid[1:] > valid[:-1]).all())
                assert bool((flat[row, layer, head, valid] >= threshold).all())
                torch.testing.assert_close(k[row, head, : len(valid)], keys[layer][row, head, valid])
                assert bool((v[row, head, len(valid):] == 0).all())
        assert total == 5 * layers * hkv
    equal = [torch.ones(1, 1, 6) for _ in range(2)]  # every pair ties: the lower flat index (layer 0) wins
    kv = [torch.zeros(1, 1, 6, 1) for _ in range(2)]
    (first, _, _), (second, _, _) = kvzip_select(equal, kv, kv, torch.tensor([6]), kv_budget=4, sinks=0)
    assert first.tolist() == [[[0, 1, 2, 3, 4, 5]]] and second.tolist() == [[[0, 1]]]
