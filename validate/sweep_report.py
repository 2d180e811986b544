"""A sweep's report: tables (Markdown) and plots (score versus KV ratio; every cell's NIAH heatmap side by side)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from validate.plots import draw_heatmap, grid, new_figure, save_figure

RATIO_TICKS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _niah_cell(group: str) -> tuple[int, float]:
    length, depth = group[1:].split("-D")
    return int(length), float(depth)


def _by_length(row: dict) -> dict[int, float]:
    """NIAH: a cell's mean score per context length (over depths)."""
    sums: dict[int, list[float]] = {}
    for group, score in row["groups"].items():
        sums.setdefault(_niah_cell(group)[0], []).append(score)
    return {n: round(sum(v) / len(v), 4) for n, v in sorted(sums.items())}


def markdown(summary: dict[str, Any]) -> str:
    rows, suite = summary["cells"], summary["suite"]
    done = "" if summary["complete"] else " (incomplete: resume with --resume)"
    lines = [f"# Sweep: {summary['suite']} on {summary['model']}{done}", "",
             f"- cells run by: {summary['engine_backend']} ({summary['dtype']}), window {summary['window']}",
             f"- samples per cell: {summary.get('samples')}", ""]
    extra: list[str] = []
    if suite == "longbench":
        extra = sorted({c for r in rows for c in r.get("categories", {})})
    elif suite == "ruler":
        extra = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    elif rows:
        extra = [f"L{n}" for n in sorted({n for r in rows for n in _by_length(r)})]
    cols = ["cell", "score", "delta_to_full", "kv_ratio", "kv_bytes_held", "kv_matches_plan", "kv_span_over_held",
            *extra]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        per = _panels(r, suite) if suite != "niah" else {f"L{n}": v for n, v in _by_length(r).items()}
        values = [r["cell"], r["score"], r["delta_to_full"], r["kv_ratio"], r["kv_bytes_held"], r["kv_matches_plan"],
                  r.get("kv_span_over_held")]
        lines.append("| " + " | ".join(str(v) for v in values + [per.get(c) for c in extra]) + " |")
    lines += ["", "kv_ratio: K/V bytes the engine held after the prefill over FullKV's, over all samples; "
              "kv_matches_plan: equal to `pkv-export plan` for every sample (ChunkKV: at most); kv_span_over_held: "
              "bytes the cache layout spans (each layer as wide as its longest head) over the kept pairs' bytes "
              "(above 1 for KVzip's per-head lengths)."]
    failed = [r for r in rows if r.get("inspect_pages")]
    if failed:
        lines += ["", "## Failed samples: what each cell's cache kept", ""]
        for r in failed:
            links = ", ".join(f"[{p['id']}]({p['page']})" for p in r["inspect_pages"])
            lines.append(f"- `{r['cell']}` ({len(r['inspect_pages'])}): {links}")
    if summary.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in summary["plots"]]
    return "\n".join(lines) + "\n"


def _panels(row: dict, suite: str) -> dict[str, float]:
    """A cell's scores by LongBench category or RULER task (NIAH: none)."""
    return row.get({"longbench": "categories", "ruler": "tasks"}.get(suite, ""), {})


def plots(out: Path, summary: dict[str, Any], suite: str) -> list[str]:
    """Write the sweep's PNGs into `out`; return their names."""
    names = [_score_vs_kv(out / "score_vs_kv.png", summary, suite).name]
    if suite == "niah":
        names.append(_niah_cells(out / "niah_cells.png", summary).name)
    return names


def _score_vs_kv(path: Path, summary: dict, suite: str) -> Path:
    """One panel per LongBench category or RULER task (plus the overall score): score against KV ratio, a line per
    policy; the legend beside the panels, the ratio axis labelled in plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = summary["cells"]
    named = [c for r in rows for c in _panels(r, suite)]
    panels = ["overall"] + (sorted(set(named)) if suite == "longbench" else list(dict.fromkeys(named)))
    cols = min(len(panels), 4)
    fig = new_figure(4.2 * cols + 1.6, 3.6 * math.ceil(len(panels) / cols))
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    ratios = [r["kv_ratio"] for r in rows if r["kv_ratio"]]
    ticks = [t for t in RATIO_TICKS if min(ratios, default=1) / 1.5 <= t <= max(ratios, default=1) * 1.5]
    for ax, panel in zip(axes, panels, strict=False):
        for policy in policies:
            mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["kv_ratio"] or 0)
            ys = [r["score"] if panel == "overall" else _panels(r, suite).get(panel) for r in mine]
            xs = [r["kv_ratio"] for r in mine]
            if mine and mine[0].get("control") and ys and ys[0] is not None:  # FullKV: a level, not a curve
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=policy)
            elif any(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", label=policy)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))  # log axes' default 3x10^-2 labels collide
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("KV bytes held / FullKV")
        ax.set_ylabel("score")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if suite == "niah":
            ax.set_ylim(-0.02, 1.05)  # recall: the whole scale, so an all-zero sweep looks like one
        else:
            ax.set_ylim(bottom=0)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"{summary['suite']}: score vs KV cache size\n{summary['model']}", fontsize=10)
    return save_figure(fig, path)


def _niah_cells(path: Path, summary: dict) -> Path:
    """Every cell's NIAH heatmap (depth x context length) side by side, on one colour scale."""
    rows = summary["cells"]
    lengths = sorted({_niah_cell(g)[0] for r in rows for g in r["groups"]})
    depths = sorted({_niah_cell(g)[1] for r in rows for g in r["groups"]})
    cols = min(len(rows), 5)
    nrows = math.ceil(len(rows) / cols)
    fig = new_figure(max(3.0, 0.6 * len(lengths) + 1.5) * cols + 1, (0.35 * len(depths) + 1.6) * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    image = None
    for ax, r in zip(axes, rows, strict=False):
        cells = [dict(zip(("context_len", "depth_percent"), _niah_cell(g), strict=True), score=s)
                 for g, s in r["groups"].items()]
        image = draw_heatmap(ax, grid(cells, "score", lengths, depths), lengths, depths, fontsize=7, digits=1,
                             tick_fontsize=7)
        ax.set_title(f"{r['cell']} ({r['score']})", fontsize=9)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes), label="recall")
    fig.suptitle(f"NIAH recall per cell: needle depth (rows) x context length (columns), {summary['model']}")
    return save_figure(fig, path)
