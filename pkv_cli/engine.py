"""CLI commands around engines: build, compare."""

from __future__ import annotations

from pathlib import Path

import click

from exporter.checkpoint import load_model
from methods.backends import build_backend
from pkv_cli.common import (
    PolicyCommand,
    check_text,
    emit_json,
    model_option,
    policy_from_options,
    policy_options,
    progress_bar,
    weight_options,
    weights_from_options,
)
from pkv_core.errors import JobError, UserInputError


def _build_onnx(loaded, policy, out: Path, o: dict) -> tuple[dict, str]:
    from exporter.onnx.export import build_onnx_engine

    return build_onnx_engine(loaded, policy, out, dtype=o["dtype"], max_input_len=o["max_input_len"],
                             force=o["force"], progress=o["progress"], target=o["target"],
                             weights=o["weights"]), o["target"]


def _build_tensorrt(loaded, policy, out: Path, o: dict) -> tuple[dict, str]:
    from exporter.tensorrt.build import build_tensorrt_engine

    return build_tensorrt_engine(loaded, policy, out, dtype=o["dtype"], max_input_len=o["max_input_len"],
                                 max_batch=o["max_batch"], max_new_tokens=o["max_new_tokens"], force=o["force"],
                                 progress=o["progress"]), "tensorrt"


def _build_trtllm(loaded, policy, out: Path, o: dict) -> tuple[dict, str]:
    from exporter.trtllm.checkpoint import write_trtllm_checkpoint

    return write_trtllm_checkpoint(loaded, policy, out, tp=o["tp"], pp=o["pp"], dtype=o["dtype"],
                                   max_input_len=o["max_input_len"], force=o["force"], progress=o["progress"],
                                   weights=o["weights"]), f"TensorRT-LLM 1.2, tp {o['tp']} x pp {o['pp']}"


def build_weights(backend: str, target: str, weight_format: str, block_size: str | None, symmetric: bool,
                  accuracy_level: str | None):
    """`--weights` and its settings for this backend, checked before anything is loaded: the onnx backend's
    block-wise quantization (exporter.quantize.WeightQuant), TensorRT-LLM's per-channel symmetric weight-only
    (exporter.trtllm.weight_only.WeightOnly: a block size or zero point is refused, never ignored), or None."""
    if backend == "trtllm":
        if weight_format != "fp" and (block_size is not None or not symmetric or accuracy_level is not None):
            raise UserInputError("--backend trtllm quantizes per output channel and symmetrically (TensorRT-LLM's "
                                 "weight-only GEMM): drop --block-size / --asymmetric / --accuracy-level")
        if weight_format == "fp":
            weights_from_options(weight_format, block_size, symmetric, accuracy_level)  # the same refusals
            return None
        from exporter.trtllm.weight_only import WeightOnly

        return WeightOnly.parse(weight_format)
    weights = weights_from_options(weight_format, block_size, symmetric, accuracy_level)
    if weights is None:
        return None
    if backend != "onnx":
        raise UserInputError(f"--weights {weights.name} is written for --backend onnx (both targets) and "
                             f"--backend trtllm, not --backend {backend}")
    if weights.accuracy_level and target != "onnxruntime":
        raise UserInputError("--accuracy-level is onnxruntime's MatMulNBits setting: it needs --target onnxruntime")
    return weights


# backend -> builder: (loaded model, policy, out, options) -> (manifest, what the build targets)
BUILDERS = {"onnx": _build_onnx, "tensorrt": _build_tensorrt, "trtllm": _build_trtllm}


@click.command(cls=PolicyCommand)
@model_option
@policy_options
@click.option("--backend", type=click.Choice(list(BUILDERS)), default="onnx", show_default=True,
              help="Engine format: ONNX graphs for onnxruntime (CPU or CUDA); TensorRT plans with the selection "
                   "run by pkv kernel plugins (a GPU host with TensorRT 10.x); a TensorRT-LLM 1.2 checkpoint "
                   "(written anywhere).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Graphs for onnxruntime (fused GroupQueryAttention, in-place caches) or for TensorRT's parser "
                   "(standard ops: Attention, TensorScatter; plugin-ready selection nodes). Both run on onnxruntime.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights, activations and KV cache of the engine (fp32 is compared with the reference to 1e-4).")
