"""`pkv-export inspect`: what the compressed cache keeps for one prompt, as a page, a PNG and JSON."""

from __future__ import annotations

from pathlib import Path

import click

from pkv_cli.common import (
    PolicyCommand,
    check_text,
    emit_json,
    policy_from_options,
    policy_options,
    progress_bar,
    read_prompts,
)
from pkv_core.errors import UserInputError


def _policy_given(ctx: click.Context, kwargs: dict) -> list[str]:
    """The policy options given on the command line (an engine's policy is the one it was built with)."""
    from methods import POLICIES
    from methods.options import cli_options, flag

    given = [flag(o.name) for o in cli_options(POLICIES) if kwargs.get(o.name) is not None]
    if ctx.get_parameter_source("policy") not in (click.core.ParameterSource.DEFAULT, None):
        given.insert(0, "--policy")
    return given


@click.command(cls=PolicyCommand)
@click.option("--model", default=None,
              help="Run the PyTorch reference of this model (preset, checkpoint directory or cached hub id) with the "
                   "policy options.")
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="Run a built engine directory instead (its policy is the one it was built with).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="With --engine: onnxruntime execution provider.")
@policy_options
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", default=None, help="Read the prompt from a file ('-' for stdin).")
@click.option("--mark", default=None,
              help="Text of the prompt to outline (e.g. a needle): the page says which layers and heads keep it.")
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Wrap the prompt in the model's chat template as a user turn.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens of the greedy answer shown on the page (the kept sets are the prefill's).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="With --model: the reference's weights and cache dtype.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the page, PNG and JSON.")
@click.option("--force", is_flag=True, help="Replace an existing inspect directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_context
def inspect(ctx, model, engine_dir, device, prompt, prompt_file, mark, chat, max_new_tokens, dtype, out, force,
            as_json, **kwargs) -> None:
    """Show what the cache keeps for one prompt: OUT/index.html (one self-contained page: per-layer budgets, a
    layer x position map, the prompt shaded by how many (layer, head) pairs keep each token, the --mark span and the
    heads that keep or drop it), OUT/kept.png (the map) and OUT/kept.json (kept positions per layer and head, and
    the scores of the reference's selection where the method has them).

    Runs the prefill and the method's selection once, on the PyTorch reference (--model) or a built engine
    (--engine), and shows exactly the kept indices the engine reports."""
    from engines.chat import chat_prompt_ids, require_chat_template
    from exporter.outputs import check_output, staging_dir
    from validate.inspection import check_engine, engine_model, run_inspect, write_inspect_dir

    given = _policy_given(ctx, kwargs)
    policy = policy_from_options(kwargs)
    if (model is None) == (engine_dir is None):
        raise UserInputError("give --model M (the PyTorch reference, with policy options) or --engine DIR")
    if engine_dir is not None and given:
        raise UserInputError(f"{', '.join(given)}: an engine's policy is fixed when it is built ({engine_dir})")
    if prompt is not None and prompt_file is not None:
        raise UserInputError("give --prompt TEXT or --prompt-file FILE, not both")
    text = read_prompts(() if prompt is None else (prompt,), prompt_file)[0]
    if mark is not None:
        check_text(mark, "--mark")
        if not mark:
            raise UserInputError("--mark must not be empty")
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    inputs = [engine_dir, None if prompt_file in (None, "-") else prompt_file]
    check_output(out, "inspect-page", force, inputs)
    if engine_dir is not None:
        from engines.registry import open_engine, runner_class
        from exporter.engine_dir import read_manifest

        manifest = read_manifest(engine_dir)
        check_engine(runner_class(engine_dir, manifest), str(engine_dir))  # before any weights load
        engine = open_engine(engine_dir, manifest=manifest, device=device)
        policy, source, name = engine.policy, engine_model(engine), f"{engine.name}:{engine_dir}"
    else:
        from engines.hf_model import torch_dtype
        from engines.reference import ReferenceEngine
        from exporter.checkpoint import load_model

        loaded = load_model(model)
        if chat:  # before the weights are read
            require_chat_template(loaded.tokenizer(), loaded.source)
        engine = ReferenceEngine(loaded, policy, torch_dtype(dtype))
        source, name = loaded.source, engine.name
    ids = chat_prompt_ids(engine.tokenizer, text, source) if chat else engine.tokenizer(text)["input_ids"]
    if not ids:
        raise UserInputError("empty prompt (it has no tokens)")
    bar, update = progress_bar("prefill + answer", max_new_tokens)
    with bar:
        data = run_inspect(engine, ids, policy, source, name, mark, max_new_tokens, progress=update)
    with staging_dir(out, "inspect-page", force, inputs) as tmp:
        write_inspect_dir(tmp, data)
    summary = _summary(data, out)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"{out / 'index.html'}: {data.policy} on {data.model}, {data.prompt_len} tokens, KV held "
               f"{100 * summary['kv_ratio']:.1f} % of FullKV's")
    if data.mark is not None:
        m = summary["mark"]
        click.echo(f"marked span ({m['tokens']} tokens): kept whole by {m['kept_whole']} of {m['pairs']} (layer, head) "
                   f"pairs, in part by {m['kept_in_part']}, dropped by {m['dropped']}")


def _summary(data, out: Path) -> dict:
    summary = {"page": str(out / "index.html"), "png": str(out / "kept.png"), "json": str(out / "kept.json"),
               "model": data.model, "engine": data.engine, "policy": data.policy, "prompt_tokens": data.prompt_len,
               "kv_bytes_held": data.kv_bytes_held, "kv_bytes_full": data.kv_bytes_full,
               "kv_ratio": round(data.kv_bytes_held / data.kv_bytes_full, 6), "answer": data.answer, "mark": None}
    if data.mark is not None:
        n = data.mark.token_end - data.mark.token_start
        per = [k for layer in data.mark_heads() for k in layer]
        whole, dropped = sum(k == n for k in per), sum(k == 0 for k in per)
        summary["mark"] = {"tokens": n, "pairs": len(per), "kept_whole": whole, "dropped": dropped,
                           "kept_in_part": len(per) - whole - dropped}
    return summary
