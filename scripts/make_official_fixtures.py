"""Golden fixtures from the methods' official code: tests/fixtures/official/*.npz (tests/test_official_fixtures.py).

Run by whoever regenerates the fixtures, with local checkouts of the official repositories (nothing is fetched
here, and nothing of theirs is copied into this project; the tests read the data only):

    python scripts/make_official_fixtures.py --kvcache-factory ~/src/KVCache-Factory --kvpress ~/src/kvpress \
        --kvzip ~/src/KVzip --pyramidinfer ~/src/pyramidinfer --pyramidinfer-python ~/venvs/pi/bin/python

What runs where, on the tiny presets' prompts (`PROMPT`, a few hundred byte tokens):

* SnapKV / PyramidKV / H2O: KVCache-Factory's `SnapKVCluster` / `PyramidKVCluster` / `H2OKVCluster.update_kv`
  on the post-RoPE q/k/v of this project's FullKV prefill (Hugging Face's eager attention,
  `engines.hf_model.capture_prefill`);
* ChunkKV: kvpress's `ChunkKVPress(SnapKVPress(...))`.compress on the same layers (the attention module, its
  input hidden states and rotary tables);
* KVzip: the official `KVScore` (attention/score.py) scoring inside Hugging Face's model with a DynamicCache,
  driven by the official `ModelKVzip.scoring` / `self_task` / `chunk_fn` (model/wrapper.py, run on a stand-in
  for the model wrapper: its forward is Hugging Face's), then `KVScore._threshold`; the first `sinks` prompt
  tokens are its system prompt, no chat template (empty postfix);
* PyramidInfer: the official `LlamaForCausalLM` (models/modeling_llama_pyramidinfer.py) with the llama3_8b
  config, greedy generation; it needs transformers 4.46.3 (its requirements), so it runs in the interpreter
  given by --pyramidinfer-python (torch + transformers==4.46.3, e.g. `python -m venv pi && pi/bin/pip install
  torch transformers==4.46.3`), which reads only the weights and ids written here. Its generation fixture cuts
  nothing in the prefill and holds R fixed, and stops before any layer's second compression: the official code
  recomputes R from the tokens seen at every step and compares the tokens seen in total with each layer's own
  cache (see README, "Limits"), which the project does not.

Each fixture holds the prompt ids, the official kept sets as packed bit masks [L, Hkv, n] (n = positions),
the settings on both sides, and per-layer checksums of the captured keys (so a changed model is reported as
"regenerate the fixtures", not as a wrong method).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "official"
MODELS = ("tiny-llama3", "tiny-mistral")
PROMPT = ("Ada kept a small notebook of everything the river carried past her window: a red boat on Monday, "
          "two herons and a violin case on Tuesday, then nothing for a week but rain. On the ninth day a letter "
          "in a green bottle drifted into the reeds. It said only: the key is under the third stone of the old "
          "mill, and the door opens at dusk.")

# Settings on both sides (the project's policy options; the official arguments follow from them).
SNAP = {"kv_budget": 64, "window": 8, "kernel": 7, "pooling": "max"}
CHUNK_CASES = {"chunkkv": {"kv_budget": 64, "window": 8, "chunk_size": 10, "kernel": 1},
               "chunkkv-pooled": {"kv_budget": 64, "window": 8, "chunk_size": 10, "kernel": 5, "pooling": "avg"}}
KVZIP_CASES = {"kvzip-1chunk": {"kv_budget": 96, "sinks": 4, "score_chunk": 2048, "postfix": 8},
               "kvzip-3chunks": {"kv_budget": 96, "sinks": 4, "score_chunk": 110, "postfix": 8}}
PYRAMIDINFER_CASES = {  # the official llama3_8b config; the second cuts nothing in the prefill and holds the
    # recent window at 1 + 4 tokens while generating, so that every layer's first generation-stage compression
    # comes at the same step in both codes (see tests/test_official_fixtures.py)
    "pyramidinfer": {"policy": {}, "steps": 8},
    "pyramidinfer-generation": {"policy": {"decay": 1.0}, "recent": 4, "steps": 22},
}


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(bool), axis=-1)


def write(name: str, model: str, ids: list[int], kept: np.ndarray, meta: dict, extra: dict | None = None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {"input_ids": np.asarray(ids, dtype=np.int32), "kept": pack(kept), "positions": np.int64(kept.shape[-1]),
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    for key, value in (extra or {}).items():
        arrays[key] = value
    np.savez_compressed(OUT / f"{model}--{name}.npz", **arrays)


def rows_of(found, reference) -> list[int]:
    """The position in `reference` [n, d] of every row of `found` [k, d] (exact: gathers copy rows)."""
    out = []
    for row in found:
        hits = (reference == row).all(dim=-1).nonzero()
        if len(hits) != 1:
            raise RuntimeError(f"a kept key matches {len(hits)} rows")
        out.append(int(hits[0]))
    return out


def kept_mask(outputs, keys, positions: int) -> np.ndarray:
    """outputs: per layer the official kept keys [1, Hkv, k, d]; keys: the layer's inputs -> [L, Hkv, q] bool."""
    mask = np.zeros((len(outputs), outputs[0].shape[1], positions), dtype=bool)
    for layer, (out, full) in enumerate(zip(outputs, keys, strict=True)):
        for head in range(out.shape[1]):
            mask[layer, head, rows_of(out[0, head], full[0, head])] = True
    return mask


