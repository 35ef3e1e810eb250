"""Divergence labels and the gradient-based baselines of the RKSP paper (Sec. 3.1, Table 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# the rule itself (Sec. 3.1: loss > 50, gradient norm > 500, non-finite) lives in one place, shared with the guard
from hf_koopman.training.divergence import GRAD_NORM_THRESHOLD, LOSS_THRESHOLD, PAPER_RULE, is_divergent_step

__all__ = [
    "LOSS_THRESHOLD",
    "GRAD_NORM_THRESHOLD",
    "SPIKE_FACTOR",
    "SPIKE_WINDOW",
    "DivergenceLabel",
    "is_divergent_step",
    "label_divergence",
    "count_loss_spikes",
    "gradient_baselines",
]

# Loss spike (the paper does not define it; our choice): loss_t > SPIKE_FACTOR * mean of the previous SPIKE_WINDOW
# finite losses (at least 5 needed), or a non-finite loss.
SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 20


@dataclass(frozen=True)
class DivergenceLabel:
    """`diverged`: the paper's binary label D; `step`: first divergent step (1-based) or None; `reason`:
    `"loss"`, `"grad_norm"`, `"non_finite"` or None."""

    diverged: bool
    step: int | None
    reason: str | None


def label_divergence(losses: Sequence[float], grad_norms: Sequence[float] | None = None) -> DivergenceLabel:
    """Label a run from its per-step losses (and gradient norms, same length) exactly as the paper does.

    Shapes:
        losses, grad_norms: `(S,)` for steps 1..S.
    """
    if grad_norms is not None and len(grad_norms) != len(losses):
        raise ValueError(f"losses ({len(losses)}) and grad_norms ({len(grad_norms)}) must have the same length.")
    for i, loss in enumerate(losses):
        g = None if grad_norms is None else float(grad_norms[i])
        loss = float(loss)
        if not math.isfinite(loss) or (g is not None and not math.isfinite(g)):
            return DivergenceLabel(True, i + 1, "non_finite")
        if PAPER_RULE.loss_diverged(loss):
            return DivergenceLabel(True, i + 1, "loss")
        if PAPER_RULE.grad_norm_diverged(g):
            return DivergenceLabel(True, i + 1, "grad_norm")
    return DivergenceLabel(False, None, None)


def count_loss_spikes(losses: Sequence[float], *, start: int = 1, end: int = 500) -> int:
    """Number of loss spikes over steps `start..end` (1-based, inclusive).

    A step is a spike when its loss is non-finite, or exceeds `SPIKE_FACTOR` (1.5) times the mean of the previous
    `SPIKE_WINDOW` (20) finite losses; steps with fewer than 5 previous finite losses cannot spike (except non-finite).
    """
    arr = np.asarray(losses, dtype=np.float64)
    spikes = 0
    history: list[float] = []
    for t in range(len(arr)):
        step = t + 1
        value = arr[t]
        if start <= step <= end:
            if not np.isfinite(value):
                spikes += 1
            elif len(history) >= 5 and value > SPIKE_FACTOR * float(np.mean(history[-SPIKE_WINDOW:])):
                spikes += 1
        if np.isfinite(value):
            history.append(float(value))
        if step >= end:
            break
    return spikes


def _at_step(values: np.ndarray, step: int) -> float:
    """Value at 1-based `step`; a run that stopped earlier carries its last value (what a monitor would see)."""
    if len(values) == 0:
        return float("nan")
    v = values[min(step, len(values)) - 1]
    return float(v) if np.isfinite(v) else float("inf")


def gradient_baselines(losses: Sequence[float], grad_norms: Sequence[float]) -> dict[str, float]:
    """The four gradient baselines of Table 2 from per-step histories (steps 1..S).

    Returns a dict with `initial_grad_norm` (step 1), `grad_norm_step100`, `grad_norm_var_1_100` (variance over steps
    1-100) and `loss_spikes_1_500` (see `count_loss_spikes`), plus `loss_spikes_1_100`, the same count over steps
    1-100 only (not a paper baseline: it makes the spike count comparable with the other step-100 baselines when
    predicting divergence after step 100). Runs that stopped before a step (diverged) carry their last value;
    non-finite values map to `inf` (ranked highest, so AUROC stays defined).
    """
    g = np.asarray(grad_norms, dtype=np.float64)
    window = g[:100]
    if len(window) and np.all(np.isfinite(window)):
        var = float(np.var(window))
    else:
        var = float("inf") if len(window) else float("nan")
    return {
        "initial_grad_norm": _at_step(g, 1),
        "grad_norm_step100": _at_step(g, 100),
        "grad_norm_var_1_100": var,
        "loss_spikes_1_500": float(count_loss_spikes(losses, start=1, end=500)),
        "loss_spikes_1_100": float(count_loss_spikes(losses, start=1, end=100)),
    }
