"""Build the Hugging Face LlamaForCausalLM / MistralForCausalLM of a resolved model, weights streamed in.

The model skeleton is created on the meta device (no memory, no random init), then every tensor is read from
the weight source one at a time and assigned; rotary buffers, which are not in checkpoints, are rebuilt.
"""

from __future__ import annotations

import torch

from exporter.checkpoint import LoadedModel
from exporter.specs import tensor_shapes
from pkv_core.errors import UserInputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserInputError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})") from None


def build_hf_model(loaded: LoadedModel, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    from transformers import LlamaForCausalLM, MistralForCausalLM

    spec = loaded.spec
    if loaded.weights is None:
        raise UserInputError(f"{loaded.source}: no weights available")
    config = spec.to_hf_config(attn_implementation=attn_implementation)
    cls = MistralForCausalLM if spec.arch == "mistral" else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(config)
    state = {name: loaded.weights.get(name).to(dtype) for name in tensor_shapes(spec)}
    model.load_state_dict(state, strict=not spec.tie_word_embeddings, assign=True)
    if spec.tie_word_embeddings:
        model.tie_weights()
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config)
    return model.eval()


CAPTURE_IMPLEMENTATION = "pkv_capture"


@torch.inference_mode()
def capture_prefill(loaded: LoadedModel, input_ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """One prompt's FullKV prefill with Hugging Face's eager attention, recording what every layer's selection
    reads: per layer `query` [1, H, q, d] and `key` / `value` [1, Hkv, q, d] post-RoPE, `hidden` [1, q, hidden]
    (the attention's input, after its norm) and `cos` / `sin` [1, q, d] (the rotary tables)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    records: dict[int, dict[str, torch.Tensor]] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        records.setdefault(module.layer_idx, {}).update(query=query.clone(), key=key.clone(), value=value.clone())
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, eager_mask)
    model = build_hf_model(loaded, torch.float32, attn_implementation=CAPTURE_IMPLEMENTATION)

    def before(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        records.setdefault(module.layer_idx, {}).update(hidden=kwargs["hidden_states"].clone(), cos=cos, sin=sin)

    hooks = [layer.self_attn.register_forward_pre_hook(before, with_kwargs=True) for layer in model.model.layers]
    try:
        model(input_ids=torch.tensor([input_ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [records[i] for i in range(loaded.spec.num_layers)]
