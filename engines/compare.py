"""Engine versus reference on the same inputs: tokens, logits (Polygraphy's comparator) and kept index sets."""

from __future__ import annotations

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
    for name, result in ((engine_name, engine), ("torch-reference", reference)):
        outputs = {"logits": np.ascontiguousarray(result.logits[:, :steps].numpy())}  # Polygraphy needs contiguous
        results.append((name, [IterationResult(outputs=outputs, runner_name=name)]))
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0))
    logits_ok = bool(accuracy)
    max_diff = float(accuracy[0][(engine_name, "torch-reference")][0]["logits"].max_absdiff)
    per_layer = None
    agreement = None
    if engine.kept_indices is not None and reference.kept_indices is not None:
        per_layer = []
        for a, b in zip(engine.kept_indices, reference.kept_indices, strict=True):
            per_layer.append(jaccard(a, b) if a.shape[:-1] == b.shape[:-1] else 0.0)
        agreement = float(np.mean(per_layer))
    passed = div is None and logits_ok and (agreement is None or agreement >= min_index_agreement)
    return Comparison(div is None, div, max_diff, logits_ok, agreement, per_layer, steps, atol, passed)
