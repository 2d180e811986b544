"""`pkv-export validate`: NIAH / LongBench / RULER runs of an engine against the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import click

from exporter.outputs import OUTPUT_KINDS, atomic_write_text, check_output, staging_dir
from pkv_cli.common import (
    PolicyCommand,
    check_positions,
    check_run_counts,
    check_text,
    emit_json,
    policy_from_options,
    policy_option_names,
    policy_options,
    progress_bar,
    refuse_with_engine,
)
from pkv_core.errors import JobError, UserInputError


def _engines(engine_dir: Path | None, model: str | None, policy, reference: str, reference_policy: str | None):
    """(engine, reference or None, description of both) for the run."""
    from engines.reference import ReferenceEngine, reference_for_manifest
    from engines.registry import open_engine
    from exporter.checkpoint import load_model
    from methods import POLICIES, make_policy, options_for

    if (engine_dir is None) == (model is None):
        raise UserInputError("give either --engine DIR or --model M (with policy options)")
    if engine_dir is not None:
        engine = open_engine(engine_dir)
        engine_policy = engine.policy
        loaded = None
        # The resolved path: a run resumed with the engine named differently (relative, absolute) is the same run.
        description = {"engine": f"{engine.name}:{Path(engine_dir).resolve()}", "manifest": engine.manifest}
    else:
        loaded = load_model(model)
        engine = ReferenceEngine(loaded, policy)
        engine_policy = policy
        description = {"engine": f"torch-reference:{loaded.source}:{policy.describe()}"}
    ref = None
    if reference == "torch":
        ref_policy = engine_policy
        if reference_policy:
            # the engine's settings where the reference policy has them (a method's own options: its defaults)
            known = reference_policy in POLICIES  # (an unknown name: make_policy says so)
            base = options_for(reference_policy, engine_policy.hyperparameters()) if known else {}
            ref_policy = make_policy(reference_policy, **base)
        if loaded is None:
            loaded = reference_for_manifest(engine.manifest)
        ref = ReferenceEngine(loaded, ref_policy)
        description["reference"] = f"torch-reference:{loaded.source}:{ref_policy.describe()}"
    else:
        description["reference"] = None
    return engine, ref, description


@click.command(cls=PolicyCommand)
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None, help="Engine directory.")
@click.option("--model", default=None, help="Validate the PyTorch reference of this model with the policy options.")
@policy_options
@click.option("--suite", type=click.Choice(["niah", "longbench", "ruler"]), default=None, help="Benchmark to run.")
@click.option("--reference", type=click.Choice(["torch", "none"]), default="torch", show_default=True,
              help="Also run the PyTorch reference on every sample and compare.")
@click.option("--reference-policy", default=None,
              help="Policy of the reference [the engine's own]; e.g. 'full' to measure the accuracy cost.")
@click.option("--limit", type=int, default=None,
              help="At most N samples (per dataset for LongBench; RULER: N per task and length, default 10).")
@click.option("--shard", default=None, help="I/N: run the I-th of N interleaved shards (0-based).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out, skipping finished samples.")
@click.option("--force", is_flag=True, help="Discard an existing run in --out and start over.")
@click.option("--min-agreement", type=float, default=None,
              help="Exit 1 when the token agreement rate with the reference falls below this (0..1).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--merge", "merge_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Combine finished shard run directories into one report in --out (repeatable).")
@click.option("--lengths", default=None,
              help="NIAH / RULER context lengths, e.g. 1000,2000 [sized for the engine]; a RULER length holds the "
                   "prompt and the answer.")
@click.option("--depths", default=None, help="NIAH needle depths in percent [0,25,50,75,100].")
@click.option("--haystack", type=click.Path(path_type=Path), default=None,
              help="NIAH / RULER: directory of .txt files [offline generated text].")
@click.option("--needle", default=None, help="NIAH needle sentence (with --question and --answer).")
@click.option("--question", default=None, help="NIAH question about the needle (with --needle).")
@click.option("--answer", default=None, help="NIAH expected answer, scored by word recall (with --needle).")
@click.option("--max-new-tokens", type=int, default=None,
              help="NIAH answer length [the answer's tokens + 16, at least 32]; RULER: every task's [each task's "
                   "own: 128 NIAH, 30 vt, 120 cwe, 50 fwe].")
@click.option("--tasks", default=None,
              help="RULER tasks, comma-separated [niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe].")
@click.option("--seed", type=int, default=None, help="RULER: seed of the generated samples [42, RULER's].")
@click.option("--multi-query", is_flag=True,
              help="Ask each question twice: re-compressed with the question, and from its context compressed once. "
                   "NIAH: one context per length with a needle at every depth; LongBench: samples sharing a context "
                   "are grouped.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="LongBench: directory of JSONL files.")
@click.option("--hub", is_flag=True, help="LongBench: load through the `datasets` library from the hub.")
@click.option("--datasets", default=None, help="LongBench datasets, comma-separated [every file in --data].")
@click.option("--config-dir", type=click.Path(path_type=Path), default=None,
              help="LongBench dataset2prompt.json / dataset2maxlen.json [the shipped official ones].")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Use the model's chat template.")
@click.option("--skip-bad", is_flag=True, help="Count and skip malformed data lines instead of stopping.")
@click.option("--inspect-failures", is_flag=True,
              help="NIAH: for every sample scoring below the reference (below 1 without one), an inspect page with the "
                   "needle marked in OUT/inspect/<sample>/, linked from report.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def validate(engine_dir, model, suite, reference, reference_policy, limit, shard, resume, force, min_agreement, out,
             merge_dirs, lengths, depths, haystack, needle, question, answer, max_new_tokens, tasks, seed, multi_query,
             data, hub, datasets, config_dir, chat, skip_bad, inspect_failures, as_json, **kwargs) -> None:
    """Validate an engine on Needle-in-a-Haystack, LongBench or RULER against the PyTorch reference.

    Every finished sample is appended to OUT/samples.jsonl; OUT/summary.json, OUT/report.md (and for NIAH
    OUT/niah_heatmap.png) summarise per dataset / cell / RULER task and length: engine score, reference score,
    delta, agreement. With --inspect-failures, OUT/inspect/<sample>/index.html shows what the cache kept of each
    missed needle.
    """
    from validate.niah import parse_grid_list
    from validate.report import markdown
    from validate.suites import LongBenchSuite, NiahSuite, RulerSuite, check_suite_options, parse_shard
    from validate.suites import shard as take_shard

    if engine_dir is not None:  # the engine's method was fixed when it was built: its options are not ignored
        refuse_with_engine(click.get_current_context(), policy_option_names())
    policy = policy_from_options(kwargs)
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise UserInputError("--min-agreement must be in [0, 1]")
    if resume and force:
        raise UserInputError("--resume continues a run, --force replaces it: give one of them")
    for text, where in ((needle, "--needle"), (question, "--question"), (answer, "--answer")):
        if text is not None:
            check_text(text, where)
    if merge_dirs:
        summary = _merge(merge_dirs, out, force)
        _finish(summary, as_json, min_agreement, markdown)
        return
    if suite is None:
        raise UserInputError("--suite niah|longbench|ruler is required (or --merge DIR...)")
    if inspect_failures:
        from validate.failures import check_suite

        check_suite(suite, multi_query)
    check_run_counts(limit, max_new_tokens)
    index, count = parse_shard(shard)
    # Every input is checked (and the engine opened and verified) before anything under --out is touched.
    inputs = [engine_dir, data, haystack, config_dir, model if model and Path(model).exists() else None]
    _check_run_output(out, force, resume, inputs)
    check_suite_options(suite, tasks=tasks, seed=seed, depths=depths, needle=needle, question=question,
                        answer=answer, multi_query=multi_query)
    if suite == "ruler":
        from validate.ruler import parse_tasks

        spec = RulerSuite(parse_grid_list(lengths, int) if lengths else None, parse_tasks(tasks), haystack,
                          max_new_tokens, chat, 42 if seed is None else seed)
    elif suite == "niah":
        spec = NiahSuite(parse_grid_list(lengths, int) if lengths else None,
                         parse_grid_list(depths, float) if depths else None, haystack, needle, question, answer,
                         max_new_tokens, chat, multi_query=multi_query)
    else:
        spec = LongBenchSuite(data, hub, datasets.split(",") if datasets else None, config_dir, chat,
                              multi_query=multi_query)
    engine, ref, description = _engines(engine_dir, model, policy, reference, reference_policy)
    samples, bad = spec.samples(engine.tokenizer, engine.max_input_len, limit, skip_bad)
    if not samples:
        raise UserInputError(f"no samples to run ({len(bad)} bad lines skipped)" if bad else
                             "no samples to run: the data holds no rows for the chosen datasets")
    samples = take_shard(samples, index, count)
    if not samples:
        raise UserInputError(f"shard {index}/{count} holds no samples (there are fewer samples than shards)")
    check_positions(samples, engine.spec.max_position_embeddings)  # before anything under --out is written
    run = {**description, "shard": f"{index}/{count}", "skipped_bad": bad,
           "config": {"suite": suite, "limit": limit, "lengths": lengths, "depths": depths, "datasets": datasets,
                      "chat": chat, "max_new_tokens": max_new_tokens, "multi_query": multi_query,
                      "reference": reference, "reference_policy": reference_policy}}
    if suite == "ruler":  # (only here: the runs of other suites keep the identity they had)
        run["config"].update(tasks=spec.tasks, seed=spec.seed)
    for line in bad:
        click.echo(f"skipped bad data: {line}", err=True)
    if force and out.exists():
        # The old run stays until the new one is complete; an interrupted forced run leaves the old one intact.
        with staging_dir(out, "validation-run", force, inputs) as tmp:
            summary = _run(tmp, samples, spec, engine, ref, run, suite, index, count, False, inspect_failures)
    else:
        summary = _run(out, samples, spec, engine, ref, run, suite, index, count, resume, inspect_failures)
    _finish(summary, as_json, min_agreement, markdown)


IDENTITY = ("engine", "reference", "shard", "config")


def _check_run_output(out: Path, force: bool, resume: bool, inputs) -> None:
    """A run goes into a new or empty directory, continues the run there (--resume), or replaces it (--force)."""
    from exporter.outputs import check_output

    if out.exists() and out.is_dir() and not out.is_symlink() and not force:
        holds_run = OUTPUT_KINDS["validation-run"][1](out)
        if holds_run and not resume:
            raise UserInputError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
        if not holds_run and any(out.iterdir()):
            raise UserInputError(f"{out} is not empty and holds no validation run; choose a new or empty --out")
        check_output(out, "validation-run", True, inputs)  # inputs only: nothing is replaced here
        return
    check_output(out, "validation-run", force, inputs)


def _run(out: Path, samples, spec, engine, ref, run: dict, suite: str, index: int, count: int, resume: bool,
         inspect_failures: bool = False) -> dict:
    from validate.failures import FailurePages
    from validate.inspection import engine_model
    from validate.report import write_report
    from validate.runner import SAMPLES_FILE, read_records, record_ids, run_samples

    pages = FailurePages(out, engine, engine_model(engine), run["engine"]) if inspect_failures else None
    out.mkdir(parents=True, exist_ok=True)
    samples_file, run_file = out / SAMPLES_FILE, out / "run.json"
    identity = {k: run[k] for k in IDENTITY}
    if resume and run_file.exists():
        before = _read_json(run_file)
        if {k: before.get(k) for k in IDENTITY} != identity:
            raise UserInputError(f"{out} holds a different run (engine, suite, shard or options differ); use --force")
    atomic_write_text(run_file, json.dumps(run, indent=2, ensure_ascii=False))
    done = {r["id"] for r in read_records(samples_file, repair=True)}
    wanted = {rid for s in samples for rid in record_ids(s)}
    finished = sum(all(r in done for r in record_ids(s)) for s in samples)  # a resumed bar starts where it stopped
    bar, update = progress_bar(f"{suite} {index}/{count}", len(samples), lines=True)
    with bar:
        update(finished, len(samples))
        run_samples(samples, spec, engine, ref, samples_file, done,
                    progress=lambda k, n: update(finished + k, len(samples)), on_result=pages,
                    generate_options=pages.generate_options if pages else None)
    records = [r for r in read_records(samples_file) if r["id"] in wanted]
    if pages is not None:  # a resumed run: pages for the failures of its earlier part
        pages.fill_missing(samples, records)
    return write_report(out, records, suite, run)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: not a run description")
    return data


def _merge(dirs: tuple[Path, ...], out: Path, force: bool) -> dict:
    import shutil

    from validate.failures import INSPECT_DIR
    from validate.report import write_report
    from validate.runner import SAMPLES_FILE, read_records

    check_output(out, "validation-run", force, dirs)
    records, seen, runs = [], set(), []
    for d in dirs:
        if not (d / SAMPLES_FILE).is_file() or not (d / "run.json").is_file():
            raise UserInputError(f"{d}: not a validation run directory (no {SAMPLES_FILE} / run.json)")
        runs.append(_read_json(d / "run.json"))
        for r in read_records(d / SAMPLES_FILE):
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    first = runs[0]
    for r in runs[1:]:
        if (r.get("engine"), r.get("reference"), r.get("config")) != (first.get("engine"), first.get("reference"),
                                                                      first.get("config")):
            raise UserInputError("the runs to merge differ in engine, reference or options")
    skipped = list(dict.fromkeys(line for r in runs for line in r.get("skipped_bad", [])))
    run = {**{k: v for k, v in first.items() if k not in ("shard", "skipped_bad")}, "shard": "merged",
           "merged_from": [str(d) for d in dirs], "skipped_bad": skipped}
    with staging_dir(out, "validation-run", force, dirs) as tmp:
        for d in dirs:  # the shards' inspect pages (validate --inspect-failures), so the merged report links them
            if (d / INSPECT_DIR).is_dir():
                shutil.copytree(d / INSPECT_DIR, tmp / INSPECT_DIR, dirs_exist_ok=True)
        with (tmp / SAMPLES_FILE).open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / "run.json", json.dumps(run, indent=2, ensure_ascii=False))
        summary = write_report(tmp, records, first["config"]["suite"], run)
    return summary


def _finish(summary: dict, as_json: bool, min_agreement: float | None, markdown) -> None:
    if as_json:
        emit_json(summary)
    else:
        click.echo(markdown(summary), nl=False)
    rate = summary["overall"].get("agreement_rate")
    if min_agreement is not None:
        if rate is None:
            raise UserInputError("--min-agreement needs a reference (--reference torch) and at least one sample")
        if rate < min_agreement:
            raise JobError(f"token agreement {rate} is below --min-agreement {min_agreement}")
