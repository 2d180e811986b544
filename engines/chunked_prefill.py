"""A prompt's prefill on the onnxruntime engine, whole or in chunks, ready for a KV slot (engines/scheduler.py).

`prefill_whole` is the engine's own prefill graph at batch 1. `ChunkedPrefill` runs the same prompt a chunk at a
time (exporter/onnx/chunk.py): each chunk extends the prompt's uncompressed cache in place (chunk.onnx, batch 1),
so a server can spread a long prompt over several decode steps; after the last chunk the method selects over the
whole prompt once (select.onnx), from the finished cache and the last chunk's window queries: the kept sets are
the ones a whole prefill keeps (tested), and the first token is the last chunk's.

Where the uncompressed cache lives: FullKV writes it straight into the sequence's slot (a slot holds a whole
prompt anyway: `cache=` the slot's rows); a compressing method needs a staging cache of the whole prompt
(`staging_bytes`, 2 x layers x KV heads x q x head_dim x itemsize) until its last chunk, which the scheduler counts
against --kv-memory while the prompt is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.slots import NUMPY_DTYPE


@dataclass
class Prefilled:
    """A prefilled prompt in the slot pool's terms (engines.slots.SlotPool.place): per layer keys / values
    [Hc, n_l, d] (FullKV's chunks: views of the buffers they wrote), lengths n_l, kept positions [Hc, n_l]
    (-1 = unused), and the logits [V] of the first generated token."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    lengths: list[int]
    kept: list[np.ndarray]
    logits: np.ndarray


def prefill_whole(engine, prompt: list[int]) -> Prefilled:
    """The engine's prefill graph for one prompt (batch 1), no decode slots behind the kept tokens."""
    ids = np.array([prompt], np.int64)
    out = engine.run_prefill(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], 0)
    layers = range(engine.spec.num_layers)
    return Prefilled([out[f"present.{i}.key"].numpy()[0] for i in layers],
                     [out[f"present.{i}.value"].numpy()[0] for i in layers],
                     [int(out[f"kv_lengths.{i}"].numpy()[0]) for i in layers],
                     [out[f"kept_indices.{i}"].numpy()[0] for i in layers], out["logits"].numpy()[0])


def staging_bytes(engine, prompt_len: int) -> int:
    """Bytes of the uncompressed cache a compressing method's chunked prefill holds until its last chunk (0 for
    FullKV, whose chunks go straight into its slot)."""
    if not engine.policy.compresses:
        return 0
    s, itemsize = engine.spec, np.dtype(NUMPY_DTYPE[engine.manifest["dtype"]]).itemsize
    return 2 * s.num_layers * s.num_kv_heads * prompt_len * s.head_dim * itemsize