@click.option("--max-input-len", type=int, default=None, help="Longest prompt the engine accepts [model maximum].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Engine directory to create.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--random-weights", is_flag=True,
              help="Deterministic random weights of the model's shape (shape-faithful engines for benchmarks).")
@click.option("--num-layers", type=int, default=None, help="With --random-weights: override the layer count.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-weights.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="--backend tensorrt: largest batch the plans accept.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True,
              help="--backend tensorrt: most tokens generated per prompt (sizes every layer's cache).")
@weight_options
@click.option("--tp", type=int, default=1, show_default=True, help="--backend trtllm: tensor-parallel ranks.")
@click.option("--pp", type=int, default=1, show_default=True, help="--backend trtllm: pipeline-parallel ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(model: str, backend: str, target: str, dtype: str, max_input_len: int | None, out: Path, force: bool,
          random_weights: bool, num_layers: int | None, seed: int, max_batch: int, max_new_tokens: int,
          weight_format: str, block_size: str | None, symmetric: bool, accuracy_level: str | None, tp: int, pp: int,
          as_json: bool, **kwargs) -> None:
    """Build an engine directory with the KV policy inside the exported graphs."""
    from exporter.outputs import check_output

    policy = policy_from_options(kwargs)
    policy.check_backend(build_backend(backend, target))  # before anything is loaded
    weights = build_weights(backend, target, weight_format, block_size, symmetric, accuracy_level)
    if backend == "tensorrt":
        from exporter.tensorrt.build import require_tensorrt

        require_tensorrt()  # before anything is loaded: one line saying what is missing
    # Checked again before the rename; checking first avoids loading weights for an output that is refused.
    check_output(out, "engine", force, [model] if Path(model).exists() else [])
    loaded = load_model(model, random_weights=random_weights, num_layers=num_layers, seed=seed)
    loaded.tokenizer()  # its files and vocabulary checked before anything is written (a broken one: one line)
    # progress lines on stderr even when it is not a terminal: a large engine's build is minutes of writing
    bar, update = progress_bar("writing weights (embedding, layers, head)", 1, lines=True)
    with bar:
        options = {"dtype": dtype, "max_input_len": max_input_len, "force": force, "progress": update,
                   "weights": weights, "target": target, "max_batch": max_batch, "max_new_tokens": max_new_tokens,
                   "tp": tp, "pp": pp}
        manifest, target = BUILDERS[backend](loaded, policy, out, options)
    if as_json:
        emit_json(manifest)
        return
    size = sum(f["bytes"] for f in manifest["files"])
    wf = "" if weights is None else f", {weights.name} weights" + (
        f" (block {weights.block_size})" if hasattr(weights, "block_size") else " (per channel)")
    click.echo(f"built {out} ({backend}, target {target}, {policy.describe()}, {dtype}{wf}, {size / 2**20:.1f} MiB)")
    for note in manifest["notes"]:
        click.echo(f"note: {note}", err=True)


def quantization_drift(got, unquantized, engine_name: str) -> dict:
    """An engine with quantized weights against the unquantized reference: the share of generated tokens that
    are equal position by position, and the logits and kept sets up to the first divergence."""
    from engines.compare import compare_results

    rows = zip(got.tokens, unquantized.tokens, strict=True)
    pairs = [(a, b) for x, y in rows for a, b in zip(x, y, strict=False)]  # rows may stop at different steps
    result = compare_results(got, unquantized, engine_name, float("inf"), 0.0)
    return {"token_agreement": sum(a == b for a, b in pairs) / max(1, len(pairs)),
            "first_divergence": result.first_divergence, "max_abs_logit_diff": result.max_abs_logit_diff,
            "index_agreement": result.index_agreement}


