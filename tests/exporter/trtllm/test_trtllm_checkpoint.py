"""TensorRT-LLM checkpoints proven by a forward pass over their layout: rank by rank, as the runtime splits the
work, the logits equal Hugging Face's (fp32, 1e-4) for tp in {1, 2, 4} and pp in {1, 2}, including models with
fewer KV heads than tp (tiny-llama3: 2 KV heads, tiny-mistral: 1)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from engines.hf_model import build_hf_model
from engines.trtllm_layout import layout_forward
from exporter.checkpoint import load_model
from exporter.engine_dir import read_manifest
from exporter.trtllm.checkpoint import trtllm_config, write_trtllm_checkpoint
from methods import make_policy
from pkv_cli import main
from pkv_core.errors import UserInputError

# Keys TensorRT-LLM reads from config.json, copied by hand from its source (TensorRT-LLM cannot be installed here,
# so this is a check against that copy, not against its classes): PretrainedConfig.__init__
# (tensorrt_llm/models/modeling_utils.py) and LLaMAConfig.__init__ plus the attributes its to_dict() writes
# (tensorrt_llm/models/llama/config.py); unknown keys are set on the config ("Implicitly setting"), which is how
# `tie_word_embeddings` and our `pkv` get in. TensorRT-LLM itself parsing the file is gpu_acceptance.py's
# trtllm-build row.
PRETRAINED_CONFIG = {"architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                     "hidden_act", "logits_dtype", "norm_epsilon", "position_embedding_type",
                     "max_position_embeddings", "rotary_embedding_dim", "num_key_value_heads", "intermediate_size",
                     "mapping", "quantization", "use_parallel_embedding", "embedding_sharding_dim", "head_size",
                     "qk_layernorm", "runtime_defaults"}
LLAMA_CONFIG = {"mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "residual_mlp",
                "disable_weight_only_quant_plugin", "moe", "remove_duplicated_kv_heads", "embedding_multiplier",
                "attention_multiplier", "residual_multiplier", "output_multiplier_scale", "fc_after_embed",
                "use_input_layernorm_in_first_layer", "use_last_layernorm", "layer_idx_offset",
                "has_partial_lora_mask", "tie_word_embeddings"}
MAPPING = {"world_size", "tp_size", "pp_size", "gpus_per_node"}  # the keys every 1.x Mapping.from_dict accepts
POLICY = make_policy("pyramidkv", kv_budget=32, window=4)


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-mistral"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_forward_over_the_layout_equals_hugging_face(tmp_path, model, tp, pp):
    loaded = load_model(model)
    out = tmp_path / "ckpt"
    write_trtllm_checkpoint(loaded, POLICY, out, tp=tp, pp=pp, dtype="fp32", max_input_len=1024)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(tp * 10 + pp))  # > the 48 window
    want = build_hf_model(loaded, attn_implementation="eager")(input_ids=ids).logits
    got = layout_forward(out, ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_rank_files_hold_what_each_rank_owns(tmp_path):
    out = tmp_path / "ckpt"
    write_trtllm_checkpoint(load_model("tiny-llama3"), POLICY, out, tp=4, pp=2, dtype="fp16", max_input_len=1024)
    names = []
    for r in range(8):
        with safe_open(str(out / f"rank{r}.safetensors"), framework="pt") as f:
            names.append(set(f.keys()))
            if r >= 4:  # last pipeline rank: lm_head padded to a multiple of tp (259 -> 260), split in rows
                assert f.get_slice("lm_head.weight").get_shape() == [65, 64]
                assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float16
    assert all("transformer.vocab_embedding.weight" in n for n in names[:4])
    assert not any("transformer.vocab_embedding.weight" in n for n in names[4:])
    assert all({"transformer.ln_f.weight", "lm_head.weight"} <= n for n in names[4:])
    assert all({f"transformer.layers.{i}.mlp.fc.weight" for i in range(2)} <= n for n in names)  # 4 layers / pp 2
    manifest = read_manifest(out)
    assert manifest["backend"] == "trtllm" and manifest["trtllm"]["world_size"] == 8


def test_config_uses_tensorrt_llm_field_names():
    """The config of a real shape (LLaMA-3.1-8B: llama3 RoPE scaling, 128k vocabulary) without writing its weights
    (what write_trtllm_checkpoint writes as config.json: the other tests read it back from written checkpoints)."""
    config = trtllm_config(load_model("llama3.1-8b", need_weights=False).spec, POLICY, 2, 1, "bf16", 8192)
    config = json.loads(json.dumps(config))  # as written
    assert set(config) - {"pkv"} <= PRETRAINED_CONFIG | LLAMA_CONFIG, set(config) - PRETRAINED_CONFIG - LLAMA_CONFIG
    assert set(config["mapping"]) <= MAPPING and config["mapping"]["world_size"] == 2
    assert config["architecture"] == "LlamaForCausalLM" and config["position_embedding_type"] == "rope_gpt_neox"
    assert config["rotary_scaling"]["type"] == "llama3" and config["rotary_base"] == 500000.0
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == 128256
    assert config["pkv"]["policy"]["name"] == "pyramidkv" and len(config["pkv"]["selected_at_max_input_len"]) == 32


@pytest.mark.parametrize("args,fragment", [
    (["--tp", "3"], "does not divide the 4 attention heads"),
    (["--tp", "0"], "at least 1"),
    (["--pp", "5"], "exceeds the 4 layers"),
    (["--model", "tiny-mistral", "--tp", "4", "--num-layers", "2", "--random-weights"], None),
])
def test_bad_parallelism_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(main, ["build", "--backend", "trtllm", *args, "--out", str(out)])
    if fragment is None:  # tp 4 over 1 KV head: duplicated, fine
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_architecture_and_existing_output(tmp_path, tiny_llama_dir):
    out = tmp_path / "ckpt"
    assert CliRunner().invoke(main, ["build", "--backend", "trtllm", "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["build", "--backend", "trtllm", "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
    with pytest.raises(UserInputError, match="unknown dtype"):
        write_trtllm_checkpoint(load_model("tiny-llama3"), POLICY, tmp_path / "x", dtype="int4")
