"""`pkv-export sweep`: accuracy against KV cache size for several policies and budgets, on the same samples."""

from __future__ import annotations

from pathlib import Path

import click

from methods import POLICIES
from pkv_cli.common import (
    check_positions,
    check_run_counts,
    emit_json,
    model_option,
    progress_bar,
    weights_from_options,
)
from pkv_core.errors import UserInputError

# The methods whose cells share a sweep's prefill with the other methods' (KVPolicy.shares_prefill, with their defaults)
SHARING = [name for name, cls in POLICIES.items() if cls().shares_prefill]
# The methods whose cells share a prefill across their budgets only (a group of their own: KVzip)
ACROSS_BUDGETS = [name for name, cls in POLICIES.items() if cls().prefill_group not in (None, "observation")]


@click.command()
@model_option
@click.option("--policies", default="full,streamingllm,h2o,snapkv,pyramidkv", show_default=True,
              help="Comma-separated policies; each runs at every budget (full once).")
@click.option("--budgets", default="64,128,256,512", show_default=True,
              help="Comma-separated KV budgets C (average per-layer cache length, window included).")
@click.option("--window", type=int, default=32, show_default=True, help="Observation window w of every policy.")
@click.option("--suite", type=click.Choice(["niah", "longbench", "ruler"]), required=True, help="Benchmark to run.")
@click.option("--engine-backend", type=click.Choice(["onnx", "reference"]), default="onnx", show_default=True,
              help="What runs the cells: the ONNX engine (built per cell, or one for the cells sharing a prefill; "
                   "cached in OUT/engines) or the PyTorch reference.")
@click.option("--shared-prefill/--no-shared-prefill", default=True, show_default=True,
              help=f"Prefill each sample once for all the cells of {', '.join(SHARING)} (they select after the full "
                   f"prefill), and once for all the budgets of {', '.join(ACROSS_BUDGETS)} (its scoring pass does not "
                   "depend on the budget): each cell only selects and decodes; the same results as running each cell "
                   "on its own, which --no-shared-prefill does.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Engine / reference dtype (also the dtype of the KV bytes reported).")
@click.option("--weights", "weight_format", type=click.Choice(["fp", "int8", "int4"]), default="fp", show_default=True,
              help="Run every cell on the decoder's linear layers quantized and dequantized exactly as `build "
                   "--weights int8|int4` (symmetric, --block-size) stores them: the accuracy of such engines.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="--weights int8/int4: input rows sharing one scale [32].")
@click.option("--max-input-len", type=int, default=None,
              help="Longest prompt of the engines and of NIAH's default grid [the model's maximum].")
@click.option("--limit", type=int, default=None,
              help="At most N samples (per dataset for LongBench; RULER: N per task and length, default 10).")
@click.option("--lengths", default=None,
              help="NIAH / RULER context lengths, e.g. 512,1024 [sized for --max-input-len].")
@click.option("--depths", default=None, help="NIAH needle depths in percent [0,25,50,75,100].")
@click.option("--max-new-tokens", type=int, default=None,
              help="NIAH answer length [the answer's tokens + 16, at least 32]; RULER: every task's [each task's "
                   "own].")
@click.option("--tasks", default=None,
              help="RULER tasks, comma-separated [niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe].")
@click.option("--seed", type=int, default=None, help="RULER: seed of the generated samples [42, RULER's].")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="LongBench: directory of JSONL files.")
@click.option("--datasets", default=None, help="LongBench datasets, comma-separated [every file in --data].")
@click.option("--config-dir", type=click.Path(path_type=Path), default=None,
              help="LongBench prompt/length config directory [the official ones, embedded].")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Use the model's chat template.")
@click.option("--skip-bad", is_flag=True, help="Count and skip malformed data lines instead of stopping.")
@click.option("--inspect-failures", is_flag=True,
              help="NIAH: an inspect page (needle marked) for every sample a cell scores below 1, under "
                   "OUT/cells/<cell>/inspect/, linked per cell from report.md.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Sweep directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep in --out (finished samples are kept).")
