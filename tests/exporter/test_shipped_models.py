"""Presets whose weights ship with pkv-export (exporter/models): ordinary Llama checkpoints, loaded without network."""

from __future__ import annotations

import json

import pytest
import torch

from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model, shipped_checkpoint
from exporter.specs import PRESETS
from methods import make_policy

PROMPT = "The best thing to do in Oslo is walk along the river. What is the best thing to do in Oslo?"


@pytest.fixture(scope="module")
def retriever():
    return load_model("tiny-retriever")


def test_the_preset_loads_the_shipped_safetensors(retriever):
    directory = shipped_checkpoint("tiny-retriever")
    assert directory is not None and (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))  # never pickle
    assert not retriever.random_weights and retriever.source == "preset:tiny-retriever"
    shipped, preset = retriever.spec.to_dict(), PRESETS["tiny-retriever"].to_dict()
    for field in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings"):
        assert shipped[field] == preset[field], field
    card = (directory / "README.md").read_text()
    assert "scripts/train_retriever.py" in card and "seed 0" in card


def test_it_is_an_ordinary_llama_that_transformers_runs_like_the_reference(retriever):
    """Transformers' own LlamaForCausalLM, from the directory (no remote code), generates what FullKV does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = shipped_checkpoint("tiny-retriever")
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, local_files_only=True,
                                              attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ref = ReferenceEngine(retriever, make_policy("full"))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    assert ids.tolist() == ref.encode([PROMPT])[0].tolist()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokens = ref.generate([PROMPT], 24).tokens[0]
    assert out[0, ids.shape[1]:].tolist()[: len(tokens)] == tokens
