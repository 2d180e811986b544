"""One scheduler step that decodes the running sequences and runs a prompt's next chunk in one run of the engine's
mixed.onnx (exporter/onnx/mixed.py), so both share the step's weight reads.

The decode part binds what engines/scheduler.DecodeBatch binds (the first n rows of the slot pools, written in
place; the host arrays of tokens, positions and logits); the chunk part binds what ChunkedPrefill.advance binds
under the chunk_* names. Every binding is made anew per step: which prompt's buffers, and how many rows, change.
"""

from __future__ import annotations

import numpy as np

from engines.chunked_prefill import ChunkedPrefill
from engines.slots import SlotPool


def run_mixed(engine, pool: SlotPool, n: int, tokens: np.ndarray, positions: np.ndarray, logits: np.ndarray,
              prefill: ChunkedPrefill, chunk: int) -> None:
    """Decode rows [0, n) (tokens / positions [S, 1] int64 in, logits [S, V] f32 out, first n rows) and run the
    prompt's next `chunk` tokens, in one run."""
    import onnxruntime as ort

    prefill.check(chunk)
    session = engine.chunk_sessions()["mixed"]
    binding = session.io_binding()
    keep = []  # the OrtValues must outlive the run

    def value(array: np.ndarray):
        keep.append(ort.OrtValue.ortvalue_from_numpy(array))  # CPU: shares the array's memory
        return keep[-1]

    binding.bind_ortvalue_input("input_ids", value(tokens[:n]))
    binding.bind_ortvalue_input("position_ids", value(positions[:n]))
    for name, array in zip(("chunk_ids", "chunk_position_ids", "chunk_past_length"), prefill.inputs(chunk),
                           strict=True):
        binding.bind_cpu_input(name, array)
    pools = {"key": pool.keys, "value": pool.values}
    decoded: dict[str, object] = {}
    for layer in range(len(pool.keys)):
        binding.bind_ortvalue_input(f"past_lengths.{layer}", value(pool.lengths[layer, :n]))
        if pool.positions is not None:
            binding.bind_ortvalue_input(f"cache_positions.{layer}", value(pool.positions[layer][:n]))
        for part in ("key", "value"):
            decoded[f"present.{layer}.{part}"] = value(pools[part][layer][:n])
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{part}", decoded[f"present.{layer}.{part}"])
            binding.bind_ortvalue_input(f"chunk_key_values.{layer}.{part}", prefill.cache(layer, part))
    names = [o.name for o in session.get_outputs()]
    for name in names:  # in output order: get_outputs() follows the binding order
        if name in decoded:
            binding.bind_ortvalue_output(name, decoded[name])  # in place
        elif name.startswith("chunk_present."):
            _, layer, part = name.split(".")
            binding.bind_ortvalue_output(name, prefill.cache(int(layer), part))  # in place
        elif name == "logits":
            binding.bind_ortvalue_output(name, value(logits[:n]))
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    out = dict(zip(names, binding.get_outputs(), strict=True))
    prefill.took(chunk, {"logits": out["chunk_logits"],
                         **{k: v for k, v in out.items() if k.startswith("window_queries.")}})
