"""StreamingLLM (Xiao et al., 2023): the first `sinks` tokens (attention sinks) and the most recent ones, C per
layer. No attention scores: a positional score and the same top-k + gather as every selection
(trt_plugins.streaming_select; ONNX: the `StreamingLLMSelect` function, TensorRT: its plugin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods import backends
from methods.budgeted import BudgetedPolicy
from methods.options import non_negative, option
from pkv_core.errors import UserInputError
from trt_plugins.onnx_graph import CUSTOM_DOMAIN
from trt_plugins.streaming_select import streaming_select

TRTLLM_HOOK = "TensorRT-LLM's sparse-attention hook selects like snapkv and pyramidkv only (use --backend onnx)"


@dataclass(frozen=True)
class StreamingLLMPolicy(BudgetedPolicy):
    """StreamingLLM: `sinks` first tokens + the most recent tokens, C per layer."""

    name: ClassVar[str] = "streamingllm"
    runs_on: ClassVar[frozenset[str]] = backends.ALL - {backends.TRTLLM}
    refusals: ClassVar[dict[str, str]] = {backends.TRTLLM: TRTLLM_HOOK}
    sinks: int = option(4, "attention-sink tokens (the first ones), always kept", check=non_negative)

    def validate(self) -> None:
        super().validate()
        if self.sinks > self.kv_budget - self.window:
            raise UserInputError(f"--sinks must be in [0, kv_budget - window] (got {self.sinks})")

    def always_kept(self, prompt_len: int) -> tuple[int, int]:
        return min(self.sinks, prompt_len), min(self.window, prompt_len)

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        return streaming_select(keys, values, lengths, selected, self.window, self.sinks)

    def select_scored(self, scores, keys, values, lengths, selected, layer=0, shared=None):
        return streaming_select(keys, values, lengths, selected, self.window, self.sinks)  # positions: no scores

    def graph_select_scored(self, lay, layer, scores, k4, v4, lengths, selected, shared):
        return self.graph_select(lay, layer, None, k4, v4, lengths, selected, shared)

    def graph_select(self, lay, layer, queries, k4, v4, lengths, selected, shared):
        attrs = lay.target.select_attributes()
        if attrs:  # the tensorrt target's node names its plugin and carries what the plugin needs
            attrs |= {"num_kv_heads": lay.s.num_kv_heads, "head_dim": lay.s.head_dim,
                      "max_selected": lay.cfg.max_selected(layer)}
        outputs = 4 if attrs else 3
        return lay.g.op("StreamingLLMSelect", k4, v4, lengths, selected, outputs=outputs, domain=CUSTOM_DOMAIN,
                        window=self.window, sinks=self.sinks, **attrs)[:3]

    def graph_functions(self, spec, target):
        from trt_plugins.onnx_select import streaming_select_function

        scores = bool(target.select_attributes())  # the plugin's 4th output: the function has it too
        return [streaming_select_function(self.window, self.sinks, spec.num_kv_heads, spec.head_dim, scores)]
