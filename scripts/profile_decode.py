"""Where a decode step of the onnxruntime engine spends its time: onnxruntime's profiler on the decode session.

For every engine and context: decode ms/token as the engine measures it, the session's own time per step
(`model_run`), the top operator types per step, and the rest (Python and the I/O binding, outside the graph).
Prints JSON, then a Markdown table.

    python scripts/profile_decode.py --engine out/full --engine out/pyramidkv [--contexts 1024 4096] [--steps 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table  # noqa: E402

from engines.ort_engine import OrtEngine  # noqa: E402
from engines.prompts import synthetic_prompt_ids  # noqa: E402

OPS = ["MatMul", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"]


def profile(engine_dir: Path, context: int, steps: int, work: Path) -> dict:
    """One generation of `steps` + 1 tokens with the decode session profiled; times in ms per step."""
    import onnxruntime as ort

    engine = OrtEngine(engine_dir)
    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    options.profile_file_prefix = str(work / "decode")
    engine.decode = ort.InferenceSession(str(engine.dir / "decode.onnx"), options,
                                         providers=["CPUExecutionProvider"])
    engine.eos_ids = set()  # every row runs all its steps
    ids = synthetic_prompt_ids(engine.tokenizer, context)
    result = engine.generate([ids], steps + 1)
    trace = json.loads(Path(engine.decode.end_profiling()).read_text())
    by_op, runs, run_us = collections.Counter(), 0, 0
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs, run_us = runs + 1, run_us + event["dur"]
    per_token = 1000 * result.timings["decode"] / steps
    row = {"engine": engine_dir.name, "policy": engine.manifest["policy"]["name"], "context": context,
           "decode_ms_per_token": round(per_token, 3), "model_run_ms": round(run_us / runs / 1000, 3)}
    row |= {op: round(by_op[op] / runs / 1000, 3) for op in OPS}
    row["outside_graph_ms"] = round(per_token - row["model_run_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, action="append", required=True, help="an onnxruntime engine directory")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    for engine in args.engine:
        if not (engine / "decode.onnx").is_file():
            parser.error(f"{engine}: not an onnxruntime engine directory (no decode.onnx)")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for engine in args.engine:
            for context in args.contexts:
                rows.append(profile(engine, context, args.steps, Path(work)))
    print(json.dumps({"rows": rows}, indent=1))
    print()
    print(markdown_table(list(rows[0]), rows))


if __name__ == "__main__":
    main()
