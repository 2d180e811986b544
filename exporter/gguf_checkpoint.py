"""GGUF checkpoints (llama.cpp's format): the model spec from the file's metadata, weights dequantized tensor by
tensor, the tokenizer converted once and cached.

The file is memory-mapped by ggml's own `gguf` package; nothing is read until a tensor is asked for, so `plan`
never dequantizes anything and an engine writer holds one dequantized tensor at a time (as with sharded
safetensors). llama.cpp stores LLaMA's q/k projections with the rows of each head interleaved for its rotary
kernel (`convert_hf_to_gguf.py`'s `permute`); `get` undoes that, so names, shapes and values are exactly those of
the Hugging Face checkpoint transformers' own GGUF loader reconstructs (tested tensor by tensor).

Architecture: `llama`, which covers LLaMA 1/2/3 and Mistral 7B (llama.cpp writes Mistral as `llama`; it is
recognised by its name, and its sliding window comes from `llama.attention.sliding_window` when the file has one:
llama.cpp's converter does not write Mistral v0.1's). Neither llama.cpp nor gguf-py nor transformers knows a `mistral`
GGUF architecture. Mixture-of-experts files, biases and partial rotary dimensions are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pkv_core.errors import UserInputError

# Tensor types read here: the float ones and the block formats `gguf.quants` dequantizes (tested: the first
# eleven; the rest use the same dequantizers and are accepted too).
FLOAT_TYPES = ("F32", "F16", "BF16")
TESTED_QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
OTHER_QUANT_TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                     "IQ1_S", "IQ1_M")
READ_TYPES = FLOAT_TYPES + TESTED_QUANT_TYPES + OTHER_QUANT_TYPES

ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face name ({i}: the layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"  # LLaMA-3.1's frequency factors, folded into the spec's rope_scaling


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; names with no counterpart are kept as they are (and then refused
    by `check_complete` as tensors the architecture does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return gguf_name


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. w: [heads * d, hidden]; llama.cpp stores each head's rows as pairs
    (i, i + d/2) interleaved; Hugging Face keeps the two halves of the head apart (rotate_half)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class GGUFIndex(NamedTuple):
    """What a GGUF file holds, without its data: metadata (arrays longer than `_SHORT` by their length only, since
    the tokenizer's 49k-entry lists are read by the tokenizer conversion, not here) and the tensor table."""

    fields: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (type, ggml shape, data offset, bytes)

    @staticmethod
    def read(path: Path) -> GGUFIndex:
        """Parse the file with ggml's `gguf` reader (seconds for a large vocabulary)."""
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
            fields = {}
            for key, f in reader.fields.items():
                if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > _SHORT:
                    fields[key] = {"array_length": len(f.data)}
                else:
                    fields[key] = f.contents()
            tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape.tolist()), int(t.data_offset),
                                int(t.n_bytes)) for t in reader.tensors}
        except (ValueError, OSError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserInputError(f"{path}: not a readable GGUF file (truncated or corrupt: {_first_line(e)})") from None
        return GGUFIndex(fields, tensors)

    @staticmethod
    def cached(path: Path) -> GGUFIndex:
        """The index from the user's cache (keyed by the file's sha256, which the hash cache keeps per file
        identity), parsed and saved there the first time."""
        from exporter.outputs import atomic_write_text

        where = gguf_cache_dir(path) / "index.json"
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(where.read_text())
            return GGUFIndex(data["fields"], {k: (v[0], tuple(v[1]), v[2], v[3]) for k, v in data["tensors"].items()})
        index = GGUFIndex.read(path)
        with contextlib.suppress(OSError, TypeError, ValueError):
            where.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(where, json.dumps({"fields": index.fields, "tensors": index.tensors}))
        return index


_SHORT = 1024


def file_sha256(path: Path) -> str:
    from exporter.hash_cache import HashCache

    cache = HashCache()
    digest = cache.sha256(path)
    cache.save()
    return digest


def gguf_cache_dir(path: Path) -> Path:
    """Where what is derived from this GGUF file lives (keyed by its sha256: a renamed copy shares it)."""
    from exporter.hash_cache import cache_dir

    return cache_dir() / "gguf" / file_sha256(path)


class GGUFCheckpoint:
    """One GGUF file: its metadata, its tensor table, and a `WeightSource` view with Hugging Face names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserInputError("reading GGUF files needs the `gguf` package (pip install gguf==0.19.0)") from None
        if not self.path.is_file():
            raise UserInputError(f"{self.path}: no such file")
        with self.path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserInputError(f"{self.path}: not a GGUF file (no GGUF magic)")
        index = GGUFIndex.cached(self.path)
        self.fields, self.tensors = index.fields, index.tensors
        size = self.path.stat().st_size
        for name, (_, _, offset, nbytes) in self.tensors.items():
            if offset + nbytes > size:
                raise UserInputError(f"{self.path}: file is truncated ({size} bytes; tensor '{name}' ends at "
                                     f"{offset + nbytes})")
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UserInputError(f"{self.path}: GGUF architecture '{self.arch}' is not supported; pkv-export reads "
                                 "'llama' GGUF files (LLaMA, and Mistral as llama.cpp writes it)")
        for name, (kind, *_) in self.tensors.items():
            if kind not in READ_TYPES:
                raise UserInputError(f"{self.path}: tensor '{name}' has type {kind}, which pkv-export cannot "
                                     f"dequantize (it reads {', '.join(FLOAT_TYPES + TESTED_QUANT_TYPES)} and the "
                                     "other K/IQ block types)")
        self._data = np.memmap(self.path, mode="r")

    # --- metadata -------------------------------------------------------------------------------------------------

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    @cached_property
    def model_type(self) -> str:
        """`mistral` for files whose name says Mistral (how transformers tells them apart too)."""
        names = " ".join(str(self.field(k) or "") for k in ("general.name", "general.basename")).lower()
        return "mistral" if "mistral" in names else "llama"

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a Hugging Face config.json, so `ModelSpec.from_hf_config` checks it like any other."""
        if (self._arch_field("expert_count") or 0) > 0:
            raise UserInputError(f"{self.path}: a mixture-of-experts GGUF ({self._arch_field('expert_count')} "
                                 "experts); pkv-export exports dense LLaMA / Mistral models")
        heads = self._arch_field("attention.head_count")
        hidden = self._arch_field("embedding_length")
        if isinstance(heads, list):
            raise UserInputError(f"{self.path}: per-layer head counts are not supported")
        head_dim = self._arch_field("attention.key_length")
        if head_dim is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
            head_dim = hidden // heads
        rot = self._arch_field("rope.dimension_count", head_dim)
        if rot != head_dim:
            raise UserInputError(f"{self.path}: rotary dimension {rot} differs from the head dimension {head_dim} "
                                 "(partial rotary embeddings are not supported)")
        embd = self.tensors.get("token_embd.weight")
        vocab = self._arch_field("vocab_size")
        if vocab is None:
            tokens = self.field("tokenizer.ggml.tokens")
            if isinstance(tokens, dict):
                vocab = tokens["array_length"]
            elif isinstance(tokens, list):
                vocab = len(tokens)
            elif embd is not None and len(embd[1]) == 2:
                vocab = embd[1][1]
        missing = [k for k, v in (("block_count", self._arch_field("block_count")), ("embedding_length", hidden),
                                  ("attention.head_count", heads),
                                  ("feed_forward_length", self._arch_field("feed_forward_length"))) if v is None]
        if missing:
            raise UserInputError(f"{self.path}: metadata lacks {', '.join(f'{self.arch}.{k}' for k in missing)}")
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self._arch_field("feed_forward_length"),
            "num_hidden_layers": self._arch_field("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch_field("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "max_position_embeddings": self._arch_field("context_length", 2048),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
        }
        if self.model_type == "mistral":
            config["sliding_window"] = self._arch_field("attention.sliding_window")
        scaling = self._rope_scaling(head_dim, config["rope_theta"])
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def _rope_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        kind = self._arch_field("rope.scaling.type", "none")
        factor = self._arch_field("rope.scaling.factor")
        original = self._arch_field("rope.scaling.original_context_length")
        if ROPE_FREQS in self.tensors:
            return self._llama3_scaling(head_dim, theta, original)
        if kind in (None, "none") or factor in (None, 0, 1.0):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn" and original:
            return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}
        raise UserInputError(f"{self.path}: rope scaling '{kind}' is not supported")

    def _llama3_scaling(self, head_dim: int, theta: float, original: int | None) -> dict[str, Any]:
        """LLaMA-3.1/3.2 files carry their rope scaling as per-frequency factors (`rope_freqs`); the spec needs the
        llama3 rule's parameters: the factor is the largest one, the rest are LLaMA-3.1's, checked against every
        stored factor (anything else is refused rather than approximated)."""
        stored = self._array(ROPE_FREQS).reshape(-1).astype(np.float64)
        if stored.shape[0] != head_dim // 2:
            raise UserInputError(f"{self.path}: {ROPE_FREQS} has {stored.shape[0]} entries, expected {head_dim // 2}")
        factor = float(stored.max())
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": int(original or 8192)}
        if not np.allclose(stored, llama3_frequency_factors(scaling, head_dim, theta), rtol=1e-4, atol=1e-6):
            raise UserInputError(f"{self.path}: {ROPE_FREQS} is not LLaMA-3.1's llama3 rope scaling; not supported")
        return scaling

    # --- weights (a WeightSource with Hugging Face names) ----------------------------------------------------------

    @cached_property
    def _names(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name, in file order (rope_freqs is metadata, not a weight)."""
        return {hf_name(n): n for n in self.tensors if n != ROPE_FREQS}

    @cached_property
    def _heads(self) -> tuple[int, int]:
        heads = int(self._arch_field("attention.head_count"))
        return heads, int(self._arch_field("attention.head_count_kv", heads))

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        # ggml lists dimensions innermost first; torch outermost first
        return tuple(reversed(self.tensors[self._names[name]][1]))

    def dtype(self, name: str) -> torch.dtype:
        kind = self.tensors[self._names[name]][0]
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)

    def tensor_type(self, name: str) -> str:
        return self.tensors[self._names[name]][0]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, dequantized (F16 / BF16 stay in their dtype, block formats become fp32), q/k rows in Hugging
        Face's order."""
        if name not in self._names:
            raise UserInputError(f"{self.path}: tensor '{name}' is missing from the checkpoint")
        kind = self.tensor_type(name)
        array = self._array(self._names[name]).reshape(self.shape(name))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads, kv_heads = self._heads
            array = unpermute_rows(array, heads if name.endswith("q_proj.weight") else kv_heads)
        out = torch.from_numpy(array if array.flags.writeable and array.flags.c_contiguous else array.copy())
        return out.to(torch.bfloat16) if kind == "BF16" else out

    def _array(self, gguf_name: str) -> np.ndarray:
        """A tensor's values from the memory map: F32 / F16 as stored, every other type dequantized to fp32 by
        `gguf.quants` (rows of whole blocks: [outer dims..., ne0])."""
        import gguf
        from gguf import quants

        kind, shape, offset, nbytes = self.tensors[gguf_name]
        raw = self._data[offset:offset + nbytes]
        dims = tuple(reversed(shape))
        if kind == "F32":
            return raw.view(np.float32).reshape(dims)
        if kind == "F16":
            return raw.view(np.float16).reshape(dims)
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            blocks = raw.reshape(quants.quant_shape_to_byte_shape(dims, qtype))
            return np.asarray(quants.dequantize(blocks, qtype), dtype=np.float32)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise UserInputError(f"{self.path}: tensor '{gguf_name}' ({kind}) cannot be dequantized "
                                 f"({_first_line(e)})") from None


def llama3_frequency_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors of the llama3 rope rule (what llama.cpp stores as rope_freqs): [head_dim / 2]."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor,
                                                       1.0 / ((1 - smooth) / factor + smooth)))
    return out
