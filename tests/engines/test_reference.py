"""The PyTorch reference: exact where it must be (FullKV is transformers' own generate; the first token never
depends on the compression; each prompt keeps its own budget)."""

import dataclasses

import pytest
import torch

from engines.compressed_cache import CompressedKVState
from engines.hf_model import build_hf_model
from engines.reference import ReferenceEngine
from exporter.checkpoint import LoadedModel, load_model
from methods import POLICIES, make_policy, options_for

LONG = "The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 2  # ~150 bytes
PROMPTS = [LONG, "Short prompt, left padded.", LONG[:100] + " and then?"]


def engine(loaded, name, **kw):
    return ReferenceEngine(loaded, make_policy(name, **options_for(name, {"kv_budget": 32, "window": 4}) | kw))


def test_full_equals_hf_generate(tiny):
    """FullKV reproduces transformers' own greedy generate token for token (batch, left padding)."""
    ref = engine(tiny, "full")
    hf = build_hf_model(tiny, attn_implementation="eager")
    ids, mask = ref.encode(PROMPTS)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                      pad_token_id=ref.pad_id, eos_token_id=list(ref.eos_ids))
    result = ref.generate(PROMPTS, 24)
    for b, tokens in enumerate(result.tokens):
        assert out[b, ids.shape[1]:].tolist()[: len(tokens)] == tokens
        assert len(tokens) == 24 or tokens[-1] in ref.eos_ids


# Every method but those whose prefill drops tokens before the last layer (PyramidInfer's deeper layers see fewer).
@pytest.mark.parametrize("name", [p for p in POLICIES if p not in ("full", "pyramidinfer")])
def test_first_token_equals_full(tiny, name):
    full = engine(tiny, "full").generate(PROMPTS, 3, return_logits=True)
    comp = engine(tiny, name).generate(PROMPTS, 3, return_logits=True, return_indices=True)
    assert [t[0] for t in comp.tokens] == [t[0] for t in full.tokens]
    assert torch.equal(comp.logits[:, 0], full.logits[:, 0])  # the prefill attends to the full prompt
    assert comp.selected is not None
    per_head = POLICIES[name].per_head_lengths  # KVzip: heads hold different counts, a row spans its longest
    w = 0 if per_head else 4
    for layer, kept in enumerate(comp.kept_indices):
        assert kept.shape[-1] == max(sel[layer] for sel in comp.selected) + w
        for b, sel in enumerate(comp.selected):
            held = (kept[b] >= 0).sum(-1)  # compact rows: the picks and the window first, then -1
            want = sel[layer] + min(w, comp.prompt_lengths[b])  # each prompt its own budget
            assert int(held.max()) == want and (per_head or bool((held == want).all()))
            for head, n in enumerate(held.tolist()):
                assert bool((kept[b, head, :n] >= 0).all()) and bool((kept[b, head, n:] == -1).all())


def test_kvzip_keeps_its_budget_over_all_layers_and_heads(tiny):
    """C per head on average, the sinks in every head, each head's picks ascending; a prompt shorter than C
    keeps everything; with C above every prompt KVzip is FullKV exactly."""
    L, hkv = tiny.spec.num_layers, tiny.spec.num_kv_heads
    result = engine(tiny, "kvzip", sinks=2, score_chunk=16).generate(PROMPTS, 3, return_indices=True)
    for b, n in enumerate(result.prompt_lengths):
        kept = [k[b] for k in result.kept_indices]  # [Hkv, n_l] per layer
        assert sum(int((k >= 0).sum()) for k in kept) == min(32, n) * L * hkv
        for k in kept:
            for head in k:
                valid = head[head >= 0]
                assert valid[:2].tolist() == [0, 1] and bool((valid[1:] > valid[:-1]).all()) and int(valid.max()) < n
    full = engine(tiny, "full").generate(PROMPTS, 6, return_logits=True)
    wide = engine(tiny, "kvzip", kv_budget=4096).generate(PROMPTS, 6, return_logits=True)
    assert wide.tokens == full.tokens and torch.equal(wide.logits, full.logits)


