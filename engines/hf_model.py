"""Build the Hugging Face LlamaForCausalLM / MistralForCausalLM of a resolved model, weights streamed in.

The model skeleton is created on the meta device (no memory, no random init), then every tensor is read from
the weight source one at a time and assigned; rotary buffers, which are not in checkpoints, are rebuilt.
"""

from __future__ import annotations

import torch

from exporter.checkpoint import LoadedModel
from exporter.errors import UserInputError
from exporter.specs import tensor_shapes

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