@click.option("--force", is_flag=True, help="Replace an existing sweep in --out once the new one is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json.")
def sweep(model, policies, budgets, window, suite, engine_backend, shared_prefill, dtype, weight_format, block_size,
          max_input_len, limit, lengths, depths, max_new_tokens, tasks, seed, data, datasets, config_dir, chat,
          skip_bad, inspect_failures, out, resume, force, as_json) -> None:
    """Validate every (policy, budget) cell on the same samples; report score against KV bytes.

    OUT/sweep.json and OUT/report.md give the score per cell (per LongBench category, NIAH context length or RULER
    task),
    the KV bytes each cell held (checked against `plan`) and its ratio and score delta to FullKV; OUT/*.png plot
    them. Every cell is a resumable validation run under OUT/cells. The cells of the methods that select after the
    full prefill share one prefill per sample, and so do KVzip's budgets (--no-shared-prefill: every cell runs
    alone); a sweep interrupted in one mode may be resumed in the other.
    """
    from exporter.checkpoint import load_model
    from exporter.outputs import check_output, staging_dir
    from validate.niah import parse_grid_list
    from validate.suites import LongBenchSuite, NiahSuite, RulerSuite, check_suite_options
    from validate.sweep import CONFIG_FILE, parse_cells

    if resume and force:
        raise UserInputError("--resume continues a sweep, --force replaces it: give one of them")
    check_run_counts(limit, max_new_tokens)
    check_suite_options(suite, tasks=tasks, seed=seed, depths=depths)
    if inspect_failures:
        from validate.failures import check_suite

        check_suite(suite, False)
    cells = parse_cells(policies, budgets, window)
    quant = weights_from_options(weight_format, block_size, True, None)
    inputs = [data, config_dir, model if Path(model).exists() else None]
    if out.exists() and resume:
        if not (out / CONFIG_FILE).is_file():
            raise UserInputError(f"{out} holds no sweep to resume")
        check_output(out, "sweep", True, inputs)
    else:
        check_output(out, "sweep", force, inputs)
    loaded = load_model(model)
    if quant is not None:
        import dataclasses

        import torch

        from exporter.quantize import DequantizedWeights

        engine_dtype = torch.float16 if dtype == "fp16" else torch.float32
        loaded = dataclasses.replace(loaded, weights=DequantizedWeights(loaded.weights, quant, engine_dtype),
                                     source=f"{loaded.source} ({weight_format} weights, block {quant.block_size})")
    spec = loaded.spec
    if max_input_len is None:  # 0 is a mistake to report, not a request for the default
        max_input_len = spec.max_position_embeddings
    if not 1 <= max_input_len <= spec.max_position_embeddings:
        raise UserInputError(f"--max-input-len must be in [1, {spec.max_position_embeddings}] (got {max_input_len})")
    if suite == "ruler":
        from validate.ruler import parse_tasks

        suite_spec = RulerSuite(parse_grid_list(lengths, int) if lengths else None, parse_tasks(tasks), None,
                                max_new_tokens, chat, 42 if seed is None else seed)
    elif suite == "niah":
        suite_spec = NiahSuite(parse_grid_list(lengths, int) if lengths else None,
                               parse_grid_list(depths, float) if depths else None, None, None, None, None,
                               max_new_tokens, chat)
    else:
        suite_spec = LongBenchSuite(data, False, datasets.split(",") if datasets else None, config_dir, chat)
    samples, bad = suite_spec.samples(loaded.tokenizer(), max_input_len, limit, skip_bad,
                                      max_positions=spec.max_position_embeddings)
    if not samples:
        raise UserInputError("no samples to run")
    check_positions(samples, spec.max_position_embeddings)  # before anything under --out is written
    for line in bad:
        click.echo(f"skipped bad data: {line}", err=True)
    config = {"model": loaded.source, "suite": suite, "engine_backend": engine_backend, "dtype": dtype,
              **({"weights": quant.record()} if quant is not None else {}),
              "window": window, "policies": policies, "budgets": budgets, "max_input_len": max_input_len,
              "samples": len(samples), "sample_ids_head": [s.id for s in samples[:3]],
              "options": {"limit": limit, "lengths": lengths, "depths": depths, "max_new_tokens": max_new_tokens,
                          "datasets": datasets, "chat": chat}}
    if suite == "ruler":  # (only here: the sweeps of other suites keep the settings they had)
        config["options"].update(tasks=suite_spec.tasks, seed=suite_spec.seed)
    args = (cells, loaded, suite_spec, samples, config, engine_backend, dtype, max_input_len, inspect_failures,
            shared_prefill)
    if force and out.exists():
        with staging_dir(out, "sweep", force, inputs) as tmp:  # the old sweep stays until the new one is complete
            summary = _run(tmp, *args, resume=False)
    else:
        out.mkdir(parents=True, exist_ok=True)
        summary = _run(out, *args, resume=resume)
    if as_json:
        emit_json(summary)
    else:
        from validate.sweep_report import markdown

        click.echo(markdown(summary), nl=False)


def _run(out: Path, cells, loaded, suite_spec, samples, config, backend, dtype, max_input_len, inspect_failures,
         shared, resume) -> dict:
    from validate.sweep import cell_summary, check_config, failure_links, open_cell_engine, run_cell, write_sweep
    from validate.sweep_shared import sweep_steps

    check_config(out, config, resume)
    steps = sweep_steps(cells, shared)  # the rows stay in cell order
    rows: dict[str, dict] = {}
    for k, (group, step) in enumerate(steps):
        if group is not None:
            records = _run_shared(out, k, len(steps), step, loaded, suite_spec, samples, backend, dtype,
                                  max_input_len, inspect_failures)
        else:
            cell = step[0]
            bar, update = progress_bar(f"cell {k + 1}/{len(steps)} {cell.name}", len(samples), lines=True)
            engine = open_cell_engine(out, cell, loaded, backend, dtype, max_input_len)
            with bar:
                records = {cell.name: run_cell(
                    out, cell, engine, samples, suite_spec,
                    progress=lambda i, n, update=update: update(len(samples) - n + i, len(samples)),
                    inspect_failures=inspect_failures, model=loaded.source)}
            del engine
        for cell in step:
            rows[cell.name] = cell_summary(cell, records[cell.name], loaded.spec, dtype, suite_spec.name)
            links = failure_links(out, cell, records[cell.name])
            if links:
                rows[cell.name]["inspect_pages"] = links
        summary = write_sweep(out, config, [rows[c.name] for c in cells if c.name in rows], suite_spec.name,
                              complete=k == len(steps) - 1)
    return summary


def _run_shared(out: Path, k: int, n: int, cells, loaded, suite_spec, samples, backend, dtype, max_input_len,
                inspect_failures) -> dict[str, list[dict]]:
    """Step k of n: the cells that share one prefill per sample (validate.sweep_shared)."""
    from validate.sweep_shared import open_shared_runner, run_shared_cells

    label = f"step {k + 1}/{n}: {len(cells)} cells, one prefill per sample"
    bar, update = progress_bar(label, len(samples), lines=True)
    runner = open_shared_runner(out, cells, loaded, backend, dtype, max_input_len)
    with bar:
        records = run_shared_cells(out, cells, runner, samples, suite_spec,
                                   progress=lambda i, m: update(len(samples) - m + i, len(samples)),
                                   inspect_failures=inspect_failures, model=loaded.source)
    del runner
    return records
