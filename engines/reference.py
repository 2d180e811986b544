"""The PyTorch reference engine: Hugging Face's own model with a compressed, per-layer KV cache.

Greedy decoding over a batch of left-padded prompts. The prefill attends to the full prompt; each layer then
keeps what the policy selects; every decode step appends to each layer's own cache at the token's true absolute
position (prompt length + t), never the compressed length. This is what every other engine is compared with.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from engines.base import (
    ContextCache,
    GenerationResult,
    ProgressFn,
    SharedPrefill,
    check_room,
    encode_batch,
    encode_prompts,
    eos_ids,
    finish_result,
    pad_id,
    prompt_positions,
    question_ids,
)
from engines.compressed_cache import ATTN_IMPLEMENTATION, CompressedKVState
from engines.greedy import greedy_loop
from engines.hf_model import build_hf_model
from exporter.checkpoint import LoadedModel
from methods import KVPolicy
from pkv_core.errors import UserInputError


@dataclass
class PrefillRun:
    """What a method's `reference_after_prefill` gets: the prefill's inputs (input_ids, mask [B, q], left-padded),
    its state (every layer's cache), and a forward of the model over that state (forward(ids [B, s], positions
    [B, s]): the attention goes wherever the method points `state.attention`)."""

    model: object
    tokenizer: object
    pad_id: int
    input_ids: torch.Tensor
    mask: torch.Tensor
    state: CompressedKVState

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, pkv_state=self.state)


class ReferenceEngine:
    name = "torch-reference"
    reports_kept_indices = True  # generate(return_indices=True) returns what every layer kept
    records_scores = True  # generate(return_scores=True) returns what each layer's selection ranked by

    def __init__(self, loaded: LoadedModel, policy: KVPolicy, dtype: torch.dtype = torch.float32):
        self.loaded, self.policy, self.dtype = loaded, policy, dtype
        self.spec = loaded.spec
        self.max_input_len = self.spec.max_position_embeddings
        self.tokenizer = loaded.tokenizer()  # checked first: a broken tokenizer is refused before the weights load
        self.model = build_hf_model(loaded, dtype, attn_implementation=ATTN_IMPLEMENTATION)
        self.eos_ids = eos_ids(self.spec.eos_token_id, self.tokenizer)
        self.pad_id = pad_id(self.tokenizer)

    def encode(self, prompts: list[str] | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input_ids [B, q] int64 and attention_mask [B, q] int64."""
        return encode_prompts(self.tokenizer, prompts, self.pad_id, self.max_input_len)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 32,
        *,
        return_logits: bool = False,
        return_indices: bool = False,
        progress: ProgressFn | None = None,
        return_scores: bool = False,
    ) -> GenerationResult:
        """`return_scores`: also the scores each layer's selection ranked the prompt by (GenerationResult.scores),
        where the method has them; they cost the selection's scoring once more."""
        input_ids, mask, positions = encode_batch(self.tokenizer, prompts, self.pad_id, self.max_input_len,
                                                  max_new_tokens, max_positions=self.spec.max_position_embeddings)
        lengths = [int(n) for n in mask.sum(-1)]
        selected = self.policy.batch_selected(self.spec.num_layers, lengths)  # [L, B] or None
        state = self._state(self.policy, selected, mask)
        if return_scores:
            state.scores = {}

        t0 = time.perf_counter()
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
            logits_to_keep=1, pkv_state=state,
        )
        state.prefill = False
        return self._finish(self.policy, state, input_ids, mask, positions, out.logits[:, -1], t0, max_new_tokens,
                            return_logits, return_indices, progress)

    @torch.inference_mode()
    def shared_prefill(self, prompt: list[int], policies: list[KVPolicy], max_new_tokens: int) -> SharedPrefill:
        """One prefill of `prompt` for every policy in `policies` (one `prefill_group`): what they read of it, per
        layer, from the group's capture (the K/V and the observation scores those that compress it rank by:
        methods.shared_prefill; KVzip's whole caches and scores: methods.kvzip.KVzipScoring). `generate_shared`
        continues."""
        input_ids, mask, positions = encode_batch(self.tokenizer, [prompt], self.pad_id, self.max_input_len,
                                                  max_new_tokens, max_positions=self.spec.max_position_embeddings)
        layers, length = self.spec.num_layers, int(mask.sum())
        capture = policies[0].shared_capture([p for p in policies if p.compresses_prompt(layers, length)])
        state = CompressedKVState(capture, None, mask.bool(), prompt_positions(mask), num_layers=layers)
        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=1, pkv_state=state)
        state.prefill = False
        self._after_prefill(capture, state, input_ids, mask)  # KVzip's scoring pass
        return SharedPrefill(input_ids, mask, positions, out.logits[:, -1], [state.layers[i] for i in range(layers)],
                             time.perf_counter() - t0)

    @torch.inference_mode()
    def generate_shared(self, shared: SharedPrefill, policy: KVPolicy, max_new_tokens: int, *,
                        return_logits: bool = False, return_indices: bool = False,
                        progress: ProgressFn | None = None, return_scores: bool = False) -> GenerationResult:
        """`policy`'s own `generate` of the shared prompt, from the shared prefill: its selection of every layer,
        then its decode (the prefill's timing is the selection's)."""
        if policy.prefill_group is None:
            raise ValueError(f"policy '{policy.name}' does not select from a shared prefill")
        lengths = [int(n) for n in shared.mask.sum(-1)]
        state = self._state(policy, policy.batch_selected(self.spec.num_layers, lengths), shared.mask)
        if return_scores:
            state.scores = {}
        t0 = time.perf_counter()
        policy.reference_select_shared(state, shared.state)
        state.prefill = False
        return self._finish(policy, state, shared.input_ids, shared.mask, shared.positions, shared.first_logits, t0,
                            max_new_tokens, return_logits, return_indices, progress, after_prefill=False)

    def _finish(self, policy: KVPolicy, state: CompressedKVState, input_ids: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor, first_logits: torch.Tensor, t0: float, max_new_tokens: int,
                return_logits: bool, return_indices: bool, progress: ProgressFn | None,
                after_prefill: bool = True) -> GenerationResult:
        """After the prefill's layers (started at t0): the method's point after the prefill (not for a shared
        prefill's cell: its selection did that), then greedy decoding. first_logits [B, V]: the prefill's last-token
        logits."""
        if after_prefill:
            self._after_prefill(policy, state, input_ids, mask)
        lengths = [int(n) for n in mask.sum(-1)]
        compressed = policy.compresses_prompt(self.spec.num_layers, max(lengths))
        timings = {"prefill": time.perf_counter() - t0}
        kept = None
        if return_indices:
            kept = [state.layers[i].kept for i in range(self.spec.num_layers)]
        kv_bytes = self._kv_bytes(state)  # before decoding appends to the caches

        generated, step_logits, timings["decode"] = greedy_loop(
            first_logits, positions[:, -1] + 1, self._decode_step(state), self.eos_ids, self.pad_id,
            max_new_tokens, progress)
        per_prompt = None
        if compressed:  # what each layer actually kept (ChunkKV rounds its budget down to whole chunks; heads may
            # hold different counts: a row's longest head, the slots its cache spans)
            window = torch.clamp(mask.sum(-1), max=policy.window)
            layers = range(self.spec.num_layers)
            per_prompt = [[int((state.layers[i].kept[b] >= 0).sum(-1).max() - window[b]) for i in layers]
                          for b in range(len(window))]
        result = finish_result(self.tokenizer, generated, mask, step_logits, return_logits, kept, per_prompt, timings,
                               kv_bytes)
        if state.scores is not None:  # asked for (generate's return_scores)
            result.scores = [state.scores.get(i) for i in range(self.spec.num_layers)]
        return result

    def _kv_bytes(self, state: CompressedKVState) -> tuple[int, int]:
        """(K/V bytes the layers' caches hold, the bytes of their kept pairs alone) after the prefill; each layer
        holds keys [B, Hc, n, d] and kept positions [B, Hc, n] (-1: an unused slot)."""
        layers = [state.layers[i] for i in range(self.spec.num_layers)]
        item = layers[0].keys.element_size()
        held = sum(2 * c.keys.numel() * item for c in layers)
        ideal = sum(2 * int((c.kept >= 0).sum()) * c.keys.shape[-1] * item for c in layers)
        return held, ideal

    def _state(self, policy: KVPolicy, selected: torch.Tensor | None, mask: torch.Tensor) -> CompressedKVState:
        """A generation's state for left-padded prompts, mask [B, q]."""
        return CompressedKVState(policy, selected, mask.bool(), prompt_positions(mask),
                                 num_layers=self.spec.num_layers)

    def _after_prefill(self, policy: KVPolicy, state: CompressedKVState, input_ids: torch.Tensor,
                       mask: torch.Tensor) -> None:
        """The method's point after the whole prefill (KVzip's reconstruction pass and its one top-k)."""
        run = PrefillRun(self.model, self.tokenizer, self.pad_id, input_ids, mask, state)
        policy.reference_after_prefill(run)

    def _decode_step(self, state: CompressedKVState):
        """The greedy loop's step over a compressed state: token [B], position [B] -> last logits [B, V]."""

        def step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            state.step_positions = pos[:, None]
            out = self.model(input_ids=token[:, None], position_ids=pos[:, None], use_cache=False, pkv_state=state)
            return out.logits[:, -1]

        return step

    @torch.inference_mode()
    def compress_context(self, context: str | list[int], room: int = 256) -> ContextCache:
        """Prefill and compress a context once (batch 1); `answer` continues copies of it."""
        input_ids, mask, positions = encode_batch(self.tokenizer, [context], self.pad_id, self.max_input_len,
                                                  room + 1, max_positions=self.spec.max_position_embeddings)
        length = int(mask.sum())
        state = self._state(self.policy, self.policy.batch_selected(self.spec.num_layers, [length]), mask)
        t0 = time.perf_counter()
        self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=1, pkv_state=state)
        state.prefill = False
        self._after_prefill(self.policy, state, input_ids, mask)
        layers = [state.layers[i] for i in range(self.spec.num_layers)]
        item = layers[0].keys.element_size()
        return ContextCache(length, room, sum(2 * c.keys.numel() * item for c in layers), [c.kept for c in layers],
                            state, time.perf_counter() - t0)

    @torch.inference_mode()
    def answer(self, context: ContextCache, question: str | list[int], max_new_tokens: int = 32, *,
               return_logits: bool = False) -> GenerationResult:
        """Continue a copy of the compressed context with the question, then generate greedily."""
        import copy

        ids = question_ids(self.tokenizer, question)
        check_room(context, ids, max_new_tokens)
        state = copy.deepcopy(context.state)  # the context's caches stay as they are
        positions = torch.arange(context.length, context.length + len(ids))[None]
        state.step_positions = positions
        t0 = time.perf_counter()
        out = self.model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=False, pkv_state=state)
        timings = {"prefill": time.perf_counter() - t0}
        mask = torch.ones(1, context.length + len(ids), dtype=torch.long)
        generated, step_logits, timings["decode"] = greedy_loop(
            out.logits[:, -1], torch.tensor([context.length + len(ids)]), self._decode_step(state), self.eos_ids,
            self.pad_id, max_new_tokens)
        return finish_result(self.tokenizer, generated, mask, step_logits, return_logits, None, None, timings)


