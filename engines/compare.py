"""Engine versus reference on the same inputs: tokens, logits (Polygraphy's comparator) and kept index sets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engines.base import GenerationResult


@dataclass
class Comparison:
    tokens_equal: bool
    first_divergence: int | None  # first step where any prompt's tokens differ
    max_abs_logit_diff: float  # over the steps both sides decoded from identical contexts
    logits_within_tolerance: bool
    index_agreement: float | None  # mean Jaccard of kept index sets over batch, layers and heads
    index_agreement_per_layer: list[float] | None
    steps_compared: int
    atol: float
    passed: bool

    def to_json(self) -> dict:
        return asdict(self)


def first_divergence(a: list[list[int]], b: list[list[int]]) -> int | None:
    first = None
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        diff = next((i for i in range(n) if x[i] != y[i]), None if len(x) == len(y) else n)
        if diff is not None:
            first = diff if first is None else min(first, diff)
    return first


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Jaccard similarity of index sets along the last axis; the sets may differ in size.

    a: [..., n], b: [..., m] int64 with the same leading dims (-1 = padding slot, ignored).
    """
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"index tensors disagree on batch/head dims: {tuple(a.shape)} vs {tuple(b.shape)}")
    scores = []
    for x, y in zip(a.reshape(-1, a.shape[-1]).tolist(), b.reshape(-1, b.shape[-1]).tolist(), strict=True):
        sx, sy = {i for i in x if i >= 0}, {i for i in y if i >= 0}
        scores.append(1.0 if not (sx | sy) else len(sx & sy) / len(sx | sy))
    return float(np.mean(scores))


def not_computed_as_reference(engine: GenerationResult, reference_logits: torch.Tensor, steps: int) -> torch.Tensor:
    """The engine's logits [B, steps, V], with the entries it did not compute (NaN at steps after a row's last
    token: TensorRT-LLM stops a row at its end token, engines/trtllm_engine.py) taken from the reference, so they
    are not counted; the engines that feed finished rows pad_id compute those logits and are compared on them.
    A NaN at a step a row was still generating stays, and fails the comparison."""
    logits = engine.logits[:, :steps]
    ended = torch.arange(steps)[None, :] >= torch.tensor([len(t) for t in engine.tokens])[:, None]  # [B, steps]
    absent = ended[..., None] & torch.isnan(logits)
    return torch.where(absent, reference_logits, logits) if bool(absent.any()) else logits


def compare_results(engine: GenerationResult, reference: GenerationResult, engine_name: str = "engine",
                    atol: float = 1e-4, min_index_agreement: float = 1.0) -> Comparison:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    div = first_divergence(engine.tokens, reference.tokens)
    steps = min(engine.logits.shape[1], reference.logits.shape[1])
    if div is not None:
        steps = min(steps, div + 1)  # the diverging step's logits still came from identical contexts
    results = RunResults()
    got, want = not_computed_as_reference(engine, reference.logits[:, :steps], steps), reference.logits[:, :steps]
    for name, logits in ((engine_name, got), ("torch-reference", want)):
        outputs = {"logits": np.ascontiguousarray(logits.numpy())}  # Polygraphy needs contiguous
        results.append((name, [IterationResult(outputs=outputs, runner_name=name)]))
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0))
    max_diff = float(accuracy[0][(engine_name, "torch-reference")][0]["logits"].max_absdiff)
    logits_ok = bool(accuracy) and math.isfinite(max_diff)  # a NaN difference (NaN logits) is a failure, never a pass
    per_layer = None
    agreement = None
    if engine.kept_indices is not None and reference.kept_indices is not None:
        per_layer = []
        for a, b in zip(engine.kept_indices, reference.kept_indices, strict=True):
            per_layer.append(jaccard(a, b) if a.shape[:-1] == b.shape[:-1] else 0.0)
        agreement = float(np.mean(per_layer))
    passed = div is None and logits_ok and (agreement is None or agreement >= min_index_agreement)
    return Comparison(div is None, div, max_diff, logits_ok, agreement, per_layer, steps, atol, passed)
