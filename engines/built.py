"""What every runner of a built engine directory shares: the checked manifest, the model spec, the tokenizer,
the padding and EOS ids, and how a generation reports each prompt's per-layer budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.base import eos_ids, pad_id
from exporter.engine_dir import read_manifest
from exporter.specs import ModelSpec
from pkv_core.errors import UserInputError


class BuiltEngine:
    backend = ""  # the manifest's backend this runner serves
    reports_kept_indices = True  # generate(return_indices=True) returns what every layer kept (the graphs' outputs)

    def __init__(self, engine_dir: Path, manifest: dict | None = None):
        from transformers import AutoTokenizer

        self.dir = Path(engine_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        if self.manifest.get("backend") != self.backend:
            raise UserInputError(f"{self.dir}: a '{self.manifest.get('backend')}' engine, not a {self.backend} one")
        self.spec = ModelSpec.from_dict(self.manifest["model"])
        self.max_input_len = int(self.manifest["max_input_len"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir / self.manifest["tokenizer"]),
                                                       local_files_only=True, trust_remote_code=False)
        self.tokenizer.padding_side = "left"
        self.pad_id = pad_id(self.tokenizer)
        self.eos_ids = eos_ids(self.spec.eos_token_id, self.tokenizer)
        from methods import check_policy_record

        self.policy = check_policy_record(self.manifest["policy"])
        # The decode takes each layer's kept positions: a sliding window masks by them, and so do per-head lengths.
        self.windowed = bool(self.spec.sliding_window) or self.policy.per_head_lengths

    def selected_per_prompt(self, lengths: np.ndarray, kv_lengths: list[np.ndarray],
                            policy=None) -> list[list[int]] | None:
        """[prompt][layer] prefix tokens each layer selected (valid cached tokens minus the window); None when
        nothing was compressed. `policy`: the one that selected (default: the engine's)."""
        pol = policy or self.policy
        if not pol.compresses_prompt(self.spec.num_layers, int(lengths.max())):
            return None
        window = np.minimum(lengths, pol.window)  # 0 for methods without one
        return [[int(kv[b] - window[b]) for kv in kv_lengths] for b in range(len(lengths))]
