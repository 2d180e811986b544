"""The TensorRT path's static sizes cover every prompt the engine accepts, not just the longest one: each selection
plugin's output width (the `max_selected` attribute of the tensorrt-target graphs, `GraphConfig.max_selected`) and
each layer's cache capacity in the decode plan's profile (`exporter/tensorrt/build.layer_capacities`).

PyramidKV keeps more of a prompt in its deep layers in the uniform regime (C <= q < 2(C - w)) than of a long one, so
sizes taken at the max input length were too small for such prompts: the kernels, which never write past the width,
silently kept the first picks that fit. Here a short prompt runs on engines built for 1024 tokens: onnxruntime runs
the tensorrt-target prefill up to a deep layer's selection, the kernel chain TensorRT's parser gets for that layer
runs under the Triton interpreter on those inputs, and its kept sets must equal the reference's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines.base import encode_batch
from exporter.slot_plan import kept_prompt
from exporter.tensorrt.build import layer_capacities, layer_kept, profile_shapes
from methods import POLICIES, make_policy
from methods.backends import TENSORRT
from tests import matrix

LAYERS, MAX_LEN, NEW = 8, 300, 16
# Every registered method the TensorRT backend builds, and the variants whose budgets differ (pyramid schedules).
TRT_CASES = [(name, options) for name, options in matrix.cases() if TENSORRT in POLICIES[name].runs_on] + [
    ("pyramidkv", {"schedule": "mean"}), ("chunkkv", {"budget_schedule": "pyramid", "schedule": "mean"})]


def batch_budgets(policy, q: int) -> list[int] | None:
    """Per layer, the budget a prompt of q tokens is asked for when the batch is compressed (alone, or beside a
    longer prompt: `batch_selected`), None when it never is."""
    rows = policy.batch_selected(LAYERS, [q, MAX_LEN])
    return None if rows is None else rows[:, 0].tolist()


@pytest.mark.parametrize("name,options", TRT_CASES, ids=[matrix.case_id(n, o) for n, o in TRT_CASES])
def test_widths_and_capacities_cover_every_prompt_length(name, options):
    policy = make_policy(name, **matrix.small(name, **options))
    largest = policy.largest_selected(LAYERS, MAX_LEN)
    capacities = layer_capacities(policy, LAYERS, MAX_LEN, NEW)
    budgets = [batch_budgets(policy, q) for q in range(1, MAX_LEN + 1)]
    if not policy.compresses:
        assert largest is None and capacities == [MAX_LEN + NEW] * LAYERS
        return
    asked = [b for b in budgets if b is not None]
    assert largest == [max(b[layer] for b in asked) for layer in range(LAYERS)], "the largest budget, attained"
    w = policy.window
    for q, asked_q in zip(range(1, MAX_LEN + 1), budgets, strict=True):  # q: a batch's padded length
        whole = kept_prompt(policy, LAYERS, q)
        for layer in range(LAYERS):
            # the prefill's present.{layer} holds the plugin's width (or, when nothing is compressed, the whole
            # prompt) plus the reserve the runner asks for (max_new_tokens - 1): it is the decode plan's past
            lengths = [whole[layer], min(q, w) + largest[layer]]
            if asked_q is not None:
                lengths.append(asked_q[layer] + min(q, w))
            assert max(lengths) + NEW - 1 <= capacities[layer], (q, layer)
    kept = layer_kept(policy, LAYERS, MAX_LEN)
    for layer in range(LAYERS):  # the decode profile reads the same numbers
        past = profile_shapes(f"past_key_values.{layer}.key", (-1, 2, -1, 16), 4, MAX_LEN, capacities, kept)
        positions = profile_shapes(f"cache_positions.{layer}", (-1, 2, -1), 4, MAX_LEN, capacities, kept)
        assert past[2] == (4, 2, capacities[layer], 16) and positions[2] == (4, 2, kept[layer])
        assert kept[layer] >= min(MAX_LEN, w) + largest[layer]


def test_pyramidkv_deep_layer_worked_example():
    """The README's numbers: C = 128, w = 8, 32 layers, an engine for 8000 tokens. Layer 31's budget there is 17,
    but a 200-token prompt asks it for 120: its width and capacity hold 120 + 8 (a 127-token prompt, too short to
    compress, is kept whole: 127)."""
    policy = make_policy("pyramidkv", kv_budget=128, window=8)
    assert policy.layer_selected(32, 8000)[31] == 17 and policy.layer_selected(32, 200)[31] == 120
    largest = policy.largest_selected(32, 8000)
    assert largest[31] == 120 and largest[0] == 234
    assert layer_capacities(policy, 32, 8000, 512)[31] == 120 + 8 + 512
    assert policy.largest_selected(32, 127) is None, "no prompt of at most 127 tokens is compressed"


# --- a short prompt through a deep layer's kernel chain, on engines built for 1024 tokens -------------------------

LONG = "The quick brown fox jumps over the lazy dog while the cat naps in the sun. "
PROMPTS = [LONG[:44], "Short prompt, left padded."]  # uniform regime (32 <= q < 56), and too short alone (< 32)
CHAINED = [("pyramidkv", None, [3]), ("chunkkv", dict(matrix.VARIANTS)["chunkkv"], [2, 3])]  # chunkkv: select, reuse


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _selection(model: onnx.ModelProto, layer: int):
    """(If node, its selecting branch, the selection node in it) of `layer` in a prefill graph."""
    kept = next(n for n in model.graph.node if f"kept_indices.{layer}" in n.output).input[0]
    node = next(n for n in model.graph.node if kept in n.output and n.op_type == "If")
    branch = _attrs(node)["else_branch"]
    return node, branch, [n for n in branch.node if n.domain == "pkv"]


def probe_selection_inputs(engine_dir, layers: list[int], feeds: dict, spec) -> dict[int, dict]:
    """Run the engine's tensorrt-target prefill under onnxruntime, with the inputs of each of `layers`' selection
    nodes as extra outputs: per layer {input name of the node: tensor} (the kernel chain reads them under the same
    names) and "kept_indices", the layer's own output (the node's ONNX function)."""
    from trt_plugins.trt_chain import CHAINS

    model = onnx.load(str(engine_dir / "prefill.onnx"))  # tiny weights, loaded inline
    sources, views = {}, {}
    for layer in layers:
        _, branch, (select,) = _selection(model, layer)
        made_inside = {o: n for n in branch.node for o in n.output}
        sources[layer] = {}
        for name, role in zip(select.input, CHAINS[select.op_type][1], strict=True):
            if name in made_inside:  # the queries [B, q, H*d], viewed as [B, q, H, d] inside the branch
                assert made_inside[name].op_type == "Reshape" and role == "queries"
                views[name] = (spec.num_heads, spec.head_dim)
            outer = made_inside[name].input[0] if name in made_inside else name
            sources[layer][name] = outer
            dtype = onnx.TensorProto.INT64 if role in ("lengths", "selected") else onnx.TensorProto.FLOAT  # fp32
            if outer not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_tensor_value_info(outer, dtype, None))
    session = ort.InferenceSession(model.SerializeToString())
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    out = {}
    for layer, names in sources.items():
        out[layer] = {"kept_indices": torch.from_numpy(values[f"kept_indices.{layer}"])}
        for name, outer in names.items():
            value = torch.from_numpy(values[outer])
            out[layer][name] = value.view(*value.shape[:2], *views[name]) if name in views else value
    return out


@pytest.mark.parametrize("name,options,layers", CHAINED, ids=[c[0] for c in CHAINED])
def test_short_prompt_keeps_the_reference_sets_through_the_kernel_chain(built_engine, name, options, layers):
    pytest.importorskip("triton", reason="the kernel chains run under the Triton interpreter")
    from trt_plugins.select_stages import STAGES
    from trt_plugins.triton_select import launch
    from trt_plugins.trt_chain import expand_selections

    engine, reference = built_engine("tiny-llama3", name, options, "tensorrt")
    policy, spec, w = reference.policy, engine.spec, reference.policy.window
    want = reference.generate(PROMPTS, 1, return_indices=True)
    long_len, short_len = want.prompt_lengths
    c = policy.kv_budget
    assert c <= long_len < 2 * (c - w) and short_len < c, "the uniform regime, and a prompt too short alone"
    at_max = policy.layer_selected(spec.num_layers, engine.max_input_len)
    ids, mask, positions = encode_batch(engine.tokenizer, PROMPTS, engine.pad_id, engine.max_input_len, 1,
                                        padding_side="right")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
             "reserve_tokens": np.array([0])}
    parser_copy = onnx.load(str(engine.dir / "prefill.onnx"), load_external_data=False)
    # what exporter/tensorrt/graphs.parser_input does, with small shares so the interpreter crosses their edges
    expand_selections(parser_copy, splits=2, programs=2, block_k=16, align=8)
    stages = {s.name: s for s in STAGES}
    probed = probe_selection_inputs(engine.dir, layers, feeds, spec)
    for layer in layers:
        budget = policy.layer_selected(spec.num_layers, long_len)[layer]
        assert budget > at_max[layer], "a deep layer: the short prompt's budget exceeds the one at max_input_len"
        _, _, chain = _selection(parser_copy, layer)
        emit = _attrs(chain[-1])
        assert emit["MAX_SELECTED"] == policy.largest_selected(spec.num_layers, engine.max_input_len)[layer] >= \
            budget, "the plugin's width holds every prompt's budget"
        tensors = {n: v for n, v in probed[layer].items() if n != "kept_indices"}
        _, keys, values, *_ = tensors.values()  # the node's inputs, in order
        for node in chain:  # each plugin node with its own kernel and attributes, as the JIT implementation runs it
            stage = stages[node.op_type]
            constants = {k: v for k, v in _attrs(node).items() if k not in ("plugin_namespace", "plugin_version")}
            out = launch(stage, dict(zip(stage.inputs, (tensors[i] for i in node.input), strict=True)), constants)
            tensors.update(zip(node.output, (out[o] for o in stage.outputs), strict=True))
        kept, keys_out, values_out = (tensors[o] for o in chain[-1].output)
        assert kept.shape[-1] == min(ids.shape[1], w) + emit["MAX_SELECTED"]
        for b in range(len(PROMPTS)):
            for h in range(kept.shape[1]):
                got = kept[b, h][kept[b, h] >= 0]
                reference_set = sorted(x for x in want.kept_indices[layer][b, h].tolist() if x >= 0)
                onnx_set = sorted(x for x in probed[layer]["kept_indices"][b, h].tolist() if x >= 0)
                assert sorted(got.tolist()) == reference_set == onnx_set, (layer, b, h)
                n = len(got)
                assert torch.equal(keys_out[b, h, :n], keys[b, h, got]) and not keys_out[b, h, n:].any()
                assert torch.equal(values_out[b, h, :n], values[b, h, got]) and not values_out[b, h, n:].any()