def test_pyramidinfer_drops_tokens_inside_the_prefill(tiny):
    """Each layer caches the tokens the previous one passed on: the budgets `plan` predicts, the recent window and
    the sinks in every layer, nested sets; the prefill itself changes (the first token's logits move)."""
    policy = make_policy("pyramidinfer", min_context=8, decay=0.7)
    result = ReferenceEngine(tiny, policy).generate(PROMPTS, 3, return_logits=True, return_indices=True)
    full = engine(tiny, "full").generate(PROMPTS, 3, return_logits=True)
    assert not torch.equal(result.logits[:, 0], full.logits[:, 0])
    for b, n in enumerate(result.prompt_lengths):
        assert result.selected[b] == policy.layer_selected(tiny.spec.num_layers, n)
        sets = [set(k[b, 0].tolist()) - {-1} for k in result.kept_indices]
        recent = set(range(n - 1 - int(n * 0.2), n))
        for layer, kept in enumerate(sets):
            assert recent | set(range(min(4, n))) <= kept and len(kept) == result.selected[b][layer]
            assert all(torch.equal(k[b, 0], k[b, h]) for k in result.kept_indices[layer:layer + 1]
                       for h in range(k.shape[1]))  # one set for every head
            if layer:
                assert kept <= sets[layer - 1]


