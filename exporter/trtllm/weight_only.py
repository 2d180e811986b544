"""`build --backend trtllm --weights int8|int4`: TensorRT-LLM 1.2 weight-only quantization (W8A16 / W4A16).

What TensorRT-LLM's LLaMA converter writes (read, not copied: TensorRT-LLM cannot be installed here):
* `tensorrt_llm/models/llama/convert.py` `load_weights_from_hf_model`: with quant_algo W8A16 / W4A16 every decoder
  linear layer (qkv, dense, fc, gate, proj; not the embedding, lm_head or norms) goes through
  `get_tllm_linear_weight`, which transposes the rank's shard to [in K, out N] and calls
  `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix(v, int8 | quint4x2)`; with the weight-only plugin
  on (the default, `disable_weight_only_quant_plugin` False) it stores the op's FIRST output, the *processed* weight,
  as `<layer>.weight` and the scales as `<layer>.per_channel_scale`.
* `cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp` `symmetric_quantize_helper`: that first output is
  `processed_quantized_weight` (the unprocessed one is only returned by the `_`-prefixed test op), shape [K, N] int8
  (W8A16) or [K, N/2] int8 holding two int4 (W4A16); scales [N] in the weight's dtype.
* `cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp` `symmetric_quantize`: per output column n,
  step = max_k |w[k, n]| * (1 / 2^(bits-1)) (so max/128 for int8, max/8 for int4, not /127 or /7), the scale stored
  is step cast to the weight dtype, q = clip(round(w / step), -2^(bits-1), 2^(bits-1) - 1) with C's round (half away
  from zero) and w / step in float32; step 0 gives q 0. Then `preprocess_weights_for_mixed_gemm` on q.
* Where the preprocessing happens, so what the checkpoint must hold: `tensorrt_llm/models/modeling_utils.py`
  `PretrainedModel.from_checkpoint` -> `preprocess_weights` -> `preprocess_perlayer_weights`, whose W4A16/W8A16 branch
  calls `convert_utils.weight_only_quantize_dict`, which quantizes (and preprocesses) only tensors whose dtype is not
  int8. An int8 tensor in the checkpoint is loaded as it is. So the checkpoint holds the PREPROCESSED layout (plain
  row-major int8 would be read as preprocessed: wrong weights, no error), and that is what is written here.

The preprocessed layout depends on the GPU the converter ran on (`preprocess_weights_for_mixed_gemm` reads
`getSMVersion()`). Written here: the SM80-class layout (Ampere/Ada, sm80-89; TensorRT-LLM's own Python mirror in
`tensorrt_llm/quantization/functional.py` also maps sm120 and every 3-D/MoE weight to it), from
`cutlass_preprocessors.cpp` and `cutlass_extensions/gemm/kernel/mixed_gemm_B_layout.h` (`LayoutDetailsB<uint8_t |
uint4b_t, Sm80>`: `ColumnMajorTileInterleave<ThreadblockK 64, ColumnsInterleaved 128*8/bits/64>`,
`OpMultiplyAddDequantizeInterleavedBToA`), in its four steps:
1. LDSM row permutation (`permute_B_rows_for_mixed_gemm`): in every group of 16 (int8) / 32 (int4) rows k, row t of
   the output is row perm[t] of the input;
2. `subbyte_transpose`: column major, i.e. [N, K] row major (int4: two consecutive k per byte, low nibble first);
3. `interleave_column_major_tensor`: I = 2 (int8) / 4 (int4) columns interleaved in tiles of 64 k: the element stream
   is ordered [N / I, K / 64, I, 64];
4. `add_bias_and_interleave_quantized_tensor_inplace`: +128 / +8 (unsigned storage), then inside each 32-bit
   register the elements are reordered [0, 2, 1, 3] (int8) / [0, 2, 4, 6, 1, 3, 5, 7] (int4 nibbles).
Hopper (sm90) differs (the version of cutlass_preprocessors.cpp read here skips steps 1, 3 and 4 at arch 90, while
the newer Python mirror still applies 1 and 4 there), so the manifest records `layout: sm80` and such a checkpoint
is not claimed to be right for an sm90 trtllm-build; no real trtllm-build or GPU run checked any of this here.
The shape rules are the preprocessor's own: K a multiple of 64 (the tile), N of 32 (int8) / 64 (int4)
(`subbyte_transpose`'s 32-byte vectors); a shard that breaks them is refused, as TensorRT-LLM's converter would.

`dequantize` reads the layout back by address (where the documented layout puts logical element (k, n)), not by
running the four steps backwards: `engines/trtllm_layout.py` uses it to prove what is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporter.quantize import LinearLayersRewritten
from pkv_core.errors import UserInputError

LAYOUT = "sm80"  # see the docstring: the preprocessed layout of Ampere/Ada-class GPUs
TILE_K = 64  # ThreadblockK of LayoutDetailsB for 16-bit activations
LDSM_PERMUTATION = {
    8: (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15),
    4: (0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27, 4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22,
        23, 30, 31),
}
REGISTER_ORDER = {8: (0, 2, 1, 3), 4: (0, 2, 4, 6, 1, 3, 5, 7)}  # output slot d holds input element ORDER[d]
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # split on K across tp ranks


@dataclass(frozen=True)
class WeightOnly:
    """TensorRT-LLM weight-only quantization: bits 8 (W8A16) or 4 (W4A16), per output channel, symmetric."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserInputError(f"weight-only quantization has 4 or 8 bits (got {self.bits})")

    @classmethod
    def parse(cls, fmt: str) -> WeightOnly | None:
        if fmt == "fp":
            return None
        if fmt not in ("int8", "int4"):
            raise UserInputError(f"--weights must be fp, int8 or int4 (got {fmt!r})")
        return cls(int(fmt.removeprefix("int")))

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def quant_algo(self) -> str:
        return "W8A16" if self.bits == 8 else "W4A16"

    @property
    def interleave(self) -> int:
        return 16 // self.bits  # ColumnsInterleaved = (128 * 8 / bits) / ThreadblockK

    def record(self) -> dict:
        """The manifest's `weights` block."""
        return {"format": self.name, "per_channel": True, "symmetric": True, "quant_algo": self.quant_algo,
                "scale": f"max|w| / {1 << (self.bits - 1)} per output channel of each rank's shard",
                "quantized": "decoder linear layers (embedding, lm_head and norms in the checkpoint dtype)",
                "layout": LAYOUT}

    def quant_config(self) -> dict:
        """config.json `quantization`: every field TensorRT-LLM 1.2's QuantConfig.to_dict() writes."""
        return {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5,
                "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
                "exclude_modules": None}

    def packed_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the stored weight of an HF [N, K] shard: [K, N * bits / 8]."""
        return in_features, out_features * self.bits // 8

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        n_mult = 32 if self.bits == 8 else 64
        if in_features % TILE_K or out_features % n_mult:
            raise UserInputError(f"--weights {self.name}: {name} shard is {out_features} x {in_features} (out x in); "
                                 f"TensorRT-LLM's weight-only layout needs in a multiple of {TILE_K} and out of "
                                 f"{n_mult} (try a smaller --tp)")

    def quantize_values(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF weight [N, K] (checkpoint dtype) -> (q int8 [N, K] in [-2^(b-1), 2^(b-1)-1], scale [N] same dtype)."""
        w = weight.float()
        step = w.abs().amax(dim=1) * (1.0 / (1 << (self.bits - 1)))  # float32, as the C++ keeps per_col_max
        x = (w / torch.where(step == 0, 1.0, step)[:, None]).double()  # the float32 quotient, rounded exactly
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C round(): half away from zero
        q = torch.where(step[:, None] == 0, 0.0, q)
        q = q.clamp(-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1).to(torch.int8)
        return q, step.to(weight.dtype)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF weight shard [N, K] -> (preprocessed int8 [K, N * bits / 8], per_channel_scale [N])."""
        q, scale = self.quantize_values(weight)
        return self.preprocess(q.t()), scale

    def preprocess(self, q: torch.Tensor) -> torch.Tensor:
        """q [K, N] signed values (the row-major matrix the op quantized) -> the SM80 preprocessed bytes, [K, N*b/8]
        int8: the four steps of the docstring, in order."""
        b, (k, n) = self.bits, q.shape
        perm = torch.tensor(LDSM_PERMUTATION[b])
        rows = torch.arange(k)
        q = q[(rows // len(perm)) * len(perm) + perm[rows % len(perm)]]  # 1. LDSM row permutation
        q = q.t()  # 2. column major: [N, K]
        i = self.interleave
        q = q.reshape(n // i, i, k // TILE_K, TILE_K).permute(0, 2, 1, 3).reshape(-1)  # 3. [N/I, K/64, I, 64]
        u = (q.to(torch.int16) + (1 << (b - 1))).to(torch.uint8)  # 4. unsigned storage ...
        u = u.reshape(-1, len(REGISTER_ORDER[b]))[:, list(REGISTER_ORDER[b])].reshape(-1)  # ... register order
        if b == 4:
            u = u[0::2] | (u[1::2] << 4)  # two per byte, the first in the low nibble
        return u.view(torch.int8).reshape(k, n * b // 8)

    def dequantize(self, stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A stored weight [K, N*b/8] and its per_channel_scale [N] -> the HF-orientation weight [N, K] float32,
        each logical (k, n) read from where the SM80 layout puts it (not the steps of `preprocess` undone)."""
        b, k = self.bits, stored.shape[0]
        n = scale.shape[0]
        if stored.shape != self.packed_shape(n, k) or stored.dtype != torch.int8:
            raise ValueError(f"weight-only tensor {tuple(stored.shape)} {stored.dtype} does not hold {n} x {k}")
        perm, order = LDSM_PERMUTATION[b], REGISTER_ORDER[b]
        r, g, i = len(perm), len(order), self.interleave
        kk, nn = torch.arange(k), torch.arange(n)[:, None]
        # LDSM: logical row k is the permuted row k' whose perm[k' % r] is k % r.
        where_in_group = torch.empty(r, dtype=torch.long)
        where_in_group[torch.tensor(perm)] = torch.arange(r)
        kp = (kk // r) * r + where_in_group[kk % r]
        # ColumnMajorTileInterleave<64, I>: column tile n // I, then the 64-row tile, then n % I, then k' % 64.
        pos = ((nn // i) * (k // TILE_K) + kp // TILE_K) * (i * TILE_K) + (nn % i) * TILE_K + kp % TILE_K
        slot = torch.empty(g, dtype=torch.long)
        slot[torch.tensor(order)] = torch.arange(g)  # element j of a register sits in slot `slot[j]`
        phys = (pos // g) * g + slot[pos % g]  # [N, K] element index in the stored stream
        data = stored.reshape(-1).view(torch.uint8).to(torch.int32)
        if b == 8:
            values = data[phys]
        else:
            values = (data[phys // 2] >> (4 * (phys % 2))) & 0xF
        return (values - (1 << (b - 1))).float() * scale.float()[:, None]


class QuantDequantWeights(LinearLayersRewritten):
    """The reference of a weight-only checkpoint: every decoder linear layer quantized per output channel exactly as
    `WeightOnly.quantize_values` does and multiplied back by its stored scale, shard by shard as the checkpoint has
    it (the row-parallel o_proj / down_proj in `tp` column chunks, each with its own scales); all else unchanged.
    No layout is involved: the layout is what `layout_forward` over the checkpoint proves against this."""

    def __init__(self, source, quant: WeightOnly, tp: int = 1, dtype: torch.dtype = torch.float32):
        super().__init__(source)
        self.quant, self.tp, self.dtype_ = quant, tp, dtype

    def rewrite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(tensor.to(self.dtype_), self.tp if name.endswith(ROW_PARALLEL) else 1, dim=1)
        out = []
        for chunk in chunks:
            q, scale = self.quant.quantize_values(chunk)
            out.append(q.float() * scale.float()[:, None])
        return torch.cat(out, dim=1)
