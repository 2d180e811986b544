"""The selections as chains of GPU kernels: which kernels run in which order, their tensors, output shapes, grids
and compile-time constants. The one description that the Triton-lang path (`triton_select`), the AOT payloads
(`trt_aot`), the TensorRT plugins (`trt_plugin`) and the TensorRT graph rewrite (`trt_chain`) all read, so the
TensorRT engine runs exactly the kernels the CPU tests run under the interpreter.

A stage is one kernel, and one TensorRT plugin `pkv::<name>` whose single AOT kernel it is. Its parameters, in
order: input tensors, int32 scalars (`q_len`: the prompt's padded length, read from the keys / raw scores;
`length`: the ranked row's length, read from that input; `width`: the output slots), output tensors, then the
compile-time constants (UPPERCASE names, which are also the plugin's attributes). Every program of a stage works
on one (batch row, head) and one share of it: grid = B x rows x programs.

Chains (`Step`s in order; a tensor is named by its kernel parameter, `hist_in` reads the last `hist`):

    PyramidKVSelect / SnapKV / H2O: SelectPartials, SelectScores, SelectPool, SelectRadix x 3, SelectEmit
    StreamingLLMSelect:             StreamingSelect
    ChunkKVSelect:                  SelectPartials, SelectScores, ChunkSums, SelectRadix x 3, ChunkEmit
    ChunkKVGather (index reuse):    ChunkHist, SelectRadix x 3, ChunkEmit
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import triton

from trt_plugins import triton_chunks, triton_scores, triton_streaming, triton_topk

SPLITS = 64  # NS: programs per (row, head) that share the keys of the score kernels
PROGRAMS = 16  # NT: programs per (row, head) of the top-k kernels
BLOCK_K = 64  # keys per block of a loop
ALIGN = 64  # a program's share of a row starts at a multiple of this
SCALARS = ("q_len", "length", "width")
# dtype of each tensor by name: "data" is the model's (queries, keys, values and their gathered copies)
KINDS = {"queries": "data", "keys": "data", "values": "data", "keys_out": "data", "values_out": "data",
         "lengths": "i64", "selected": "i64", "kept": "i64", "hist_in": "i32", "hist": "i32"}


@dataclass(frozen=True)
class Stage:
    name: str  # the plugin is pkv::<name>
    kernel: Callable  # a @triton.jit function
    rows: str  # the constant giving rows per batch row ("" = 1)
    programs: str  # the constant giving programs per row
    heads: str = ""  # the constant giving the heads of the kept / K / V outputs (default: rows)
    extra: tuple[str, ...] = ()  # plugin attributes beyond the kernel's constants (output shapes only)

    @property
    def params(self) -> list[str]:
        return list(self.kernel.arg_names)

    @property
    def constexprs(self) -> list[str]:
        return [p for p in self.params if p.isupper()]

    @property
    def scalars(self) -> list[str]:
        return [p for p in self.params if p in SCALARS]

    @property
    def inputs(self) -> list[str]:
        params = self.params
        return params[: params.index(self.scalars[0])]

    @property
    def outputs(self) -> list[str]:
        params = self.params
        return [p for p in params[params.index(self.scalars[-1]) + 1:] if not p.isupper()]

    @property
    def attributes(self) -> list[str]:
        return self.constexprs + list(self.extra)

    def grid(self, batch, constants: dict):
        """Programs of a launch: batch (an int or a TensorRT shape expression) x rows x programs."""
        return batch * (int(constants.get(self.rows, 1)) * int(constants[self.programs]))


PARTIALS = Stage("SelectPartials", triton_scores._obs_partials, "HC", "NS")
SCORES = Stage("SelectScores", triton_scores._obs_scores, "HC", "NS")
POOL = Stage("SelectPool", triton_topk._pool_hist, "HC", "NT")
RADIX = Stage("SelectRadix", triton_topk._radix_pass, "ROWS", "NT")
EMIT = Stage("SelectEmit", triton_topk._select_emit, "HC", "NT", extra=("MAX_SELECTED",))
STREAMING = Stage("StreamingSelect", triton_streaming._streaming_select, "HKV", "NT", extra=("MAX_SELECTED",))
CHUNK_SUMS = Stage("ChunkSums", triton_chunks._chunk_sums, "", "NT")
CHUNK_HIST = Stage("ChunkHist", triton_chunks._chunk_hist, "", "NT")
CHUNK_EMIT = Stage("ChunkEmit", triton_chunks._chunk_emit, "", "NT", "HKV", ("MAX_SELECTED",))
STAGES = (PARTIALS, SCORES, POOL, RADIX, EMIT, STREAMING, CHUNK_SUMS, CHUNK_HIST, CHUNK_EMIT)


@dataclass(frozen=True)
class Step:
    stage: Stage
    constants: dict = field(default_factory=dict)  # overrides for this step (the radix pass)
    rename: dict = field(default_factory=dict)  # kernel parameter -> tensor name in the chain

    def source(self, param: str) -> str:
        return self.rename.get(param, "hist" if param == "hist_in" else param)


def _radix(ranked: str) -> tuple[Step, ...]:
    return tuple(Step(RADIX, {"PASS": p}, {"ranked": ranked}) for p in (1, 2, 3))


PYRAMIDKV = (Step(PARTIALS), Step(SCORES), Step(POOL), *_radix("pooled"), Step(EMIT))
STREAMINGLLM = (Step(STREAMING),)
CHUNKKV = (Step(PARTIALS), Step(SCORES), Step(CHUNK_SUMS), *_radix("chunk_scores"), Step(CHUNK_EMIT))
CHUNKKV_GATHER = (Step(CHUNK_HIST), *_radix("chunk_scores"), Step(CHUNK_EMIT))


def _power_of_two(name: str, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two (got {value})")
    return value


def pyramidkv_constants(num_heads: int, num_kv_heads: int, head_dim: int, window: int, kernel: int, pooling: str,
                        granularity: str, observe: str, *, splits: int = SPLITS, programs: int = PROGRAMS,
                        block_k: int = BLOCK_K, align: int = ALIGN) -> dict:
    """Every constant of the PyramidKV chain (each kernel takes the ones it names)."""
    group = num_heads // num_kv_heads
    query_head = granularity == "query-head"
    heads = 1 if query_head else group
    observe_all = observe == "all"
    hc = num_heads if query_head else num_kv_heads
    return dict(SCALE=float(head_dim) ** -0.5, H=num_heads, HKV=num_kv_heads, HC=hc, ROWS=hc, GROUP=group,
                HEADS=heads, D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), WINDOW=window,
                OBSERVE_ALL=int(observe_all), QUERY_HEAD=int(query_head), NS=_power_of_two("splits", splits),
                PS=1 if observe_all else splits, NT=_power_of_two("programs", programs),
                BLOCK_R=32 if observe_all else max(16, triton.next_power_of_2(heads * window)),
                BLOCK_K=block_k, ALIGN=align, KERNEL=kernel if pooling != "none" else 1,
                POOLING={"none": 0, "max": 1, "avg": 2}[pooling], CHUNK=0)


def streaming_constants(num_kv_heads: int, head_dim: int, window: int, sinks: int, *, programs: int = PROGRAMS,
                        block_k: int = BLOCK_K) -> dict:
    return dict(HKV=num_kv_heads, D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), WINDOW=window,
                SINKS=sinks, NT=_power_of_two("programs", programs), BLOCK_K=block_k)


def chunkkv_constants(num_heads: int, num_kv_heads: int, head_dim: int, window: int, chunk_size: int, kernel: int,
                      pooling: str, **blocks) -> dict:
    """The ChunkKV chains': the score kernels as PyramidKV's (kv-head, window rows), one ranked row per batch row."""
    scores = pyramidkv_constants(num_heads, num_kv_heads, head_dim, window, kernel, pooling, "kv-head", "window",
                                 **blocks)
    chunk_p2 = triton.next_power_of_2(chunk_size)
    return scores | dict(ROWS=1, CHUNK=chunk_size, CHUNK_P2=chunk_p2, BLOCK_C=max(1, 64 // chunk_p2))


@dataclass(frozen=True)
class Dims:
    """The sizes output shapes are made of: ints, or TensorRT shape expressions with its `min` / `cdiv`."""
    batch: object
    q_len: object
    minimum: Callable = min
    cdiv: Callable = lambda a, b: -(-a // b)


def width(dims: Dims, constants: dict):
    """Output slots of an emit stage: the layer's largest budget plus the window (wider than any row needs)."""
    return dims.minimum(dims.q_len, int(constants["WINDOW"])) + int(constants["MAX_SELECTED"])


