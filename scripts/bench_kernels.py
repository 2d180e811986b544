"""The selection kernels on a GPU: time per context length against the PyTorch specification and against the
bytes-bound time (GPU hosts; `scripts/gpu_acceptance.py`'s "kernel benchmark" section runs this).

    python scripts/bench_kernels.py [--contexts 4096 8192 16384 32768] [--repeats 20] [--no-doc]

Shapes: LLaMA-3-8B's heads, queries [1, q, 32, 128], keys / values [1, 8, q, 128] fp16, 248 selected + window 8.
Rows, one per method and context:

* pyramidkv (max pooling 7, kv-head): `kernel_ms`, the GPU time of the kernel chain the TensorRT plugins run
  (the plugins' cut: 64 score programs and 16 top-k programs per KV head), replayed from a CUDA graph so that
  Python's launch overhead is not counted, as in a TensorRT plan; `python_ms`, `pyramidkv_select_triton` end to
  end (its input checks synchronise); `spec_ms`, the PyTorch specification `pyramidkv_select` on the same GPU;
  `stage_ms`, each kernel alone;
* streamingllm (sinks 4) and chunkkv (chunk 10, avg pooling 5): their kernel chains; their specifications
  build CPU tensors, so they run on the CPU copies only to check the results (no `spec_ms`).

`bytes_bound_us`: the bytes of K and V the op is given (keys and values, whole) over the GPU's memory bandwidth;
`bandwidth_source` says where that came from: the device properties (2 x memory clock x bus width, DDR) when
torch reports them, else a table of datasheet numbers keyed by device name. Every row fails unless the kernels'
kept indices and K/V equal the specification's. Median over `--repeats` timed replays with CUDA events, after a
warm-up; prints JSON, then Markdown, and writes the docs/benchmarks.md section unless `--no-doc`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Datasheet peak memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name (first match wins).
BANDWIDTH_TABLE = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                   ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
                   ("A100", 1.555e12), ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12)]
COLUMNS = ["method", "context", "kernel_ms", "python_ms", "spec_ms", "kernel_vs_spec", "bytes_bound_us",
           "kernel_vs_bytes_bound", "indices_equal", "kv_equal"]


def memory_bandwidth(props, name: str) -> tuple[float | None, str]:
    """(bytes/s, where from): 2 x memory clock (kHz in torch's device properties) x bus width (bits) / 8, or
    the table's datasheet number for the device name, or None."""
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8, f"device properties: {clock / 1e3:.0f} MHz x {bus} bit, DDR"
    for key, value in BANDWIDTH_TABLE:
        if key in name:
            return value, f"datasheet table: {key}"
    return None, f"unknown device {name!r} (no memory clock in its properties, not in the table)"


def bytes_bound_us(nbytes: int, bandwidth: float | None) -> float | None:
    return None if not bandwidth else round(nbytes / bandwidth * 1e6, 2)


def _median_ms(fn, repeats: int) -> float:
    import torch

    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


def _graph(fn):
    """fn captured in a CUDA graph (after a warm-up run outside it); returns its replay."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def chain_times(chain, tensors: dict, constants: dict, repeats: int) -> tuple[float, dict, dict]:
    """(the chain's GPU ms, each stage's GPU ms, the chain's tensors) from CUDA-graph replays."""
    from trt_plugins.triton_select import launch, run_chain

    env = run_chain(chain, tensors, constants)
    total = _median_ms(_graph(lambda: run_chain(chain, tensors, constants)), repeats)
    stages, state = {}, dict(tensors)
    for i, step in enumerate(chain):
        ins = {p: state[step.source(p)] for p in step.stage.inputs}
        c = constants | step.constants
        stages[f"{i}.{step.stage.name}"] = round(_median_ms(_graph(lambda s=step.stage, x=ins, k=c: launch(s, x, k)),
                                                            repeats), 4)
        state.update(launch(step.stage, ins, c))
    return total, stages, env


def _equal(got: dict, want) -> tuple[bool, bool]:
    """Kept indices and K/V of the plugin-width outputs against the spec's (the slots after its width: -1, 0)."""
    import torch

    idx, k, v = (got[n].cpu() for n in ("kept", "keys_out", "values_out"))
    n = want[0].shape[-1]
    indices = torch.equal(idx[..., :n], want[0].cpu()) and bool((idx[..., n:] == -1).all())
    kv = torch.equal(k[..., :n, :], want[1].cpu()) and torch.equal(v[..., :n, :], want[2].cpu()) and \
        not k[..., n:, :].any()
    return indices, kv


def rows_at(q: int, repeats: int, bandwidth: float | None, selected: int = 248, window: int = 8) -> list[dict]:
    """One row per method at context length q (module docstring)."""
    from functools import partial

    import torch

    from trt_plugins import select_stages as st
    from trt_plugins.chunkkv_select import chunkkv_select
    from trt_plugins.pyramidkv_select import pyramidkv_select
    from trt_plugins.streaming_select import streaming_select
    from trt_plugins.triton_select import pyramidkv_select_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    queries = torch.randn(1, q, 32, 128, device="cuda", dtype=torch.float16, generator=g)
    keys = torch.randn(1, 8, q, 128, device="cuda", dtype=torch.float16, generator=g)
    values = torch.randn(1, 8, q, 128, device="cuda", dtype=torch.float16, generator=g)
    tensors = dict(queries=queries, keys=keys, values=values, lengths=torch.tensor([q], device="cuda"),
                   selected=torch.tensor([selected], device="cuda"))
    cpu = {k: v.cpu() for k, v in tensors.items()}
    bound = bytes_bound_us(keys.nbytes + values.nbytes, bandwidth)
    cases = [("pyramidkv", st.PYRAMIDKV, st.pyramidkv_constants(32, 8, 128, window, 7, "max", "kv-head", "window")),
             ("streamingllm", st.STREAMINGLLM, st.streaming_constants(8, 128, window, 4)),
             ("chunkkv", st.CHUNKKV, st.chunkkv_constants(32, 8, 128, window, 10, 5, "avg"))]
    rows = []
    for method, chain, constants in cases:
        kernel_ms, stages, env = chain_times(chain, tensors, constants | {"MAX_SELECTED": selected}, repeats)
        row = {"method": method, "context": q, "kernel_ms": round(kernel_ms, 4), "python_ms": None, "spec_ms": None,
               "kernel_vs_spec": None, "bytes_bound_us": bound,
               "kernel_vs_bytes_bound": None if not bound else round(kernel_ms * 1e3 / bound, 2), "stage_ms": stages}
        if method == "pyramidkv":
            want = pyramidkv_select(*tensors.values(), window)
            row["spec_ms"] = round(_median_ms(partial(pyramidkv_select, *tensors.values(), window), repeats), 4)
            row["python_ms"] = round(_median_ms(partial(pyramidkv_select_triton, *tensors.values(), window),
                                                repeats), 4)
            faster = row["spec_ms"] / kernel_ms
            row["kernel_vs_spec"] = f"{faster:.2f}x faster" if faster >= 1 else f"{1 / faster:.2f}x slower"
        elif method == "streamingllm":
            want = streaming_select(cpu["keys"], cpu["values"], cpu["lengths"], cpu["selected"], window, 4)
        else:
            want = chunkkv_select(*cpu.values(), window, 10, 5, "avg")[:3]
        row["indices_equal"], row["kv_equal"] = _equal(env, want)
        rows.append(row)
    return rows


def kernel_rows(contexts: list[int], repeats: int = 20) -> tuple[list, dict]:
    """The benchmark's rows and the facts its report states (device, bandwidth and where it came from)."""
    import torch

    name = torch.cuda.get_device_name(0)
    bandwidth, source = memory_bandwidth(torch.cuda.get_device_properties(0), name)
    rows = [row for q in contexts for row in rows_at(q, repeats, bandwidth)]
    return rows, {"device": name, "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source,
                  "torch": torch.__version__, "triton": __import__("triton").__version__}


def markdown(rows: list[dict], facts: dict, command: str) -> str:
    from bench_common import markdown_table

    return "\n".join([
        "## Selection kernels on a GPU: kernel chains vs the PyTorch specification and the bytes-bound time", "",
        f"`{command}` on {facts['device']} (torch {facts['torch']}, Triton {facts['triton']}); memory bandwidth "
        f"{facts['bandwidth_bytes_per_s']} bytes/s ({facts['bandwidth_source']}). LLaMA-3-8B heads, [1, 8, q, 128] "
        "fp16, 248 selected + window 8. kernel_ms: the chain's GPU time from CUDA-graph replays (what a TensorRT "
        "plan runs); bytes_bound_us: K and V bytes / bandwidth.", "",
        markdown_table(COLUMNS, rows), "",
        "Per-stage GPU ms:", "",
        markdown_table(["method", "context", "stage_ms"], [{**r, "stage_ms": json.dumps(r["stage_ms"])}
                                                           for r in rows])])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-doc", action="store_true", help="Do not write the docs/benchmarks.md section.")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (torch sees none); the kernels' CPU tests are tests/trt_plugins/",
              file=sys.stderr)
        return 2
    rows, facts = kernel_rows(args.contexts, args.repeats)
    print(json.dumps({"facts": facts, "rows": rows}, indent=2))
    text = markdown(rows, facts, "python scripts/bench_kernels.py " + " ".join(sys.argv[1:]))
    print(text)
    if not args.no_doc:
        from bench_common import write_section

        write_section("bench-kernels", text)
    return 0 if all(r["indices_equal"] and r["kv_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
