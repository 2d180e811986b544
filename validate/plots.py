"""Plots of validation results (matplotlib, rendered off-screen; importing this module needs no display)."""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pkv_core.errors import UserInputError


def grid(cells: Sequence[dict], key: str, lengths: list[int], depths: list[float]) -> list[list[float]]:
    """Rows = depths (top to bottom), columns = lengths; NaN where no cell (or no score) exists; duplicates mean."""
    values: dict[tuple[int, float], list[float]] = defaultdict(list)
    for cell in cells:
        score = cell.get(key)
        if score is not None:
            values[(cell["context_len"], float(cell["depth_percent"]))].append(float(score))
    return [
        [sum(v) / len(v) if (v := values.get((length, depth))) else math.nan for length in lengths] for depth in depths
    ]


def _mean(matrix: list[list[float]]) -> float:
    flat = [x for row in matrix for x in row if not math.isnan(x)]
    return sum(flat) / len(flat) if flat else math.nan


def niah_heatmaps(cells: list[dict], out_png: Path, title: str) -> Path:
    """Draw NIAH score heatmaps (engine, plus reference side by side when any cell has a reference score).

    x: context length, y: needle depth in percent (0 at the top), colour: score in 0..1 on a fixed red→green
    scale, each cell annotated with its value; a (length, depth) pair absent from `cells` stays blank. The PNG is
    written to a temporary file next to `out_png` and moved into place, so readers never see a partial file.

    Rendering uses matplotlib's object API on the Agg canvas (no pyplot): no display is needed and the global
    backend of a host process is left untouched.
    """
    if not cells:
        raise UserInputError("no NIAH results to plot")
    out_png = Path(out_png)
    lengths = sorted({int(c["context_len"]) for c in cells})
    depths = sorted({float(c["depth_percent"]) for c in cells})
    panels = [("Engine", grid(cells, "engine_score", lengths, depths))]
    if any(c.get("engine_reuse_score") is not None for c in cells):
        panels.append(("Engine, context compressed once", grid(cells, "engine_reuse_score", lengths, depths)))
    if any(c.get("reference_score") is not None for c in cells):
        panels.append(("Reference", grid(cells, "reference_score", lengths, depths)))

    panel_w = max(4.0, 0.9 * len(lengths) + 1.8)
    height = max(3.5, 0.5 * len(depths) + 2.2)
    fig = new_figure(panel_w * len(panels) + 1.2, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, matrix) in zip(axes, panels, strict=True):
        image = draw_heatmap(ax, matrix, lengths, depths)
        ax.set_xlabel("Context length (tokens)")
        ax.set_ylabel("Needle depth (%)")
        mean = _mean(matrix)
        ax.set_title(f"{name} (mean {mean:.2f})" if not math.isnan(mean) else f"{name} (no scores)")
    fig.colorbar(image, ax=list(axes), label="score")
    fig.suptitle(title)

    return save_figure(fig, out_png)


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A figure on the Agg canvas (no pyplot: no display needed, a host process's backend left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def draw_heatmap(ax, matrix: list[list[float]], lengths: list[int], depths: list[float], fontsize: int = 8,
                 digits: int = 2, tick_fontsize: float | None = None):
    """One NIAH panel: rows = depths, columns = lengths, 0..1 on a fixed red→green scale, each cell annotated,
    NaN cells blank. Returns the image (for a colour bar)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    cmap = colormaps["RdYlGn"].with_extremes(bad="white")
    image = ax.imshow(matrix, cmap=cmap, norm=Normalize(vmin=0.0, vmax=1.0), aspect="auto", origin="upper",
                      interpolation="nearest")
    for row, depth_values in enumerate(matrix):
        for col, value in enumerate(depth_values):
            if not math.isnan(value):
                # White text on the dark ends of the scale, black in between.
                colour = "white" if value < 0.15 or value > 0.85 else "black"
                ax.text(col, row, f"{value:.{digits}f}", ha="center", va="center", fontsize=fontsize, color=colour)
    ticks = {} if tick_fontsize is None else {"fontsize": tick_fontsize}
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], **ticks)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], **ticks)
    return image


def save_figure(fig, out_png: Path) -> Path:
    """Write a figure as PNG through a temporary sibling, so readers never see a partial file."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".tmp", dir=out_png.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the plot ordinary file permissions
        os.replace(tmp, out_png)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return out_png


def _remove_quietly(path: str | os.PathLike[Any]) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
