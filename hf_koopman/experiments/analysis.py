"""Tables for `results/RESULTS.md` from sweep rows: prediction AUROCs (paper Table 2), within-normalisation AUROCs,
the calibrated risk estimator on held-out configurations, prevention (Table 3) and max stable LR (Table 5)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hf_koopman.risk import FeatureSpec, RiskEstimator

from .stats import auroc, bootstrap_auroc, expected_calibration_error, fisher_exact, reliability_bins

__all__ = [
    "PREDICTORS",
    "SPECTRAL_FEATURES",
    "prediction_table",
    "within_norm_table",
    "fit_and_evaluate_estimators",
    "prevention_table",
    "max_stable_lr_table",
]

# (label, column, timing). Higher score = predicted riskier; layer means of the init profile (the paper does not say
# which aggregate it used, §1.8 of the extraction).
PREDICTORS: tuple[tuple[str, str, str], ...] = (
    ("M≈1 at init (layer mean)", "near_unit_mass_mean", "initialisation"),
    ("M≈1 × log10 κ(V)", "near_unit_mass_x_log10_kappa_mean", "initialisation"),
    ("spectral radius ρ (layer max)", "spectral_radius_max", "initialisation"),
    ("eigenvector condition κ(V) (layer mean)", "eigvec_condition_mean", "initialisation"),
    ("initial gradient norm", "initial_grad_norm", "after 1 step"),
    ("gradient norm at step 100", "grad_norm_step100", "step 100"),
    ("gradient-norm variance, steps 1-100", "grad_norm_var_1_100", "through step 100"),
    ("loss-spike count, steps 1-500 (run length)", "loss_spikes_1_500", "through the run"),
)
GRADIENT_COLUMNS = ("initial_grad_norm", "grad_norm_step100", "grad_norm_var_1_100", "loss_spikes_1_500")

# Inputs of the shipped estimator: log LR plus init-spectrum summaries (no normalisation label: the spectrum has to
# carry that information itself).
SPECTRAL_FEATURES: tuple[tuple[str, str], ...] = (
    ("learning_rate", "log10"),
    ("near_unit_mass_mean", "identity"),
    ("unstable_mass_mean", "identity"),
    ("spectral_radius_max", "log10"),
    ("eigvec_condition_mean", "log10"),
)


def _labels(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([int(bool(r["diverged"])) for r in rows])


def _scores(rows: Sequence[Mapping[str, Any]], column: str) -> np.ndarray:
    return np.array([float(r[column]) for r in rows], dtype=np.float64)


def prediction_table(rows: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """AUROC [95% bootstrap CI] of each predictor on all rows (paper Table 2)."""
    y = _labels(rows)
    out = []
    for label, column, timing in PREDICTORS:
        s = _scores(rows, column)
        if np.isnan(s).any():  # e.g. a degenerate profile; reported, not silently dropped
            keep = ~np.isnan(s)
            s_, y_ = s[keep], y[keep]
        else:
            s_, y_ = s, y
        a, (lo, hi) = bootstrap_auroc(s_, y_, n_resamples=n_resamples, seed=seed)
        out.append({"predictor": label, "column": column, "timing": timing, "auroc": a, "ci": [lo, hi],
                    "n": int(len(y_)), "n_diverged": int(y_.sum())})
    return out


def within_norm_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """AUROC of each predictor (and of log LR) *within* each normalisation, across LRs / sizes / seeds.
    `None` where the normalisation has only one outcome (AUROC undefined)."""
    by_norm: dict[str, list] = defaultdict(list)
    for r in rows:
        by_norm[r["norm"]].append(r)
    out: dict[str, dict[str, Any]] = {}
    for norm, rs in sorted(by_norm.items()):
        y = _labels(rs)
        entry: dict[str, Any] = {"n": len(rs), "n_diverged": int(y.sum())}
        for label, column, _ in (("log LR", "learning_rate", ""), *PREDICTORS):
            a = auroc(_scores(rs, column), y)
            entry[column] = None if math.isnan(a) else a
        out[norm] = entry
    return out


def _evaluate(probs: np.ndarray, y: np.ndarray, *, n_bins: int, n_resamples: int, seed: int) -> dict[str, Any]:
    a, ci = bootstrap_auroc(probs, y, n_resamples=n_resamples, seed=seed)
    return {
        "auroc": a, "auroc_ci": list(ci), "ece": expected_calibration_error(probs, y, n_bins=n_bins),
        "brier": float(np.mean((probs - y) ** 2)), "reliability": reliability_bins(probs, y, n_bins=n_bins),
    }


def fit_and_evaluate_estimators(
    rows: Sequence[Mapping[str, Any]], *, l2: float = 1.0, n_bins: int = 10, n_resamples: int = 1000, seed: int = 0
) -> tuple[RiskEstimator, dict[str, dict[str, Any]]]:
    """Fit on `group == "train"` rows, evaluate on `group == "heldout"` rows (unseen width/depth and/or seed).

    Compared on the same held-out rows: the spectral estimator (log LR + init spectrum), log LR alone, normalisation
    one-hot + log LR, and the paper's raw M≈1 read as a probability (App. H). Returns the spectral estimator (refit on
    all rows for shipping is left to the caller) and the metrics.
    """
    train = [r for r in rows if r["group"] == "train"]
    test = [r for r in rows if r["group"] == "heldout"]
    if not train or not test:
        raise ValueError("need rows in both the 'train' and the 'heldout' group.")
    ytr, yte = _labels(train), _labels(test)
    norms = sorted({r["norm"] for r in rows})
    candidates = {
        "spectral + log LR": list(SPECTRAL_FEATURES),
        "log LR only": [("learning_rate", "log10")],
        "norm type + log LR": [("learning_rate", "log10"), *[("norm", f"onehot:{n}") for n in norms[1:]]],
        "spectral only (no LR)": list(SPECTRAL_FEATURES[1:]),
    }
    results: dict[str, dict[str, Any]] = {}
    spectral = None
    for name, feats in candidates.items():
        est = RiskEstimator.fit(train, ytr, [FeatureSpec(k, t) for k, t in feats], l2=l2)
        results[name] = _evaluate(est.predict_proba_rows(test), yte, n_bins=n_bins, n_resamples=n_resamples, seed=seed)
        results[name]["features"] = [f.name for f in est.features]
        if name == "spectral + log LR":
            spectral = est
    raw = np.clip(_scores(test, "near_unit_mass_mean"), 0.0, 1.0)
    results["raw M≈1 as probability (paper)"] = _evaluate(raw, yte, n_bins=n_bins, n_resamples=n_resamples, seed=seed)
    for r in results.values():
        r["n_train"], r["n_heldout"], r["n_heldout_diverged"] = len(train), len(test), int(yte.sum())
    assert spectral is not None
    return spectral, results


def _acc(rs):
    vals = [float(r["eval_accuracy"]) for r in rs if not r["diverged"] and r.get("eval_accuracy") is not None]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def prevention_table(rows: Sequence[Mapping[str, Any]], *, control: str = "none") -> list[dict[str, Any]]:
    """Per method: divergence count / rate, accuracy of converged runs, M≈1 after training, median step-1 gradient
    norm, overhead per step relative to `control`, Fisher exact p against `control` (paper Table 3)."""
    by_method: dict[str, list] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    if control not in by_method:
        raise ValueError(f"no control rows (method={control!r}).")

    def per_step(rs):
        return sum(float(r["train_seconds"]) for r in rs) / max(1, sum(int(r["steps_run"]) for r in rs))

    base = by_method[control]
    base_div = sum(bool(r["diverged"]) for r in base)
    out = []
    for method, rs in sorted(by_method.items(), key=lambda kv: (kv[0] != control, kv[0])):
        div = sum(bool(r["diverged"]) for r in rs)
        finals = [float(r["final_near_unit_mass_mean"]) for r in rs if r.get("final_near_unit_mass_mean") is not None]
        g1 = [float(r["initial_grad_norm"]) for r in rs if r.get("initial_grad_norm") is not None]
        out.append({
            "method": method, "n": len(rs), "diverged": div, "divergence_rate": div / len(rs),
            "accuracy_converged": _acc(rs),
            "final_near_unit_mass_mean": float(np.mean(finals)) if finals else None,
            "initial_grad_norm_median": float(np.median(g1)) if g1 else None,
            "overhead": per_step(rs) / per_step(base) - 1.0,
            "fisher_p_vs_control": None if method == control else fisher_exact([[div, len(rs) - div], [base_div, len(base) - base_div]]),
        })
    return out


def max_stable_lr_table(rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.2) -> dict[str, dict[str, Any]]:
    """Largest LR whose divergence rate, and that of every smaller LR tried, is below `threshold` (20%, Table 5),
    per (normalisation, method). `censored` is True when even the largest LR tried stayed stable."""
    cells: dict[tuple[str, str], dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["norm"], r["method"])][float(r["learning_rate"])].append(int(bool(r["diverged"])))
    out: dict[str, dict[str, Any]] = {}
    for (norm, method), by_lr in sorted(cells.items()):
        best = None
        rates = {lr: float(np.mean(v)) for lr, v in sorted(by_lr.items())}
        for lr, rate in rates.items():
            if rate >= threshold:
                break
            best = lr
        out.setdefault(norm, {})[method] = {
            "max_stable_lr": best, "censored": best == max(rates), "rates": {f"{k:g}": v for k, v in rates.items()},
            "trials_per_lr": {f"{k:g}": len(v) for k, v in sorted(by_lr.items())},
        }
    return out
