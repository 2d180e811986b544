"""`pkv-export sweep`: accuracy against KV cache size for several policies and budgets, on the same samples."""

from __future__ import annotations

from pathlib import Path

import click

from pkv_cli.common import check_run_counts, emit_json, model_option, progress_bar
from pkv_core.errors import UserInputError


@click.command()
@model_option
@click.option("--policies", default="full,streamingllm,h2o,snapkv,pyramidkv", show_default=True,
              help="Comma-separated policies; each runs at every budget (full once).")
@click.option("--budgets", default="64,128,256,512", show_default=True,
              help="Comma-separated KV budgets C (average per-layer cache length, window included).")
@click.option("--window", type=int, default=8, show_default=True, help="Observation window w of every policy.")
@click.option("--suite", type=click.Choice(["niah", "longbench"]), required=True, help="Benchmark to run.")
@click.option("--engine-backend", type=click.Choice(["onnx", "reference"]), default="onnx", show_default=True,
              help="What runs the cells: the ONNX engine (built per cell, cached in OUT/engines) or the PyTorch "
                   "reference.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Engine / reference dtype (also the dtype of the KV bytes reported).")
@click.option("--max-input-len", type=int, default=None,
              help="Longest prompt of the engines and of NIAH's default grid [the model's maximum].")
@click.option("--limit", type=int, default=None, help="At most N samples (per dataset for LongBench).")
@click.option("--lengths", default=None, help="NIAH context lengths, e.g. 512,1024 [sized for --max-input-len].")
@click.option("--depths", default=None, help="NIAH needle depths in percent [0,25,50,75,100].")
@click.option("--max-new-tokens", type=int, default=None,
              help="NIAH answer length [the answer's tokens + 16, at least 32].")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="LongBench: directory of JSONL files.")
@click.option("--datasets", default=None, help="LongBench datasets, comma-separated [every file in --data].")
@click.option("--config-dir", type=click.Path(path_type=Path), default=None,
              help="LongBench prompt/length config directory [the official ones, embedded].")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Use the model's chat template.")
@click.option("--skip-bad", is_flag=True, help="Count and skip malformed data lines instead of stopping.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Sweep directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep in --out (finished samples are kept).")
@click.option("--force", is_flag=True, help="Replace an existing sweep in --out once the new one is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json.")
def sweep(model, policies, budgets, window, suite, engine_backend, dtype, max_input_len, limit, lengths, depths,
          max_new_tokens, data, datasets, config_dir, chat, skip_bad, out, resume, force, as_json) -> None:
    """Validate every (policy, budget) cell on the same samples; report score against KV bytes.

    OUT/sweep.json and OUT/report.md give the score per cell (per LongBench category, per NIAH context length),
    the KV bytes each cell held (checked against `plan`) and its ratio and score delta to FullKV; OUT/*.png plot
    them. Every cell is a resumable validation run under OUT/cells.
    """
    from exporter.checkpoint import load_model
    from exporter.outputs import check_output, staging_dir
    from validate.niah import parse_grid_list
    from validate.suites import LongBenchSuite, NiahSuite
    from validate.sweep import CONFIG_FILE, parse_cells

    if resume and force:
        raise UserInputError("--resume continues a sweep, --force replaces it: give one of them")
    check_run_counts(limit, max_new_tokens)
    cells = parse_cells(policies, budgets, window)
    inputs = [data, config_dir]
    if out.exists() and resume:
        if not (out / CONFIG_FILE).is_file():
            raise UserInputError(f"{out} holds no sweep to resume")
        check_output(out, "sweep", True, inputs)
    else:
        check_output(out, "sweep", force, inputs)
    loaded = load_model(model)
    spec = loaded.spec
    if max_input_len is None:  # 0 is a mistake to report, not a request for the default
        max_input_len = spec.max_position_embeddings
    if not 1 <= max_input_len <= spec.max_position_embeddings:
        raise UserInputError(f"--max-input-len must be in [1, {spec.max_position_embeddings}] (got {max_input_len})")
    if suite == "niah":
        suite_spec = NiahSuite(parse_grid_list(lengths, int) if lengths else None,
                               parse_grid_list(depths, float) if depths else None, None, None, None, None,
                               max_new_tokens, chat)
    else:
        suite_spec = LongBenchSuite(data, False, datasets.split(",") if datasets else None, config_dir, chat)
    samples, bad = suite_spec.samples(loaded.tokenizer(), max_input_len, limit, skip_bad)
    if not samples:
        raise UserInputError("no samples to run")
    for line in bad:
        click.echo(f"skipped bad data: {line}", err=True)
    config = {"model": loaded.source, "suite": suite, "engine_backend": engine_backend, "dtype": dtype,
              "window": window, "policies": policies, "budgets": budgets, "max_input_len": max_input_len,
              "samples": len(samples), "sample_ids_head": [s.id for s in samples[:3]],
              "options": {"limit": limit, "lengths": lengths, "depths": depths, "max_new_tokens": max_new_tokens,
                          "datasets": datasets, "chat": chat}}
    args = (cells, loaded, suite_spec, samples, config, engine_backend, dtype, max_input_len)
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


def _run(out: Path, cells, loaded, suite_spec, samples, config, backend, dtype, max_input_len, resume) -> dict:
    from validate.sweep import cell_summary, check_config, open_cell_engine, run_cell, write_sweep

    check_config(out, config, resume)
    rows = []
    for k, cell in enumerate(cells):
        bar, update = progress_bar(f"cell {k + 1}/{len(cells)} {cell.name}", len(samples), lines=True)
        engine = open_cell_engine(out, cell, loaded, backend, dtype, max_input_len)
        with bar:
            records = run_cell(out, cell, engine, samples, suite_spec,
                               progress=lambda i, n, update=update: update(len(samples) - n + i, len(samples)))
        del engine
        rows.append(cell_summary(cell, records, loaded.spec, dtype, suite_spec.name))
        summary = write_sweep(out, config, rows, suite_spec.name, complete=k == len(cells) - 1)
    return summary