def checksums(records) -> list[float]:
    return [float(r["key"].abs().sum()) for r in records]


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- KVCache-Factory: SnapKV, PyramidKV ------------------------------------------------------------------------

def kvcache_factory(repo: Path, model: str, loaded, ids: list[int], records) -> None:
    sys.path.insert(0, str(repo))
    from pyramidkv.pyramidkv_utils import H2OKVCluster, PyramidKVCluster, SnapKVCluster

    s = loaded.spec
    group = s.num_heads // s.num_kv_heads
    for name in ("snapkv", "pyramidkv", "h2o"):
        outputs = []
        for layer, r in enumerate(records):
            common = dict(window_size=SNAP["window"], max_capacity_prompt=SNAP["kv_budget"], kernel_size=SNAP["kernel"],
                          pooling="maxpool")
            if name == "snapkv":
                cluster = SnapKVCluster(**common)
            elif name == "pyramidkv":
                cluster = PyramidKVCluster(num_hidden_layers=s.num_layers, beta=20, layer_idx=layer, **common)
            else:  # H2O: every query observes, no pooling
                cluster = H2OKVCluster(**common)
            k, _ = cluster.update_kv(r["key"], r["query"], r["value"], None, group)
            outputs.append(k)
        policy = {"name": name, **SNAP} if name != "h2o" else {"name": name, "kv_budget": SNAP["kv_budget"],
                                                                "window": SNAP["window"]}
        meta = {"method": name, "model": model, "policy": policy,
                "official": {"repo": "Zefan-Cai/KVCache-Factory", "commit": commit_of(repo),
                             "code": f"pyramidkv/pyramidkv_utils.py {type(cluster).__name__}.update_kv "
                                     "(kv-head path, gqa_score_agg mean)",
                             "args": {"window_size": SNAP["window"], "max_capacity_prompt": SNAP["kv_budget"],
                                      "kernel_size": SNAP["kernel"], "pooling": "maxpool", "beta": 20}},
                "key_checksums": checksums(records)}
        write(name, model, ids, kept_mask(outputs, [r["key"] for r in records], len(ids)), meta)


# --- kvpress: ChunkKV ----------------------------------------------------------------------------------------

