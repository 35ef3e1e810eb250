"""Small statistics for the RKSP evaluation: AUROC with bootstrap CIs, ECE / reliability bins, Fisher's exact test.

Pure numpy (scipy is not a core dependency); each function is checked against hand-computed cases in
`tests/experiments/test_stats.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["auroc", "bootstrap_auroc", "expected_calibration_error", "reliability_bins", "fisher_exact"]


def _as_binary(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be a 1-D array of 0/1 values.")
    return y.astype(np.int64)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    r"""Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2
    (Mann-Whitney U with mid-ranks). `+inf` scores are allowed; NaN is rejected.

    Returns NaN (with no error) when one class is absent, since the AUROC is undefined then.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _as_binary(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; drop or impute those runs before computing the AUROC.")
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # mid-ranks for ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_auroc(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """AUROC and its percentile bootstrap CI (paper: 1000 resamples, 95%). Resamples that miss a class are redrawn.

    Returns:
        `(auroc, (low, high))`; NaNs when one class is absent from the data.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _as_binary(labels)
    point = auroc(s, y)
    if math.isnan(point):
        return point, (float("nan"), float("nan"))
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1).")
    rng = np.random.default_rng(seed)
    stats: list[float] = []
    while len(stats) < n_resamples:
        idx = rng.integers(0, len(y), size=len(y))
        yy = y[idx]
        if yy.min() == yy.max():
            continue
        stats.append(auroc(s[idx], yy))
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return point, (float(lo), float(hi))


def reliability_bins(
    probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *, n_bins: int = 10
) -> list[dict[str, float]]:
    """Equal-width bins on [0, 1] (last bin closed): per non-empty bin `count`, `mean_prob`, `frac_positive`, `low`, `high`."""
    p = np.asarray(probs, dtype=np.float64)
    y = _as_binary(labels)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and labels {y.shape} must have the same shape.")
    if not np.all(np.isfinite(p)) or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise ValueError("probs must be finite probabilities in [0, 1].")
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1.")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            out.append(
                {"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(m.sum()),
                 "mean_prob": float(p[m].mean()), "frac_positive": float(y[m].mean())}
            )
    return out


def expected_calibration_error(
    probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *, n_bins: int = 10
) -> float:
    r"""ECE $= \sum_b \frac{n_b}{n} |\bar y_b - \bar p_b|$ over `n_bins` equal-width bins (default 10)."""
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["frac_positive"] - b["mean_prob"]) for b in bins))


def fisher_exact(table: Sequence[Sequence[int]]) -> float:
    """Two-sided Fisher exact p-value for a 2x2 table `[[a, b], [c, d]]` (e.g. [[diverged, stable] per arm]).

    Sums the hypergeometric probabilities of all tables with the same margins that are no more likely than the
    observed one (the usual two-sided definition, with a 1e-7 relative tolerance for ties).
    """
    (a, b), (c, d) = table
    if min(a, b, c, d) < 0:
        raise ValueError("table counts must be non-negative.")
    row1, col1, n = a + b, a + c, a + b + c + d
    if n == 0:
        raise ValueError("table is empty.")

    def logp(x: int) -> float:
        return (
            math.lgamma(row1 + 1) + math.lgamma(n - row1 + 1) + math.lgamma(col1 + 1) + math.lgamma(n - col1 + 1)
            - math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(row1 - x + 1)
            - math.lgamma(col1 - x + 1) - math.lgamma(n - row1 - col1 + x + 1)
        )

    lo, hi = max(0, row1 + col1 - n), min(row1, col1)
    observed = logp(a)
    total = sum(math.exp(logp(x)) for x in range(lo, hi + 1) if logp(x) <= observed + 1e-7)
    return float(min(1.0, total))