def comparison_lines(result, drift: dict | None) -> list[str]:
    """compare's text output: the comparison (PASS / FAIL) and, for quantized weights, the drift from the
    unquantized model; agreements with 4 decimals, logit differences with 3 significant digits."""
    def agreement(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"tokens_equal={result.tokens_equal} first_divergence={result.first_divergence} "
             f"max_abs_logit_diff={result.max_abs_logit_diff:.3g} index_agreement={agreement(result.index_agreement)} "
             f"-> {'PASS' if result.passed else 'FAIL'}"]
    if drift:
        lines.append(f"against the unquantized model (not a pass/fail): token_agreement="
                     f"{drift['token_agreement']:.4f} max_abs_logit_diff={drift['max_abs_logit_diff']:.3g} "
                     f"index_agreement={agreement(drift['index_agreement'])}")
    return lines


@click.command()
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), required=True, help="Engine directory.")
@click.option("--model", default=None, help="Checkpoint for the reference [the one recorded in the engine].")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).",
              callback=lambda c, p, v: tuple(check_text(x, "--prompt") for x in v))
@click.option("--prompt-len", type=int, default=None, help="Synthetic prompt of exactly N tokens.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="With --prompt-len: B prompts of decreasing lengths (left padding).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Tokens to decode per prompt.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest |logit difference| allowed.")
@click.option("--min-index-agreement", type=float, default=1.0, show_default=True,
              help="Smallest mean Jaccard of kept index sets allowed.")
@click.option("--json", "as_json", is_flag=True, help="Print the full comparison as JSON.")
def compare(engine_dir: Path, model: str | None, prompts: tuple[str, ...], prompt_len: int | None, batch: int,
            max_new_tokens: int, atol: float, min_index_agreement: float, as_json: bool) -> None:
    """Run an engine and the PyTorch reference on the same inputs; exit 1 when they disagree."""
    from engines.compare import compare_results
    from engines.prompts import synthetic_prompt_ids
    from engines.reference import ReferenceEngine, reference_for_manifest
    from engines.registry import open_engine

    if not 0 <= atol < float("inf"):  # a negative (or NaN) tolerance fails every comparison: a usage error
        raise UserInputError(f"--atol must be a finite number >= 0 (got {atol})")
    if not 0 <= min_index_agreement <= 1:
        raise UserInputError(f"--min-index-agreement must be in [0, 1] (got {min_index_agreement})")
    engine = open_engine(engine_dir)
    if bool(prompts) == (prompt_len is not None):
        raise UserInputError("give either --prompt TEXT (repeatable) or --prompt-len N")
    if max_new_tokens < 1 or batch < 1:
        raise UserInputError("--max-new-tokens and --batch must be at least 1")
    if prompt_len is not None:
        if not 1 <= prompt_len <= engine.max_input_len:
            raise UserInputError(f"--prompt-len must be in [1, {engine.max_input_len}]")
        inputs = [synthetic_prompt_ids(engine.tokenizer, max(1, prompt_len - 7 * b), seed=b) for b in range(batch)]
    else:
        inputs = list(prompts)
    policy = engine.policy
    reference = ReferenceEngine(reference_for_manifest(engine.manifest, model), policy)
    bar, update = progress_bar("engine", max_new_tokens)
    with bar:
        got = engine.generate(inputs, max_new_tokens, return_logits=True, return_indices=True, progress=update)
    bar, update = progress_bar("reference", max_new_tokens)
    with bar:
        want = reference.generate(inputs, max_new_tokens, return_logits=True, return_indices=True, progress=update)
    result = compare_results(got, want, engine.name, atol, min_index_agreement)
    drift = None
    if engine.manifest.get("weights", {}).get("format", "fp") != "fp":  # what quantization costs, reported apart
        plain = ReferenceEngine(reference_for_manifest(engine.manifest, model, dequantized=False), policy)
        bar, update = progress_bar("unquantized reference", max_new_tokens)
        with bar:
            unq = plain.generate(inputs, max_new_tokens, return_logits=True, return_indices=True, progress=update)
        drift = quantization_drift(got, unq, engine.name)
    if as_json:
        emit_json({"engine": str(engine_dir), "backend": engine.manifest["backend"], "policy": policy.name,
                   "weights": engine.manifest.get("weights", {"format": "fp"})["format"],
                   "prompt_lengths": got.prompt_lengths, **result.to_json(),
                   **({"vs_unquantized": drift} if drift else {})})
    else:
        for line in comparison_lines(result, drift):
            click.echo(line)
    if not result.passed:
        raise JobError("engine and reference disagree beyond tolerance")
