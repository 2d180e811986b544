"""Summaries of a validation run: per group (LongBench dataset / NIAH cell / RULER task and length), per RULER
task and overall, as JSON and Markdown, plus the NIAH heatmaps. Written atomically, from the JSONL records alone
(so shards merge by concatenation)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from exporter.outputs import atomic_write_text
from validate.ruler import TASKS, parse_group, task_rows


def _score(values: list[float], suite: str) -> float:
    # LongBench and RULER report mean x100 with two decimals (their official tables); NIAH keeps 0..1 recall.
    return round(100 * mean(values), 2) if suite in ("longbench", "ruler") else round(mean(values), 4)


def summarize(records: list[dict[str, Any]], suite: str, run: dict[str, Any]) -> dict[str, Any]:
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_group[r["group"]].append(r)
    has_ref = any("reference_score" in r for r in records)
    has_reuse = any("engine_reuse_score" in r for r in records)  # multi-query: the compress-once answers too
    groups = []
    for name in sorted(by_group, key=_group_key):
        rows = by_group[name]
        g: dict[str, Any] = {"group": name, "n": len(rows),
                             "engine_score": _score([r["engine_score"] for r in rows], suite)}
        if suite == "niah":
            g["context_len"], g["depth_percent"] = rows[0].get("context_len"), rows[0].get("depth_percent")
        elif suite == "ruler" and parse_group(name):
            g["task"], g["context_len"] = parse_group(name)
        if has_reuse:
            g["engine_reuse_score"] = _score([r["engine_reuse_score"] for r in rows], suite)
        if has_ref:
            g["reference_score"] = _score([r["reference_score"] for r in rows], suite)
            if has_reuse:
                g["reference_reuse_score"] = _score([r["reference_reuse_score"] for r in rows], suite)
                g["reuse_agreement_rate"] = round(mean(1.0 if r["reuse_tokens_agree"] else 0.0 for r in rows), 4)
            g["delta"] = round(g["engine_score"] - g["reference_score"], 4)
            g["agreement_rate"] = round(mean(1.0 if r["tokens_agree"] else 0.0 for r in rows), 4)
            layers = [mean(x for x in r["index_agreement_per_layer"] if x is not None) for r in rows
                      if r.get("index_agreement_per_layer") and None not in r["index_agreement_per_layer"]]
            g["index_agreement"] = round(mean(layers), 4) if layers else None
        groups.append(g)
    overall: dict[str, Any] = {"n": len(records)}
    if groups:
        overall["engine_score"] = round(mean(g["engine_score"] for g in groups), 4)
        for key in ("engine_reuse_score", "reference_reuse_score", "reuse_agreement_rate"):
            if key in groups[0]:
                overall[key] = round(mean(g[key] for g in groups), 4)
        if has_ref:
            overall["reference_score"] = round(mean(g["reference_score"] for g in groups), 4)
            overall["delta"] = round(overall["engine_score"] - overall["reference_score"], 4)
            overall["agreement_rate"] = round(mean(1.0 if r["tokens_agree"] else 0.0 for r in records), 4)
            idx = [g["index_agreement"] for g in groups if g.get("index_agreement") is not None]
            overall["index_agreement"] = round(mean(idx), 4) if idx else None
    timing = {"engine_seconds": round(sum(r["engine_seconds"] for r in records), 3)}
    if has_ref:
        timing["reference_seconds"] = round(sum(r.get("reference_seconds", 0.0) for r in records), 3)
    tasks = {"tasks": task_rows(groups)} if suite == "ruler" else {}
    return {"suite": suite, **run, "overall": overall, **tasks, "groups": groups, "timing": timing}


def _group_key(name: str):
    if name.startswith("L") and "-D" in name:
        length, depth = name[1:].split("-D")
        try:
            return (0, int(length), float(depth), "")
        except ValueError:
            pass
    if parse_group(name):  # RULER: its tasks in their order, then lengths
        task, length = parse_group(name)
        return (1, list(TASKS).index(task), float(length), name)
    return (2, 0, 0.0, name)


def markdown(summary: dict[str, Any]) -> str:
    o = summary["overall"]
    has_ref = "reference_score" in o
    lines = [f"# Validation report: {summary['suite']}", "",
             f"- engine: {summary.get('engine')}", f"- reference: {summary.get('reference') or 'none'}",
             f"- samples: {o['n']}"]
    if summary.get("skipped_bad"):
        lines.append(f"- bad data lines skipped: {len(summary['skipped_bad'])}")
    if o.get("engine_score") is not None:
        line = f"- overall engine score: {o['engine_score']}"
        if has_ref:
            line += (f", reference score: {o['reference_score']}, delta: {o['delta']}, token agreement: "
                     f"{o['agreement_rate']}, kept-index agreement: {o.get('index_agreement')}")
        lines.append(line)
    t = summary["timing"]
    ref_time = f", reference {t['reference_seconds']} s" if has_ref else ""
    lines += [f"- time: engine {t['engine_seconds']} s{ref_time}", ""]
    cols = ["group", "n", "engine_score"] + (["reference_score", "delta", "agreement_rate", "index_agreement"]
                                            if has_ref else [])
    reuse = [c for c in ("engine_reuse_score", "reference_reuse_score", "reuse_agreement_rate") if c in o]
    if reuse:  # multi-query: the same questions answered from one compressed context
        cols += reuse
        lines.insert(-1, f"- multi-query: engine score with the context compressed once: {o['engine_reuse_score']}"
                         f" (re-compressed with each question: {o['engine_score']})")
    if summary.get("tasks"):  # RULER: each task over its lengths, then each (task, length) below
        task_cols = [c for c in ("task", "n", "lengths", "engine_score", "reference_score", "delta")
                     if c in summary["tasks"][0]]
        lines += ["| " + " | ".join(task_cols) + " |", "|" + "---|" * len(task_cols)]
        lines += ["| " + " | ".join(str(t.get(c)) for c in task_cols) + " |" for t in summary["tasks"]] + [""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for g in summary["groups"]:
        lines.append("| " + " | ".join(str(g.get(c)) for c in cols) + " |")
    if summary["suite"] == "niah":
        lines += ["", "![NIAH heatmap](niah_heatmap.png)"]
    if summary.get("inspect_pages"):
        lines += ["", "## Failed samples: what the cache kept", "",
                  "Each page shows which layers and heads kept or dropped the needle (`--inspect-failures`).", ""]
        for p in summary["inspect_pages"]:
            ref = "" if p["reference_score"] is None else f", reference {p['reference_score']}"
            lines.append(f"- [{p['id']}]({p['page']}): engine {p['engine_score']}{ref}")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, records: list[dict[str, Any]], suite: str, run: dict[str, Any]) -> dict[str, Any]:
    from validate.failures import pages

    summary = summarize(records, suite, run)
    failed_pages = pages(out_dir, records)
    if failed_pages:
        summary["inspect_pages"] = failed_pages
    if suite == "niah" and records:
        from validate.plots import niah_heatmaps

        cells = [{"context_len": g["context_len"], "depth_percent": g["depth_percent"],
                  "engine_score": g["engine_score"], "reference_score": g.get("reference_score"),
                  "engine_reuse_score": g.get("engine_reuse_score")}
                 for g in summary["groups"]]
        niah_heatmaps(cells, out_dir / "niah_heatmap.png", "NIAH answer recall by context length and needle depth")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "report.md", markdown(summary))
    return summary