def test_compression_changes_later_tokens(tiny):
    """Guards the test above: the compressed cache must actually be used in decode."""
    full = engine(tiny, "full").generate([LONG], 12, return_logits=True)
    comp = engine(tiny, "pyramidkv", kv_budget=12).generate([LONG], 12, return_logits=True)
    assert not torch.equal(full.logits[:, 1:], comp.logits[:, 1:])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hand_decode_step(model, state: CompressedKVState, token: torch.Tensor, pos: torch.Tensor, window):
    """One decode step written out by hand over the per-layer caches (RMSNorm, RoPE, GQA attention, SwiGLU)."""
    cfg = model.config
    hd = cfg.head_dim
    x = model.model.embed_tokens.weight[token]  # [B, hidden]
    cos, sin = model.model.rotary_emb(x[:, None], pos[:, None])  # [B, 1, hd]
    cos, sin = cos[:, 0, None], sin[:, 0, None]  # [B, 1, hd]

    def rms(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        hn = rms(x, layer.input_layernorm.weight)
        q = (hn @ a.q_proj.weight.T).view(-1, cfg.num_attention_heads, hd)  # [B, H, hd]
        k = (hn @ a.k_proj.weight.T).view(-1, cfg.num_key_value_heads, hd)
        v = (hn @ a.v_proj.weight.T).view(-1, cfg.num_key_value_heads, hd)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        cache = state.layers[i]
        keys = torch.cat([cache.keys, k[:, :, None]], 2)  # [B, Hkv, n + 1, hd]
        vals = torch.cat([cache.values, v[:, :, None]], 2)
        kpos = torch.cat([cache.positions, pos.view(-1, 1, 1).expand(-1, keys.shape[1], 1)], 2)
        outs = []
        for h in range(cfg.num_attention_heads):
            kv = h // (cfg.num_attention_heads // keys.shape[1])
            ok = kpos[:, kv] >= 0
            if window is not None:
                ok &= pos[:, None] - kpos[:, kv] < window
            s = (keys[:, kv] @ q[:, h, :, None])[..., 0] / hd**0.5  # [B, n + 1]
            p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
            outs.append((p[:, :, None] * vals[:, kv]).sum(1))
        x = x + torch.cat(outs, -1) @ a.o_proj.weight.T
        hn = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (torch.nn.functional.silu(hn @ m.gate_proj.weight.T) * (hn @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("name", ["pyramidkv", "snapkv", "streamingllm"])
@torch.inference_mode()
def test_decode_step_equals_hand_written_attention(tiny, name):
    ref = engine(tiny, name)
    ids, mask = ref.encode([LONG, LONG[:100] + " and then?", LONG[:80]])  # all in the pyramid regime
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    selected = ref.policy.batch_selected(tiny.spec.num_layers, mask.sum(-1).tolist())
    state = CompressedKVState(ref.policy, selected, mask.bool(), positions)
    ref.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, pkv_state=state)
    lengths = {state.layers[i].keys.shape[2] for i in state.layers}
    if name == "pyramidkv":
        assert len(lengths) == tiny.spec.num_layers, "every layer has its own cache length"
    token, pos = torch.tensor([65, 66, 67]), positions[:, -1] + 1  # one token per prompt
    expected = hand_decode_step(ref.model, state, token, pos, tiny.spec.sliding_window)
    state.prefill, state.step_positions = False, pos
    got = ref.model(input_ids=token[:, None], position_ids=pos[:, None], use_cache=False, pkv_state=state).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["full", "pyramidkv", "h2o"])
def test_prefill_over_many_row_blocks_equals_one_block(tiny, name, monkeypatch):
    """The prefill attention runs over blocks of query rows (no [q, q] tensor); the blocks change nothing."""
    import engines.compressed_cache as cc
    import trt_plugins.pyramidkv_select as spec

    one = engine(tiny, name).generate(PROMPTS, 6, return_logits=True, return_indices=True)
    monkeypatch.setattr(cc, "PREFILL_BLOCK_ELEMENTS", 4 * 16 * 160)  # 4 heads: 16 rows of a 160-token prompt
    monkeypatch.setattr(spec, "OBS_BLOCK_ELEMENTS", 16 * 160)
    many = engine(tiny, name).generate(PROMPTS, 6, return_logits=True, return_indices=True)
    assert many.tokens == one.tokens
    torch.testing.assert_close(many.logits, one.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(one.kept_indices, many.kept_indices, strict=True):
        assert torch.equal(a, b)


def test_sliding_window_is_respected():
    """Mistral attends within its window: widening the window changes the output on a long prompt."""
    mistral = load_model("tiny-mistral")
    assert mistral.spec.sliding_window < 120
    wide = LoadedModel(dataclasses.replace(mistral.spec, sliding_window=4096), "wide", mistral.weights,
                       random_weights=True)
    a = engine(mistral, "full").generate([LONG], 6, return_logits=True)
    b = engine(wide, "full").generate([LONG], 6, return_logits=True)
    assert not torch.allclose(a.logits, b.logits)


def kept_sets(kept: torch.Tensor) -> list[list[int]]:
    """[Hc, n] unpadded kept positions -> per head the sorted positions actually held (-1 slots dropped)."""
    return [sorted(x for x in head if x >= 0) for head in kept.tolist()]


@pytest.mark.parametrize("name", ["pyramidkv", "snapkv", "h2o", "streamingllm", "full"])
def test_batched_equals_alone(tiny, name):
    """Every prompt gets its own budget, so batching with longer or shorter prompts changes nothing: pyramid,
    uniform and no-compression regimes in one batch, and a prompt shorter than the window."""
    prompts = [LONG, LONG[:90] + "!", LONG[:45], "Short prompt, left padded.", "Hi"]
    batched = engine(tiny, name).generate(prompts, 8, return_logits=True, return_indices=True)
    for b, prompt in enumerate(prompts):
        alone = engine(tiny, name).generate([prompt], 8, return_logits=True, return_indices=True)
        assert alone.tokens[0] == batched.tokens[b]
        steps = alone.logits.shape[1]  # a prompt that hits EOS alone stops earlier than the batch
        torch.testing.assert_close(alone.logits[0], batched.logits[b, :steps], atol=1e-4, rtol=1e-4)
        if name != "full":
            for layer in range(tiny.spec.num_layers):
                assert kept_sets(alone.kept_indices[layer][0]) == kept_sets(batched.kept_indices[layer][b])


def test_padding_is_never_selected(tiny):
    """Prompts of every regime in one batch: only the prompt's own tokens are held, each prompt its budget."""
    result = engine(tiny, "pyramidkv").generate(PROMPTS, 2, return_indices=True)
    for layer, kept in enumerate(result.kept_indices):
        for b, length in enumerate(result.prompt_lengths):
            held = kept_sets(kept[b])
            assert all(h[-4:] == list(range(length - 4, length)) for h in held), "the window is always held"
            assert all(len(h) == result.selected[b][layer] + 4 for h in held)
            assert all(0 <= x < length for h in held for x in h)


def test_query_head_granularity_caches_every_query_head(tiny):
    result = engine(tiny, "pyramidkv", granularity="query-head").generate(PROMPTS, 4, return_indices=True)
    assert result.kept_indices[0].shape[1] == tiny.spec.num_heads


def test_text_and_eos(tiny):
    result = engine(tiny, "pyramidkv").generate(["hi"], 5)
    assert result.prompt_lengths == [3]
    assert len(result.tokens[0]) <= 5 and isinstance(result.text[0], str)
