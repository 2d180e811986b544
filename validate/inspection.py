"""Inspect one prompt: run the engine's prefill (and its selection) once, then write what its cache holds as
DIR/index.html (validate.inspect_page), DIR/kept.png (the layer x position map) and DIR/kept.json (InspectData).

Used by `pkv-export inspect` and by `validate --inspect-failures` (a page per failed NIAH sample, built from the
result the run already has, so no prefill is repeated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from exporter.outputs import atomic_write_text
from pkv_core.errors import UserInputError
from validate.inspect_data import InspectData, find_mark, inspect_data, prompt_text, token_pieces
from validate.inspect_page import bin_size, render_page

PAGE, PNG, JSON = "index.html", "kept.png", "kept.json"


def engine_dtype(engine: Any) -> str:
    """The dtype an engine's cache holds: a built engine's manifest, or the reference's torch dtype."""
    manifest = getattr(engine, "manifest", None)
    if manifest is not None:
        return manifest.get("dtype", "fp32")
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(getattr(engine, "dtype", None), "fp32")


def engine_model(engine: Any) -> str:
    """What model an engine runs, for a page's title: the reference's source, or what a manifest records."""
    loaded = getattr(engine, "loaded", None)
    if loaded is not None:
        return loaded.source
    model = getattr(engine, "manifest", {}).get("model", {})
    return str(model.get("source") or model.get("checkpoint_dir") or engine.spec.name)


def check_engine(engine_or_class: Any, where: str) -> None:
    """Refuse, before any prefill, an engine that cannot say what its cache holds."""
    if not getattr(engine_or_class, "reports_kept_indices", False):
        raise UserInputError(f"{where}: this engine does not report the kept indices of its cache (TensorRT-LLM's "
                             "runner returns tokens only); inspect needs an onnx or tensorrt engine, or --model for "
                             "the PyTorch reference")


def run_inspect(engine: Any, ids: list[int], policy, model: str, engine_name: str, mark: str | None,
                max_new_tokens: int = 1, progress=None) -> InspectData:
    """Prefill `ids` once through `engine` (and answer greedily, `max_new_tokens`) and collect what it kept. The
    mark is looked for before the prefill."""
    check_engine(engine, engine_name)
    tokens, span = prompt_text(engine.tokenizer, ids, mark)
    extra = {"return_scores": True} if getattr(engine, "records_scores", False) else {}
    result = engine.generate([ids], max_new_tokens, return_indices=True, progress=progress, **extra)
    return inspect_data(result, tokens, span, ids, policy, engine.spec, engine_dtype(engine), model, engine_name)


def data_from_result(engine: Any, result, ids: list[int], model: str, engine_name: str,
                     mark: str | None) -> InspectData:
    """InspectData from a generation already run (validate's), with `mark` outlined where the prompt holds it (a
    needle the tokenizer does not decode verbatim is left unmarked, and the page says so)."""
    tokens = token_pieces(engine.tokenizer, ids)
    span = None
    if mark is not None:
        try:
            span = find_mark(tokens, mark)
        except UserInputError:
            span = None
    data = inspect_data(result, tokens, span, ids, engine.policy, engine.spec, engine_dtype(engine), model,
                        engine_name)
    if mark is not None and span is None:
        data.notes["mark"] = f"not found verbatim in the decoded prompt: {mark}"
    return data


def write_inspect_dir(out: Path, data: InspectData) -> list[Path]:
    """index.html, kept.png and kept.json into `out` (which exists); returns their paths."""
    atomic_write_text(out / PAGE, render_page(data))
    kept_png(data, out / PNG)
    atomic_write_text(out / JSON, json.dumps(data.to_json(), ensure_ascii=False))
    return [out / PAGE, out / PNG, out / JSON]


def kept_png(d: InspectData, path: Path) -> Path:
    """The layer x position map as a PNG: share of each layer's heads keeping each (binned) position, the marked
    span outlined, the sinks and the window marked below the map."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    from validate.plots import new_figure, save_figure

    q, b = d.prompt_len, bin_size(d.prompt_len)
    cols = math.ceil(q / b)
    counts = np.zeros((d.num_layers, cols * b))
    counts[:, :q] = d.counts()
    filled = np.zeros(cols * b)
    filled[:q] = 1
    share = counts.reshape(d.num_layers, cols, b).sum(-1) / (filled.reshape(cols, b).sum(-1) * max(1, d.num_heads))
    fig = new_figure(11, 1.6 + 0.22 * d.num_layers, layout=None)  # fixed axes: a constrained layout costs more
    height = fig.get_figheight()
    bottom, top = 0.55 / height, 1 - 0.4 / height  # inches of labels below and title above, as fractions
    ax = fig.add_axes((0.06, bottom, 0.84, top - bottom))
    cax = fig.add_axes((0.92, bottom, 0.015, top - bottom))
    image = ax.imshow(share, cmap=colormaps["Blues"], norm=Normalize(0, 1), aspect="auto", interpolation="nearest",
                      extent=(0, q, d.num_layers - 0.5, -0.5))
    for start, end, colour, label in ((0, d.sinks, "#e08214", "sinks"), (q - d.window, q, "#1a9850", "window")):
        if end > start:
            ax.axvspan(start, end, ymin=0, ymax=0.02, color=colour, label=label)
    if d.mark is not None:
        m = d.mark
        ax.add_patch(Rectangle((m.token_start, -0.5), max(m.token_end - m.token_start, q / 400), d.num_layers,
                               fill=False, edgecolor="#d7191c", linewidth=1.5, label="marked span"))
    ax.set_xlabel("prompt position" + (f" ({b} positions per column)" if b > 1 else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"{d.policy} on {d.model}: share of each layer's {d.num_heads} heads keeping each token", fontsize=10)
    if d.sinks or d.window or d.mark is not None:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.colorbar(image, cax=cax, label="share of heads keeping it")
    return save_figure(fig, path)
