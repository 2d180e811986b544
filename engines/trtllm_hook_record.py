"""Evidence that the PyramidKV hook ran inside TensorRT-LLM: with `PKV_TRTLLM_HOOK_RECORD=DIR` set, every context
call of the hook writes what it was given (each sequence's observation queries and keys, the only inputs the op
specification reads with a window) and what it returned to DIR; `check_records` recomputes every answer with the
op specification itself (`pyramidkv_select`, not the hook's own `context_indices`) and says what does not hold.

A directory and not a callback: the runner may live in another process than the script that checks it
(`scripts/gpu_acceptance.py` runs `pkv-export compare` as a subprocess).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trt_plugins.pyramidkv_select import pyramidkv_select

RECORD_ENV = "PKV_TRTLLM_HOOK_RECORD"


class Recorder:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.calls = len(list(self.dir.glob("call*.pt")))

    def record(self, layer: int, seq_lens: list[int], spec, q: torch.Tensor, k: torch.Tensor,
               indices: torch.Tensor | None, offsets: torch.Tensor | None, num_heads: int, num_kv_heads: int,
               head_dim: int) -> None:
        """q [T, H*d], k [T, Hkv*d] of the context sequences back to back; indices/offsets as returned."""
        sequences, start = [], 0
        for n in seq_lens:
            w = min(spec.window, n)
            compressed = n >= spec.budget
            sequences.append({
                "length": n,
                "q_window": q[start + n - w : start + n].reshape(w, num_heads, head_dim).clone() if compressed
                else None,
                "k": k[start : start + n].reshape(n, num_kv_heads, head_dim).clone() if compressed else None,
            })
            start += n
        torch.save({"layer": layer, "budget": spec.budget, "window": spec.window, "kernel": spec.kernel,
                    "pooling": spec.pooling, "sequences": sequences,
                    "indices": None if indices is None else indices.cpu(),
                    "offsets": None if offsets is None else offsets.cpu()},
                   self.dir / f"call{self.calls:06d}.pt")
        self.calls += 1


def recorder_from_env(environ: dict | None = None) -> Recorder | None:
    directory = (os.environ if environ is None else environ).get(RECORD_ENV)
    return Recorder(Path(directory)) if directory else None


def read_records(directory: Path) -> list[dict[str, Any]]:
    return [torch.load(p, weights_only=True) for p in sorted(Path(directory).glob("call*.pt"))]


def spec_indices(record: dict, seq: dict) -> torch.Tensor:
    """What the op specification keeps for one recorded sequence: [Hkv, kept] int64."""
    n, budget, window = seq["length"], record["budget"], record["window"]
    if n < budget:
        return None
    w = min(window, n)
    q_window, k = seq["q_window"], seq["k"]
    queries = torch.zeros(1, n, *q_window.shape[1:])  # only the last w queries observe (observe="window")
    queries[0, n - w :] = q_window
    keys = k.transpose(0, 1)[None]  # [1, Hkv, n, d]
    kept, _, _ = pyramidkv_select(queries, keys, keys, torch.tensor([n]), budget - w, window, record["kernel"],
                                  record["pooling"])
    return kept[0]


def check_records(records: list[dict], num_layers: int, budget: int | None = None) -> tuple[list[str], dict]:
    """(problems, summary): the hook ran for every layer, with the expected budget, and each answer it gave is
    the op specification's on the same inputs. No problems means all of that holds."""
    problems = []
    if not records:
        problems.append("the hook never ran (no context call recorded)")
    layers = sorted({r["layer"] for r in records})
    if records and layers != list(range(num_layers)):
        problems.append(f"context calls for layers {layers}, expected 0..{num_layers - 1}")
    compressed = 0
    for i, r in enumerate(records):
        if budget is not None and r["budget"] != budget:
            problems.append(f"call {i}: budget {r['budget']}, expected {budget}")
        lens = [s["length"] for s in r["sequences"]]
        if r["indices"] is None:
            if any(n >= r["budget"] for n in lens):
                problems.append(f"call {i} (layer {r['layer']}): returned nothing for lengths {lens} "
                                f"although one reaches the budget {r['budget']}")
            continue
        offsets = r["offsets"].tolist()
        want_offsets = [0]
        for n in lens:
            want_offsets.append(want_offsets[-1] + min(n, r["budget"]))
        if offsets != want_offsets:
            problems.append(f"call {i} (layer {r['layer']}): offsets {offsets}, expected {want_offsets}")
            continue
        for b, seq in enumerate(r["sequences"]):
            got = r["indices"][:, offsets[b] : offsets[b + 1]].long()
            want = spec_indices(r, seq)
            if want is None:
                want = torch.arange(seq["length"]).expand_as(got)
            else:
                compressed += 1
            if not torch.equal(got, want):
                problems.append(f"call {i} (layer {r['layer']}), sequence {b}: kept indices differ from the op "
                                "specification's")
    if records and not compressed:
        problems.append("no recorded sequence reached the budget: nothing was compressed, nothing proven")
    summary = {"calls": len(records), "layers": layers, "compressed_sequences_checked": compressed,
               "budget": sorted({r["budget"] for r in records})}
    return problems, summary
