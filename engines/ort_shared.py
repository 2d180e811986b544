"""A shared prefill on the onnxruntime engine (methods.shared_prefill, methods.kvzip.KVzipScoring,
exporter.onnx.shared_prefill): one run of the capture graph per prompt serves every (method, budget) cell of a
sweep's group; each cell runs its own small selection graph on those outputs and decodes with the engine's decode
graph from a cache of its own.

The engine is the group's `shared_engine_policy` (FullKV for the observation group, KVzip for a KVzip group) built
with `shared_prefill=capture` (its manifest names the capture graph, the group and the score kinds it outputs).
The selection graphs are written when the runner starts, one per cell policy, in memory: they hold no weights.
Everything a cell computes runs in onnxruntime through the same nodes as the cell's own engine (its prefill graph's
body, its selection function's nodes after the scoring, the same decode graph), which is why it generates exactly
what that engine generates (tests/engines/test_shared_prefill.py, test_kvzip_shared.py).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import torch

from engines.base import GenerationResult, ProgressFn, SharedPrefill, encode_batch
from engines.ort_engine import OrtEngine
from methods import KVPolicy
from methods.shared_prefill import kind_name, score_kinds
from pkv_core.errors import UserInputError


class OrtSharedPrefill:
    """`shared_prefill(prompt, policies, max_new_tokens)` once per prompt, then `generate_shared(shared, policy, ...)`
    per cell (batch 1), for the cell policies given at construction."""

    name = OrtEngine.name
    records_scores = False  # the graphs output no selection scores (as OrtEngine's)

    def __init__(self, engine: OrtEngine, policies: list[KVPolicy]):
        import onnxruntime as ort

        from exporter.onnx.export import ONNX_DTYPES
        from exporter.onnx.layers import GraphConfig
        from exporter.onnx.shared_prefill import build_select

        self.engine = engine
        record = engine.manifest.get("shared_prefill")
        if record is None:
            raise UserInputError(f"{engine.dir}: the engine has no shared-prefill graph (built without it)")
        group = record.get("group", "observation")  # engines built before KVzip's group: the observation one
        others = sorted({p.describe() for p in policies if p.prefill_group != group})
        if others:
            raise UserInputError(f"{engine.dir}: its shared prefill serves the group '{group}', not "
                                 f"{', '.join(others)}")
        if group == "observation":
            have = {tuple(kind) for kind in record["scores"]}
            missing = [kind_name(k) for k in score_kinds(policies) if k not in have]
            if missing:
                raise UserInputError(f"{engine.dir}: its shared prefill does not compute the scores "
                                     f"{', '.join(missing)} (built for other methods or another window)")
        self.capture = engine.graphs[record["graph"]]
        self.capture_outputs = [o.name for o in self.capture.get_outputs()]
        spec = engine.spec
        np_dtype = np.dtype(ONNX_DTYPES[engine.manifest["dtype"]])
        self.selects = {}
        for policy in policies:
            # The selection graph reads no weights and no rotary tables: the RoPE fields are placeholders.
            cfg = GraphConfig(spec, policy, np_dtype, np.zeros(spec.head_dim // 2, np.float32), 1.0,
                              engine.manifest["onnx"]["target"], engine.max_input_len)
            model = build_select(cfg)
            onnx.checker.check_model(model)
            session = ort.InferenceSession(model.SerializeToString(), engine.session_options(arena=False),
                                           providers=engine.providers)
            self.selects[policy] = (session, [i.name for i in session.get_inputs()],
                                    [o.name for o in session.get_outputs()])

    def shared_prefill(self, prompt: list[int], policies: list[KVPolicy], max_new_tokens: int) -> SharedPrefill:
        """One run of the capture graph (`policies` only say which cells wait: the graph computes every kind)."""
        e = self.engine
        input_ids, mask, positions = encode_batch(e.tokenizer, [prompt], e.pad_id, e.max_input_len, max_new_tokens,
                                                  padding_side="right", max_positions=e.spec.max_position_embeddings)
        binding = self.capture.io_binding()
        for name, array in (("input_ids", input_ids), ("attention_mask", mask), ("position_ids", positions),
                            ("reserve_tokens", torch.tensor([0]))):
            binding.bind_cpu_input(name, np.ascontiguousarray(array.numpy(), dtype=np.int64))
        for name in self.capture_outputs:
            binding.bind_output(name, e.device_type)
        t0 = time.perf_counter()
        self.capture.run_with_iobinding(binding)
        outputs = dict(zip(self.capture_outputs, binding.get_outputs(), strict=True))
        logits = torch.from_numpy(outputs["logits"].numpy())
        return SharedPrefill(input_ids, mask, positions, logits, outputs, time.perf_counter() - t0)

    def generate_shared(self, shared: SharedPrefill, policy: KVPolicy, max_new_tokens: int, *,
                        return_logits: bool = False, return_indices: bool = False,
                        progress: ProgressFn | None = None) -> GenerationResult:
        """`policy`'s engine's `generate` of the shared prompt: its selection graph on the capture's outputs (the
        cache sized for `max_new_tokens`), then the decode (the prefill's timing is the selection's)."""
        session, inputs, names = self.selects[policy]
        captured = shared.state
        binding = session.io_binding()
        for name in inputs:
            if name == "attention_mask":
                binding.bind_cpu_input(name, np.ascontiguousarray(shared.mask.numpy(), dtype=np.int64))
            elif name == "reserve_tokens":
                binding.bind_cpu_input(name, np.array([max_new_tokens - 1], dtype=np.int64))
            else:  # the capture's K/V and scores, where they are
                binding.bind_ortvalue_input(name, captured[name])
        for name in names:
            binding.bind_output(name, self.engine.device_type)
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        outputs = dict(zip(names, binding.get_outputs(), strict=True))
        outputs["logits"] = captured["logits"]
        timings = {"prefill": time.perf_counter() - t0}
        return self.engine.decode_from(policy, outputs, shared.mask, max_new_tokens, timings, return_logits,
                                       return_indices, progress)