def _kvpress_modules(repo: Path):
    """kvpress's presses without its package __init__ (which imports every press and their extra needs)."""
    for name, path in (("kvpress", repo / "kvpress"), ("kvpress.presses", repo / "kvpress" / "presses")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules.setdefault(name, module)
    from kvpress.presses.chunkkv_press import ChunkKVPress
    from kvpress.presses.snapkv_press import SnapKVPress

    return ChunkKVPress, SnapKVPress


def chunks_kept(q: int, window: int, chunk: int, kv_budget: int) -> int:
    """The chunks the project keeps for a prompt of q tokens (trt_plugins.chunkkv_select), to set kvpress's ratio."""
    first = (q - min(window, q)) // chunk
    window_tokens = q - first * chunk
    return -(-q // chunk) - first + max(0, kv_budget - window_tokens) // chunk


def kvpress_chunkkv(repo: Path, model: str, loaded, hf, ids: list[int], records) -> None:
    import torch

    chunk_press, snap_press = _kvpress_modules(repo)
    q = len(ids)
    for name, opts in CHUNK_CASES.items():
        n_chunks = -(-q // opts["chunk_size"])
        keep = chunks_kept(q, opts["window"], opts["chunk_size"], opts["kv_budget"])
        ratio = 1 - (keep + 0.5) / n_chunks  # int(n_chunks * (1 - ratio)) == keep
        assert int(n_chunks * (1 - ratio)) == keep
        press = chunk_press(press=snap_press(compression_ratio=ratio, window_size=opts["window"],
                                             kernel_size=opts["kernel"]), chunk_length=opts["chunk_size"])
        outputs = []
        with torch.inference_mode():
            for layer, r in enumerate(records):
                module = hf.model.layers[layer].self_attn
                k, _ = press.compress(module, r["hidden"], r["key"], r["value"], None,
                                      {"position_embeddings": (r["cos"], r["sin"])})
                outputs.append(k)
        meta = {"method": "chunkkv", "model": model, "policy": {"name": "chunkkv", **opts},
                "official": {"repo": "NVIDIA/kvpress", "commit": commit_of(repo),
                             "code": "kvpress/presses/chunkkv_press.py ChunkKVPress(SnapKVPress).compress",
                             "args": {"chunk_length": opts["chunk_size"], "window_size": opts["window"],
                                      "kernel_size": opts["kernel"], "compression_ratio": ratio}},
                "key_checksums": checksums(records)}
        write(name, model, ids, kept_mask(outputs, [r["key"] for r in records], q), meta)


# --- KVzip ---------------------------------------------------------------------------------------------------

def _official_functions(path: Path, names: dict[str, list[str]], namespace: dict) -> dict:
    """Execute the named top-level functions and class methods of an official source file, as written, in
    `namespace` (the module itself imports CUDA-only extensions). names: {"": [functions], "Class": [methods]}."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names.get("", []):
            found[node.name] = node
        if isinstance(node, ast.ClassDef) and node.name in names:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in names[node.name]:
                    found[f"{node.name}.{item.name}"] = item
    missing = {f"{c}.{m}" if c else m for c, ms in names.items() for m in ms} - set(found)
    if missing:
        raise RuntimeError(f"{path}: not found: {sorted(missing)}")
    out = {}
    for key, node in found.items():
        scope = dict(namespace)
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102
        out[key] = scope[node.name]
        if "." not in key:  # a module-level function: later ones call it by name
            namespace[node.name] = scope[node.name]
    return out


def kvzip(repo: Path, model: str, loaded, ids: list[int], records) -> None:
    import torch
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from engines.hf_model import build_hf_model

    sys.path.insert(0, str(repo))
    import typing

    from attention.score import KVScore

    # the official signatures name typing's aliases; tqdm only draws progress bars there
    ns = {"torch": torch, "tqdm": lambda x, **k: x, "RetainCache": object, "EvictCache": object,
          **{n: getattr(typing, n) for n in ("List", "Optional", "Tuple", "Union")}}
    official = _official_functions(repo / "model" / "wrapper.py",
                                   {"": ["chunk_fn"], "ModelKVzip": ["self_task", "scoring"]}, ns)

    class Scorer(KVScore):
        """The official KVScore state (what EvictCache adds to it for scoring), around a DynamicCache."""

        def __init__(self, spec, sys_len: int, ctx_len: int):
            super().__init__()
            self.n_layers, self.n_heads_kv = spec.num_layers, spec.num_kv_heads
            self.dtype, self.device = torch.float32, torch.device("cpu")
            self.start_idx, self.end_idx = sys_len, sys_len + ctx_len
            self.ctx_len, self.sink = ctx_len, sys_len
            self.get_score = False
            self.cache = DynamicCache()

    scorer: list[Scorer] = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        if scorer and scorer[0].get_score:  # where the official attention calls it: after the cache update
            scorer[0]._get_score(query, key, module.layer_idx)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("official_kvzip", attention)
    AttentionMaskInterface.register("official_kvzip", eager_mask)
    hf = build_hf_model(loaded, torch.float32, attn_implementation="official_kvzip")
    tok = loaded.tokenizer()
    s = loaded.spec

    class Wrapper:
        """Stands in for ModelKVzip: its encode, its (empty) chat-template postfix, its forward without a cache
        update (`update_cache=False`: the chunk's K/V are dropped again)."""

        postfix_ids = torch.zeros(1, 0, dtype=torch.long)

        def encode(self, text: str):
            return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

        def __call__(self, input_ids, kv, update_cache=False):
            seen = kv.cache.get_seq_length()
            hf.model(input_ids=input_ids, past_key_values=kv.cache, use_cache=True)
            kv.cache.crop(seen - kv.cache.get_seq_length())  # a negative count: remove the chunk again

    for name, opts in KVZIP_CASES.items():
        sinks = opts["sinks"]
        ctx_ids = torch.tensor([ids[sinks:]])  # the system prompt is ids[:sinks], prefilled with it below
        kv = Scorer(s, sinks, len(ids) - sinks)
        scorer[:] = [kv]
        with torch.inference_mode():
            hf.model(input_ids=torch.tensor([ids]), past_key_values=kv.cache, use_cache=True)  # the prefill
            wrapper = Wrapper()
            # scoring() calls self.self_task(ctx_ids) with its defaults: bind this case's chunk and postfix
            wrapper.self_task = lambda c, w=wrapper, o=opts: official["ModelKVzip.self_task"](
                w, c, chunk_size=o["score_chunk"], prev_postfix_size=o["postfix"])
            official["ModelKVzip.scoring"](wrapper, kv, ctx_ids)
            n_chunks = len(official["chunk_fn"](ctx_ids, opts["score_chunk"]))
            pairs = s.num_layers * s.num_kv_heads * (len(ids) - sinks)
            keep = (opts["kv_budget"] - sinks) * s.num_layers * s.num_kv_heads
            ratio = (keep + 1.5) / pairs  # the official threshold keeps int(pairs * ratio) - 1 pairs
            valids, _ = kv._threshold(kv.score, ratio)  # [L, 1, Hkv, ctx]
        mask = np.zeros((s.num_layers, s.num_kv_heads, len(ids)), dtype=bool)
        mask[..., :sinks] = True  # the system prompt: never evicted
        mask[..., sinks:] = valids[:, 0].numpy()
        meta = {"method": "kvzip", "model": model, "policy": {"name": "kvzip", **opts},
                "chunks": n_chunks, "official_kept_pairs": int(valids.sum()),
                "official": {"repo": "snu-mllab/KVzip", "commit": commit_of(repo),
                             "code": "model/wrapper.py ModelKVzip.scoring/self_task/chunk_fn, attention/score.py "
                                     "KVScore._get_score/_threshold",
                             "args": {"sys_prompt": f"the first {sinks} prompt tokens", "postfix_ids": "empty",
                                      "chunk_size": opts["score_chunk"], "prev_postfix_size": opts["postfix"],
                                      "ratio": ratio}},
                "key_checksums": checksums(records)}
        scores = np.stack([x[0].numpy() for x in kv.score]).astype(np.float32)  # [L, Hkv, ctx]
        write(name, model, ids, mask, meta, {"official_scores": scores})


# --- PyramidInfer (runs under --pyramidinfer-python) ---------------------------------------------------------

def pyramidinfer_worker(repo: Path, model_dir: Path, out: Path, recent_ratio: float, decay: float,
                        steps: int) -> None:
    """The official model's prefill and `steps` greedy tokens. Writes {prefill: [L][positions alive], after:
    [L][positions cached after the last step], tokens: [...]} as JSON."""
    import torch
    from safetensors.torch import load_file
    from transformers import DynamicCache, LlamaConfig, LogitsProcessor, LogitsProcessorList

    sys.path.insert(0, str(repo))
    from models.modeling_llama_pyramidinfer import LlamaForCausalLM

    info = json.loads((model_dir / "model.json").read_text())
    cfg = LlamaConfig(**info["config"], attn_implementation="eager")
    official = json.loads((repo / "configs" / "llama3_8b.json").read_text())
    for stage in ("prefill_stage", "generation_stage"):
        for key, value in official[stage].items():
            setattr(cfg, key, value)
    cfg.recent_ratio, cfg.prefill_decay_ratio = recent_ratio, decay
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
    model.eval()
    ids = torch.tensor([info["input_ids"]])
    q = ids.shape[1]
    alive: dict[int, list[int]] = {}

    def before(module, args, kwargs):
        chosen = kwargs.get("selected_position_ids")
        if chosen is not None and module.self_attn.layer_idx not in alive:
            alive[module.self_attn.layer_idx] = chosen[0].tolist()

    for layer in model.model.layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
    cache = DynamicCache()
    held: dict = {"keys": None, "positions": None}

    class Track(LogitsProcessor):
        """Called after every forward: follow each layer's cache slots (positions) through appends and evictions."""

        def __call__(self, input_ids, scores):
            fed = input_ids.shape[1]  # tokens whose K/V are in the cache now
            layers = range(cfg.num_hidden_layers)
            keys = [cache.key_cache[i][0, 0].clone() for i in layers]
            if held["keys"] is None:
                held["positions"] = [list(alive[i]) for i in layers]
            else:
                for i in layers:
                    known = torch.cat([held["keys"][i], keys[i][-1:]])
                    slots = held["positions"][i] + [fed - 1]
                    held["positions"][i] = [slots[j] for j in rows_of(keys[i], known)]
            held["keys"] = keys
            return scores

    with torch.inference_mode():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             past_key_values=cache, logits_processor=LogitsProcessorList([Track()]),
                             pad_token_id=0)
    out.write_text(json.dumps({"prefill": [alive[i] for i in range(cfg.num_hidden_layers)],
                               "after": held["positions"], "tokens": generated[0, q:].tolist()}))


def pyramidinfer(repo: Path, python: str, model: str, loaded, ids: list[int], records) -> None:
    import torch
    from safetensors.torch import save_file

    from exporter.specs import tensor_shapes

    s = loaded.spec
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_file({n: loaded.weights.get(n).to(torch.float32).contiguous() for n in tensor_shapes(s)},
                  str(d / "model.safetensors"))
        config = {"vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
                  "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
                  "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "rms_norm_eps": s.rms_norm_eps,
                  "rope_theta": s.rope_theta, "max_position_embeddings": s.max_position_embeddings,
                  "tie_word_embeddings": False}
        (d / "model.json").write_text(json.dumps({"config": config, "input_ids": ids}))
        for name, case in PYRAMIDINFER_CASES.items():
            policy = dict(case["policy"])
            if "recent" in case:  # the official code recomputes R = int(0.2 * tokens so far) at every step
                q = len(ids)
                policy["recent_ratio"] = (case["recent"] + 0.5) / q
                assert int(q * policy["recent_ratio"]) == int((q + case["steps"]) * policy["recent_ratio"])
            opts = {"recent_ratio": 0.2, "decay": 0.9} | policy
            result = d / f"{name}.json"
            subprocess.run([python, __file__, "pyramidinfer-worker", "--pyramidinfer", str(repo), "--model-dir",
                            str(d), "--out", str(result), "--recent-ratio", str(opts["recent_ratio"]),
                            "--decay", str(opts["decay"]), "--steps", str(case["steps"])], check=True)
            got = json.loads(result.read_text())
            q = len(ids)
            prefill = np.zeros((s.num_layers, s.num_kv_heads, q), dtype=bool)
            for layer, positions in enumerate(got["prefill"]):
                prefill[layer, :, positions] = True
            total = q + case["steps"]
            after = np.zeros((s.num_layers, s.num_kv_heads, total), dtype=bool)
            for layer, positions in enumerate(got["after"]):
                after[layer, :, positions] = True
            official = {"recent_ratio": opts["recent_ratio"], "prefill_decay_ratio": opts["decay"],
                        "prefill_decay_strategy": "cosine", "min_context_length": 64,
                        "layerwise_downsample_interval": 1, "streamingllm_sink_len": 4, "distance_weight": 1.2,
                        "gen_decay_ratio": 0.1, "gen_decay_strategy": "cosine", "gen_compress_ratio": 0.9,
                        "exceed_length_to_compress": 16}
            meta = {"method": "pyramidinfer", "model": model, "policy": {"name": "pyramidinfer", **policy},
                    "steps": case["steps"], "sliding_window": "none (the official model is LLaMA's)",
                    "official": {"repo": "mutonix/pyramidinfer", "commit": commit_of(repo),
                                 "code": "models/modeling_llama_pyramidinfer.py LlamaForCausalLM.generate, "
                                         "configs/llama3_8b.json", "args": official},
                    "key_checksums": checksums(records)}
            write(name, model, ids, prefill, meta, {"after": pack(after), "after_positions": np.int64(total),
                                                    "tokens": np.asarray(got["tokens"], dtype=np.int32)})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "pyramidinfer-worker":
        p = argparse.ArgumentParser()
        p.add_argument("worker")
        p.add_argument("--pyramidinfer", type=Path, required=True)
        p.add_argument("--model-dir", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--recent-ratio", type=float, required=True)
        p.add_argument("--decay", type=float, required=True)
        p.add_argument("--steps", type=int, required=True)
        a = p.parse_args()
        pyramidinfer_worker(a.pyramidinfer, a.model_dir, a.out, a.recent_ratio, a.decay, a.steps)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvcache-factory", type=Path, help="checkout of Zefan-Cai/KVCache-Factory")
    p.add_argument("--kvpress", type=Path, help="checkout of NVIDIA/kvpress")
    p.add_argument("--kvzip", type=Path, help="checkout of snu-mllab/KVzip")
    p.add_argument("--pyramidinfer", type=Path, help="checkout of mutonix/pyramidinfer")
    p.add_argument("--pyramidinfer-python", default=sys.executable,
                   help="an interpreter with torch and transformers==4.46.3 for the PyramidInfer model")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from engines.hf_model import build_hf_model, capture_prefill
    from exporter.checkpoint import load_model

    for model in MODELS:
        loaded = load_model(model)
        ids = loaded.tokenizer()(PROMPT)["input_ids"]
        records = capture_prefill(loaded, ids)
        if a.kvcache_factory:
            kvcache_factory(a.kvcache_factory, model, loaded, ids, records)
        if a.kvpress:
            kvpress_chunkkv(a.kvpress, model, loaded, build_hf_model(loaded), ids, records)
        if a.kvzip:
            kvzip(a.kvzip, model, loaded, ids, records)
        if a.pyramidinfer:
            pyramidinfer(a.pyramidinfer, a.pyramidinfer_python, model, loaded, ids, records)
        print(f"{model}: fixtures in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
