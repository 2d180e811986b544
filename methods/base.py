"""The contract of a KV-cache compression method, with FullKV's answers (keep every token) as the defaults.

A method is a frozen dataclass: its fields are its options (`methods.options.option`), its class attributes say
where it runs and what its plan means, and its methods answer what the rest of the product asks at a few named
points, so no engine, graph writer, runner or report tests a method's name or kind:

budgets      `layer_selected`, `kept_prefix`, `compresses_prompt` (the one answer to "is this prompt long enough
             to compress?"), `batch_selected`, `largest_selected` (what static widths are sized by), `regime`:
             `plan`, the slot planner, the TensorRT build and every engine's per-prompt budgets
reference    `reference_layer` (after a layer's prefill attention: that layer's cache), `reference_after_prefill`
             (after the whole prefill), `reference_decode` (per decode step): engines.compressed_cache / reference
ONNX graphs  `graph_begin`, `graph_layer` (after a layer's attention), `graph_between_layers` (after a whole
             layer), `graph_end` (after the decoder), `graph_functions`, `graph_decode_layer`, `extra_graphs`:
             exporter.onnx; `onnxruntime_stage` (per decode step of the onnxruntime engine)
backends     `runs_on` (a positive list, methods.backends) and `check_backend`; `chunked_prefill` (may a server
             prefill a prompt in chunks: exporter.onnx.chunk, engines.chunked_prefill)
inspect      `always_kept` (the sinks and the window a page shows as such); a reference hook records the scores its
             selection ranked by (`record_scores`) when the caller asks for them (`pkv-export inspect`)
one prefill  `prefill_group`: a sweep prefills a sample once for every cell of a group and hands each the K/V and
             the scores it ranks by: `shared_capture` (the prefill's "method"), `shared_engine_policy` (whose
             decode the cells use), `shared_scores_input`, `reference_select_shared`, `graph_select_shared`; the
             observation-scores group (`shares_prefill`: methods.shared_prefill, methods.budgeted) and one KVzip
             group per scoring setting, every budget (methods.kvzip.KVzipScoring)

`pg` below is the prefill graph writer's view (exporter.onnx.prefill.PrefillGraph) and `lay` its transformer
body (exporter.onnx.layers.Layers); `state` is the reference's CompressedKVState (engines.compressed_cache).
They are passed in, never imported: this package sits below the engines and the graph writer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods import backends
from methods.cache import LayerCache, right_aligned
from methods.options import check_options
from pkv_core.errors import UserInputError


@dataclass(frozen=True)
class KVPolicy:
    """FullKV's behaviour; every method subclasses this and overrides what differs."""

    name: ClassVar[str] = ""
    runs_on: ClassVar[frozenset[str]] = backends.ALL
    # Why a backend missing from `runs_on` cannot run the method (shown after "cannot run NAME: "), if not obvious.
    refusals: ClassVar[dict[str, str]] = {}
    # Prompt tokens kept for being recent: 0 here, an option in the methods that have one. Not annotated, so it is
    # no dataclass field of the base and a subclass's `window` option keeps its place among its fields.
    window = 0
    # True when `plan`'s bytes are an upper bound the data may undercut (ChunkKV: a partial last chunk).
    plan_is_upper_bound: ClassVar[bool] = False
    # True when the heads of one layer hold different counts (KVzip): the decode masks each head's unused slots.
    per_head_lengths: ClassVar[bool] = False
    # True when the prefill may run in chunks (in-flight serving) and keep exactly what one whole prefill keeps:
    # the method decides from the finished cache and the attention of the last `window` prompt queries only (FullKV:
    # nothing to decide). False for a method that needs more of the prompt's attention (H2O: every query's).
    chunked_prefill: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_options(self)
        self.validate()

    def validate(self) -> None:
        """Checks between options (each option's own are declared with it)."""

    @property
    def compresses(self) -> bool:
        return False

    @property
    def cache_heads_are_query_heads(self) -> bool:
        return False

    @property
    def shares_prefill(self) -> bool:
        """Whether one prefill serves this method along with others (methods.shared_prefill): it selects after the
        full prefill from each layer's K/V and observation scores alone (the "observation" `prefill_group`). FullKV,
        KVzip, PyramidInfer: no."""
        return False

    @property
    def prefill_group(self) -> str | None:
        """Cells of a sweep whose policies name the same group share one prefill per sample (the hooks below); None:
        the cell prefills alone. The observation-scores methods: "observation"; KVzip: one group per scoring
        setting (its scores do not depend on the budget)."""
        return "observation" if self.shares_prefill else None

    # --- one prefill for a group's cells (a sweep: validate.sweep_shared) -----------------------------------------
    def shared_capture(self, policies: list[KVPolicy]) -> KVPolicy:
        """The "method" of the prefill that serves `policies` (this one's group, those that compress the prompt): its
        reference hooks record what they read (`reference_select_shared`'s `captured`, per layer); its prefill graph
        outputs it (keys.{i}, values.{i}, the scores `shared_scores_input` names)."""
        raise NotImplementedError(f"policy '{self.name}' does not share a prefill")

    def shared_engine_policy(self) -> KVPolicy:
        """The policy of the engine that holds the capture graph: its decode graph decodes every cell's cache."""
        raise NotImplementedError(f"policy '{self.name}' does not share a prefill")

    def shared_scores_input(self, layer: int, spec: Any) -> tuple[str, int] | None:
        """(name, heads) of layer `layer`'s scores [B, heads, q] f32 this selection reads from the capture graph, or
        None when it reads only K/V."""
        raise NotImplementedError(f"policy '{self.name}' does not share a prefill")

    def reference_select_shared(self, state: Any, captured: list) -> None:
        """Every layer's cache (state.layers) from what the shared prefill captured, as this policy's own prefill
        would leave it."""
        raise NotImplementedError(f"policy '{self.name}' does not share a prefill")

    def graph_select_shared(self, pg: Any, layers: list[tuple[str | None, str, str]]) -> None:
        """The selection graph's nodes: per layer (scores or None, keys, values) -> `pg.emit` of every layer."""
        raise NotImplementedError(f"policy '{self.name}' does not share a prefill")

    def graph_functions_scored(self, spec: Any, target: Any) -> list:
        """The functions `graph_select_shared`'s nodes call."""
        return self.graph_functions(spec, target)

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{self.name}({hp})"

    # --- backends -------------------------------------------------------------------------------------------------
    def why_not(self, backend: str) -> str | None:
        """Why this policy cannot run on `backend` (methods.backends), or None when it can."""
        if backend in self.runs_on:
            return None
        builds = self.runs_on - {backends.SLOTS}
        where = ", ".join(text for b, text in backends.DESCRIPTIONS.items() if b in builds)
        return self.refusals.get(backend, f"it is built for {where} only")

    def check_backend(self, backend: str) -> None:
        reason = self.why_not(backend)
        if reason is not None:
            raise UserInputError(f"policy '{self.name}' cannot run on {backends.DESCRIPTIONS[backend]}: {reason}")

    # --- budgets --------------------------------------------------------------------------------------------------
    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        """Prefix tokens kept per layer for a prompt of `prompt_len` tokens; None = keep everything."""
        return None

    def compresses_prompt(self, num_layers: int, prompt_len: int) -> bool:
        """Whether a prompt of `prompt_len` tokens is compressed at all (a batch is when its longest prompt is)."""
        return self.layer_selected(num_layers, prompt_len) is not None

    def kept_prefix(self, selected: int) -> int:
        """Prefix tokens a layer holds for a budget of `selected` (what `plan` counts)."""
        return selected

    def batch_selected(self, num_layers: int, lengths: list[int]) -> torch.Tensor | None:
        """[L, B] int64 per-layer, per-prompt budgets for methods that select layer by layer after each layer's
        attention; None when the prefill keeps everything (FullKV, a batch too short, or a method that decides
        elsewhere)."""
        return None

    def largest_selected(self, num_layers: int, max_input_len: int) -> list[int] | None:
        """Per layer, the most prefix tokens its selection is asked to keep for any batch of prompts of
        1..max_input_len tokens (what a static output width or cache capacity must hold); None when the method does
        not select layer by layer with `batch_selected`'s budgets, or no such prompt is compressed."""
        return None

    def regime(self, selected: list[int] | None) -> str:
        """`plan`'s one-word account of the budgets for one prompt length."""
        if not self.compresses:
            return "full"
        if selected is None:
            return "no-compression (context too short)"
        return "uniform" if len(set(selected)) == 1 else "pyramid"

    def always_kept(self, prompt_len: int) -> tuple[int, int]:
        """(first, last): how many of a `prompt_len`-token prompt's first tokens (attention sinks) and last tokens
        (the observation or recent window) the method keeps whatever their scores."""
        return 0, min(self.window, prompt_len)

    # --- the PyTorch reference ------------------------------------------------------------------------------------
    def reference_layer(self, state: Any, layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> LayerCache:
        """After layer `layer`'s prefill attention: what it caches. query [B, H, q, d], key / value [B, Hkv, q, d]
        post-RoPE, left-padded as the model ran them (state.key_mask [B, q])."""
        return keep_all(state, query, key, value, self.cache_heads_are_query_heads)

    def reference_after_prefill(self, run: Any) -> bool:
        """After the whole prefill (engines.reference.PrefillRun: the model, the inputs, the state): replace the
        caches if the method decides over every layer at once. Returns whether anything was compressed."""
        return False

    def reference_decode(self, state: Any, layer: int, cache: LayerCache, weights: torch.Tensor) -> None:
        """After each decode forward of `layer`: weights [B, H, S, n] are its attention over its cache."""

    # --- the ONNX graphs ------------------------------------------------------------------------------------------
    def graph_begin(self, pg: Any) -> None:
        """Before the prefill graph's decoder (a budget table, counts computed from the prompt lengths)."""

    def graph_layer(self, pg: Any, layer: int, q: str, k4: str, v4: str) -> tuple[str, str, str] | None:
        """After layer `layer`'s prefill attention: (kept [B, Hc, n], K, V [B, Hc, n, d]) for its cache, or None
        when the method emits the layer's cache later (`pg.emit`). q [B, s, H*d] rotated, k4 / v4 [B, Hkv, s, d]."""
        return pg.keep_all(k4, v4)

    def graph_between_layers(self, pg: Any, layer: int, residual: str, h: str) -> tuple[str, str]:
        """After layer `layer` (residual stream and MLP output, [B, s, hidden]): what goes on to the next layer."""
        return residual, h

    def graph_end(self, pg: Any) -> None:
        """After the decoder (and the logits): a selection over every layer, outputs of the method's own."""

    def graph_functions(self, spec: Any, target: Any) -> list:
        """The model-local ONNX functions (FunctionProto) the prefill's selection nodes call."""
        return []

    def graph_decode_layer(self, lay: Any, h: str, layer: int, present_key: str, past_lengths: str,
                           visible: Any) -> list:
        """Extra decode-graph outputs of layer `layer` (value infos), written into `lay.g`."""
        return []

    def extra_graphs(self) -> dict[str, Any]:
        """Graphs of the method's own beside prefill and decode: file name -> builder(cfg) -> (GraphBuilder, inputs,
        outputs)."""
        return {}

    def onnxruntime_stage(self, engine: Any, outputs: dict, cache: dict) -> Any:
        """The onnxruntime engine's per-step hook (`record(outputs, positions)`, `evict_if_due()`, `lengths`,
        `cache_positions()`, `copy(cache)`), or None."""
        return None


def recording_scores(state: Any) -> bool:
    """Whether the reference's caller asked for the selection's scores (state.scores is a dict: `inspect`). They
    are extra work, so a method computes them only then; the selection itself never reads them."""
    return getattr(state, "scores", None) is not None


def record_scores(state: Any, layer: int, scores: torch.Tensor) -> None:
    """The ranking that decided what layer `layer` keeps: [B, Hc, q] float32, right-aligned (position p is the
    row's p-th real token); NaN where the method gives a token no score, -inf (or +inf) where the token was not a
    candidate (kept or dropped whatever its score: sinks, window)."""
    if recording_scores(state):
        state.scores[layer] = scores.detach().float()


def keep_all(state: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             query_heads: bool = False) -> LayerCache:
    """A layer's cache holding every real token, rows right-padded (the op's layout). query [B, H, q, d],
    key / value [B, Hkv, q, d] left-padded; query_heads: store K/V expanded to the H query heads."""
    b, hkv, q, _ = key.shape
    lengths = state.key_mask.sum(-1)  # [B]
    k, v = right_aligned(key, state.key_mask), right_aligned(value, state.key_mask)
    real = torch.arange(q)[None, :] < lengths[:, None]  # [B, q]
    idx = torch.where(real, torch.arange(q), -1)[:, None, :].expand(b, hkv, q)
    if query_heads:
        g = query.shape[1] // hkv
        idx, k, v = idx.repeat_interleave(g, 1), k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    zero = torch.zeros((), dtype=k.dtype)
    k, v = torch.where(idx[..., None] >= 0, k, zero), torch.where(idx[..., None] >= 0, v, zero)
    return LayerCache.from_selection(idx, k, v)
