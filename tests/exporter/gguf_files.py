"""Small GGUF files written with ggml's own `gguf.GGUFWriter`, as llama.cpp's converter lays them out: q/k rows
permuted for its rotary kernel, tensors in a chosen type, a byte-level BPE tokenizer with a ChatML template in the
metadata. A Mistral is a `llama` file whose name says Mistral (llama.cpp has no `mistral` architecture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# 256 keeps every row a whole number of K-quant super-blocks (QK_K = 256).
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
MERGED = ["Ġt", "he"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def byte_tokens() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    from exporter.tokenizer import _byte_alphabet

    assert len(ByteLevel.alphabet()) == 256
    return _byte_alphabet()


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): the inverse of what the loader must undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(vocab: int, seed: int, tied: bool) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 weights of the small model (attention peaked enough to be deterministic)."""
    rng = np.random.default_rng(seed)

    def lin(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    out = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = lin(HEADS * HEAD_DIM, HIDDEN, 2.5)
        out[p + "self_attn.k_proj.weight"] = lin(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = lin(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = lin(HIDDEN, HEADS * HEAD_DIM)
        out[p + "mlp.gate_proj.weight"] = lin(INTERMEDIATE, HIDDEN)
        out[p + "mlp.up_proj.weight"] = lin(INTERMEDIATE, HIDDEN)
        out[p + "mlp.down_proj.weight"] = lin(HIDDEN, INTERMEDIATE)
        out[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        out[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    out["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    if not tied:
        out["lm_head.weight"] = lin(vocab, HIDDEN)
    return out


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def quantized_bytes(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """x in GGML type `kind`, as the uint8 blocks a GGUF holds. gguf-py quantizes the simple formats; for the
    K-quants (no Python quantizer) the blocks are random bytes with small finite fp16 scales: any such block is a
    valid tensor, which is all a loader test needs."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[kind]
    try:
        return quants.quantize(x, qtype)
    except NotImplementedError:
        pass
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = x.size // block
    raw = rng.integers(0, 256, size=(rows, size), dtype=np.uint8)
    scales = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (size - 2,), "Q2_K": (size - 4, size - 2),
              "Q3_K": (size - 2,)}[kind]
    for at in scales:  # d (and dmin): fp16 in [0.005, 0.02)
        raw[:, at:at + 2] = (rng.uniform(0.005, 0.02, rows).astype(np.float16)).view(np.uint8).reshape(rows, 2)
    if kind == "Q6_K":  # int8 sub-block scales: keep them small
        raw[:, 192:208] = rng.integers(-8, 8, size=(rows, 16), dtype=np.int8).view(np.uint8)
    return raw.reshape(*x.shape[:-1], -1)


def write_gguf(path: Path, kind: str = "F32", name: str = "Tiny Llama", seed: int = 0, arch: str = "llama",
               tied: bool = False, sliding_window: int | None = None, rope_theta: float = 10000.0,
               extra: dict | None = None, extra_tensors: dict | None = None) -> dict[str, np.ndarray]:
    """A small GGUF model at `path`; 2-D weights in `kind`, norms in F32 (as llama.cpp keeps them). `extra`: more
    metadata {key: (value, gguf value type name)}; `extra_tensors`: more tensors, stored as given. Returns the
    Hugging Face-named float32 weights it was made from (before quantization)."""
    import gguf

    tokens = byte_tokens() + MERGED + SPECIALS
    vocab = len(tokens)
    weights = hf_tensors(vocab, seed, tied)
    rng = np.random.default_rng(seed + 1)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (256 + len(MERGED)) + [3] * len(SPECIALS))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_pad_token_id(vocab - 3)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, (value, kind_name) in (extra or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType[kind_name.upper()])
    for hf, w in weights.items():
        stored = w
        if arch == "llama" and hf.endswith("q_proj.weight"):
            stored = permute_rows(w, HEADS)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            stored = permute_rows(w, KV_HEADS)
        if stored.ndim == 1 or kind == "F32":
            writer.add_tensor(gguf_name(hf), stored)
        elif kind == "F16":
            writer.add_tensor(gguf_name(hf), stored.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(hf), quantized_bytes(stored, kind, rng),
                              raw_dtype=gguf.GGMLQuantizationType[kind])
    for gname, array in (extra_tensors or {}).items():
        writer.add_tensor(gname, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