def output_shapes(stage: Stage, dims: Dims, constants: dict) -> list[tuple]:
    """The shape of each output of `stage` (in `stage.outputs` order)."""
    c = {k: int(v) for k, v in constants.items() if k != "SCALE"}
    b, q = dims.batch, dims.q_len
    rows = c.get(stage.rows, 1)
    heads = c.get(stage.heads or stage.rows, 1)

    def observed():  # observation rows per head: the window's, or every position's
        return q if c["OBSERVE_ALL"] else dims.minimum(q, c["WINDOW"])

    shapes = {
        "partials": lambda: (b, c["HC"], observed() * (2 * c["PS"] * c["HEADS"])),
        "raw": lambda: (b, c["HC"], q),
        "pooled": lambda: (b, c["HC"], q),
        "hist": lambda: (b, rows, c.get("PASS", 0) + 1, c["NT"], triton_topk.BINS),
        "chunk_scores": lambda: (b, dims.cdiv(q, c["CHUNK"])),
        "kept": lambda: (b, heads, width(dims, c)),
        "keys_out": lambda: (b, heads, width(dims, c), c["D"]),
        "values_out": lambda: (b, heads, width(dims, c), c["D"]),
        "scores": lambda: (b, heads, 2, q),
    }
    return [shapes[name]() for name in stage.outputs]


def scalar_values(stage: Stage, shapes: dict, out_width) -> list:
    """The int32 scalars of a launch from the input shapes by name (ints or shape expressions) and the width."""
    values = {"width": out_width}
    if "keys" in shapes or "raw" in shapes:
        values["q_len"] = (shapes["keys"] if "keys" in shapes else shapes["raw"])[2]
    values["length"] = shapes[stage.inputs[0]][-1]
    return [values[s] for s in stage.scalars]
