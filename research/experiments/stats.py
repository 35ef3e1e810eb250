"""Statistics for the RKSP evaluation: AUROC with a bootstrap CI, ECE / reliability bins, Fisher's exact test.

The AUROC is scipy's Mann-Whitney U statistic over n_pos · n_neg (exact rank sums: the same bits as the area under
the ROC curve, which `sklearn.metrics.roc_auc_score` approximates by a trapezoid sum to within 1e-15), the bootstrap
`scipy.stats.bootstrap`, the exact test `scipy.stats.fisher_exact`. What this module adds is what the study needs
around them: input checks with a clear error, NaN (not an error) where a quantity is undefined because one class is
absent, `+inf` scores (an infinite κ(V)), and a percentile interval over the resamples that hold both classes. ECE
and reliability bins (equal-width, last bin closed) have no library equivalent that reports per-bin counts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["auroc", "bootstrap_auroc", "expected_calibration_error", "reliability_bins", "fisher_exact"]


def _as_binary(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be a 1-D array of 0/1 values.")
    return y.astype(np.int64)


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = _scipy_stats.mannwhitneyu(s[positive], s[~positive], method="asymptotic", use_continuity=False).statistic
    return float(u / (n_pos * n_neg))


def _auroc_along_last_axis(s: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """`_auroc` of every resample at once (`scipy.stats.bootstrap`, vectorized): the same U from scipy's mid-ranks,
    exact in float64 (rank sums are half-integers), so the bits equal `_auroc`'s; NaN where a class is missing."""
    ranks = _scipy_stats.rankdata(s, axis=axis)
    n_pos = y.sum(axis=axis)
    n_neg = y.shape[axis] - n_pos
    u = (ranks * y).sum(axis=axis) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (n_pos * n_neg)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    r"""Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2
    (Mann-Whitney U / (n_pos · n_neg), `scipy.stats.mannwhitneyu`). `+inf` scores are allowed; NaN is rejected.

    Returns NaN (with no error) when one class is absent, since the AUROC is undefined then.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _as_binary(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same shape.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; drop or impute those runs before computing the AUROC.")
    return _auroc(s, y) if len(y) else float("nan")


def bootstrap_auroc(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """AUROC and its percentile bootstrap CI (paper: 1000 resamples, 95%), by `scipy.stats.bootstrap` on the paired
    (score, label) rows.

    A resample that misses a class has no AUROC; the interval is taken over the resamples that hold both (scipy's own
    percentile interval would be NaN as soon as one resample misses a class).

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
    with warnings.catch_warnings():  # scipy warns when a resample has no AUROC; those are dropped below
        warnings.simplefilter("ignore", _scipy_stats.DegenerateDataWarning)
        result = _scipy_stats.bootstrap(
            (s, y), _auroc_along_last_axis, paired=True, vectorized=True, n_resamples=n_resamples,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(result.bootstrap_distribution, [alpha, 1 - alpha])
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
    """Two-sided Fisher exact p-value (`scipy.stats.fisher_exact`) for a 2x2 table `[[a, b], [c, d]]`: one row per
    arm, e.g. `[diverged, stable]`."""
    counts = np.asarray(table)
    if counts.shape != (2, 2):
        raise ValueError(f"table must be 2x2, got shape {counts.shape}.")
    if (counts < 0).any():
        raise ValueError("table counts must be non-negative.")
    if counts.sum() == 0:
        raise ValueError("table is empty.")
    return float(_scipy_stats.fisher_exact(counts, alternative="two-sided").pvalue)