def reference_for_manifest(manifest: dict, model: str | None = None, dequantized: bool = True) -> LoadedModel:
    """The model an engine was built from, to run the reference on: random weights are regenerated from their
    seed; checkpoints are reloaded from `model` (if given) or the directory recorded at build time. An engine with
    quantized weights (`--weights`) gets them quantized and dequantized exactly as it holds them, unless
    `dequantized` is False (the unquantized model, to measure what quantization costs)."""
    from exporter.checkpoint import WHEEL_PRESETS, load_model
    from exporter.quantize import DequantizedWeights, WeightQuant
    from exporter.specs import ModelSpec
    from exporter.weights import RandomWeights

    info = dict(manifest["model"])
    preset = str(info.get("source", "")).removeprefix("preset:")
    if model is not None:
        loaded = load_model(model)
    elif preset in WHEEL_PRESETS:  # its file lives in whichever environment runs this, not where it was built
        loaded = load_model(preset)
    elif info.get("random_weights"):
        seed = info.get("weights_seed") or 0
        spec = ModelSpec.from_dict(info)
        loaded = LoadedModel(spec, info.get("source", spec.name), RandomWeights(spec, seed=seed), None, True)
    elif not info.get("checkpoint_dir"):
        raise UserInputError("the engine does not record its checkpoint; pass --model to run the reference")
    else:
        loaded = load_model(info["checkpoint_dir"])
    check_same_model(ModelSpec.from_dict(info), loaded.spec, model or info.get("checkpoint_dir") or loaded.source)
    quant = WeightQuant.from_record(manifest.get("weights"))
    if quant is not None and dequantized:
        dtype = torch.float16 if manifest.get("dtype") == "fp16" else torch.float32
        loaded = dataclasses.replace(loaded, weights=DequantizedWeights(loaded.weights, quant, dtype))
    return loaded


# What a model computes: every spec field but its names, where its weights live and its token ids.
ARCHITECTURE_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings", "rms_norm_eps",
                       "rope_scaling", "sliding_window", "tie_word_embeddings")


def check_same_model(built, given, model: str) -> None:
    """The reference's model (`given`, a ModelSpec) must be the architecture the engine was built from (`built`):
    another model would only "disagree beyond tolerance", which reads as a broken engine."""
    differ = [f"{f} {getattr(given, f)!r} (the engine's: {getattr(built, f)!r})" for f in ARCHITECTURE_FIELDS
              if getattr(given, f) != getattr(built, f)]
    if differ:
        raise UserInputError(f"{model} is not the model the engine was built from: {', '.join(differ[:3])}"
                             f"{' and more' if len(differ) > 3 else ''}; pass the checkpoint the engine was built "
                             "from with --model")