class ChunkedPrefill:
    """One prompt prefilled chunk by chunk: `advance(n)` runs its next n tokens, `finish()` after the last one."""

    def __init__(self, engine, prompt: list[int], cache: tuple[list[np.ndarray], list[np.ndarray]] | None = None):
        """cache: per layer K and V buffers [1, Hkv, cap_l, d] (cap_l >= the prompt's length) to write the prompt
        into: FullKV's slot rows. None: staging arrays of exactly the prompt's length (compressing methods)."""
        sessions = engine.chunk_sessions()
        self.engine, self.prompt, self.done = engine, list(prompt), 0
        self.window = engine.policy.window if engine.policy.compresses else 0  # the last chunk holds these
        self.session, self.selector = sessions["chunk"], sessions["select"]
        if cache is None:
            s = engine.spec
            shape = (1, s.num_kv_heads, len(prompt), s.head_dim)
            dtype = NUMPY_DTYPE[engine.manifest["dtype"]]
            cache = ([np.zeros(shape, dtype) for _ in range(s.num_layers)],
                     [np.zeros(shape, dtype) for _ in range(s.num_layers)])
        self.bind(*cache)
        self.names = [o.name for o in self.session.get_outputs()]
        self.outputs: dict = {}

    def bind(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """(Re)point the chunks at these buffers (the scheduler moved the slot): keys / values [1, Hkv, cap, d]."""
        import onnxruntime as ort

        self.keys, self.values = keys, values
        self._cache = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
                       for k, v in zip(keys, values, strict=True)]  # share the arrays' memory

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    def check(self, n: int) -> None:
        """Refuse a next chunk of n tokens that is empty, too long, or would leave fewer than the window."""
        if not 1 <= n <= self.remaining:
            raise ValueError(f"a chunk of {n} tokens with {self.remaining} left")
        if 0 < self.remaining - n < self.window:
            raise ValueError(f"a chunk of {n} tokens would leave {self.remaining - n}: the last chunk must hold the "
                             f"prompt's last {self.window} tokens (its observation window)")

    def inputs(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next chunk's token ids and positions [1, n] and the tokens before it [1] (int64)."""
        ids = np.array([self.prompt[self.done : self.done + n]], np.int64)
        return ids, np.arange(self.done, self.done + n, dtype=np.int64)[None], np.array([self.done], np.int64)

    def cache(self, layer: int, part: str):
        """The OrtValue of a layer's key or value buffer (bound as both the past and the present of a chunk)."""
        return self._cache[layer][part == "value"]

    def took(self, n: int, outputs: dict) -> None:
        """The next n tokens ran (here or in a mixed step); `outputs`: {"logits", "window_queries.{i}"} of the run,
        kept after the last chunk."""
        self.done += n
        if not self.remaining:
            self.outputs = outputs

    def advance(self, n: int) -> None:
        """Run the prompt's next n tokens (1 <= n <= remaining, leaving none or at least the window) over the
        ones before them."""
        self.check(n)
        binding = self.session.io_binding()
        for name, array in zip(("input_ids", "position_ids", "past_length"), self.inputs(n), strict=True):
            binding.bind_cpu_input(name, array)
        for layer in range(len(self._cache)):
            for part in ("key", "value"):
                binding.bind_ortvalue_input(f"past_key_values.{layer}.{part}", self.cache(layer, part))
        for name in self.names:  # in output order: get_outputs() follows the binding order
            if name.startswith("present."):
                _, layer, part = name.split(".")
                binding.bind_ortvalue_output(name, self.cache(int(layer), part))  # in place
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        self.took(n, dict(zip(self.names, binding.get_outputs(), strict=True)))

    def finish(self) -> Prefilled:
        """After the last chunk: the method's selection over the whole prompt (FullKV: the cache as it is)."""
        if self.remaining:
            raise ValueError(f"{self.remaining} prompt tokens not prefilled yet")
        layers = range(self.engine.spec.num_layers)
        logits = self.outputs["logits"].numpy()[0]
        q = len(self.prompt)
        if self.selector is None:  # nothing to select: every position, in every cache head
            heads = int(self.engine.manifest["cache_heads"])
            kept = np.broadcast_to(np.arange(q, dtype=np.int64), (heads, q))
            return Prefilled([k[0, :, :q] for k in self.keys], [v[0, :, :q] for v in self.values], [q] * len(layers),
                             [kept] * len(layers), logits)  # views of the buffers the chunks wrote
        feeds = {}
        for layer in layers:
            feeds[f"past_key_values.{layer}.key"] = self.keys[layer]
            feeds[f"past_key_values.{layer}.value"] = self.values[layer]
            feeds[f"window_queries.{layer}"] = self.outputs[f"window_queries.{layer}"].numpy()
        out = dict(zip([o.name for o in self.selector.get_outputs()], self.selector.run(None, feeds), strict=True))
        return Prefilled([out[f"present.{i}.key"][0] for i in layers], [out[f"present.{i}.value"][0] for i in layers],
                         [int(out[f"kv_lengths.{i}"][0]) for i in layers],
                         [out[f"kept_indices.{i}"][0] for i in layers], logits)


def prefill_in_chunks(engine, prompt: list[int], sizes: list[int]) -> Prefilled:
    """The prompt through `ChunkedPrefill` in chunks of these sizes (they must add up to its length)."""
    run = ChunkedPrefill(engine, prompt)
    for n in sizes:
        run.advance(n)
    return run.finish()
