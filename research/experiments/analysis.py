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
    "EARLY_WARNING_PREDICTORS",
    "early_warning_table",
    "fit_and_evaluate_estimators",
    "key_prediction_numbers",
    "spectrum_adds_information",
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
    ("loss-spike count, steps 1-500", "loss_spikes_1_500", "through step 500"),
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


# Predictors an observer has by step 100 (init spectrum, log LR, gradient statistics through step 100), for
# `early_warning_table`. The spike count over 1-100 replaces the paper's 1-500 count, which would overlap the label.
EARLY_WARNING_PREDICTORS: tuple[tuple[str, str], ...] = (
    ("log LR", "learning_rate"),
    ("M≈1 at init (layer mean)", "near_unit_mass_mean"),
    ("spectral radius ρ (layer max)", "spectral_radius_max"),
    ("initial gradient norm", "initial_grad_norm"),
    ("gradient norm at step 100", "grad_norm_step100"),
    ("gradient-norm variance, steps 1-100", "grad_norm_var_1_100"),
    ("loss-spike count, steps 1-100", "loss_spikes_1_100"),
)


def early_warning_table(
    rows: Sequence[Mapping[str, Any]], *, step: int = 100, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUROC of predictors available at `step` for divergence *after* `step`, on the runs still stable at `step`.

    In the full table, step-100 gradient features of a run that diverged before step 100 carry its divergent value, so
    their AUROC mixes detection with prediction. Here runs that diverged at or before `step` are dropped and the label
    is "diverged in steps `step`+1 .. horizon"; every predictor sees only steps 1..`step` (or initialisation), so the
    comparison is like for like. Needs rows trained for more than `step` steps. Columns missing from a row (e.g.
    `loss_spikes_1_100` in tables written before it existed) are reported as `None`, never imputed.

    Returns:
        `dict` with `n`, `n_diverged`, `n_dropped` (diverged at or before `step`), `step`, and `rows`: a list of
        `{"predictor", "column", "auroc", "ci"}` (AUROC `None` where undefined: a single outcome or a missing column).
    """
    horizon = min((int(r["max_steps"]) for r in rows), default=0)
    if horizon <= step:
        raise ValueError(f"early_warning_table needs runs longer than step={step} (shortest run: {horizon} steps).")
    alive = [r for r in rows if not r["diverged"] or int(r["divergence_step"]) > step]
    y = _labels(alive)
    out_rows = []
    for label, column in EARLY_WARNING_PREDICTORS:
        if not alive or any(column not in r for r in alive):
            out_rows.append({"predictor": label, "column": column, "auroc": None, "ci": None})
            continue
        s = _scores(alive, column)
        if np.isnan(s).any() or y.sum() in (0, len(y)):
            out_rows.append({"predictor": label, "column": column, "auroc": None, "ci": None})
            continue
        a, (lo, hi) = bootstrap_auroc(s, y, n_resamples=n_resamples, seed=seed)
        out_rows.append({"predictor": label, "column": column, "auroc": a, "ci": [lo, hi]})
    return {"step": step, "n": len(alive), "n_diverged": int(y.sum()), "n_dropped": len(rows) - len(alive),
            "rows": out_rows}


def spectrum_adds_information(results: Mapping[str, Mapping[str, Any]], *, margin: float = 0.01) -> bool:
    """The report's rule (choice, fixed since session 1): the spectral estimator adds information when its held-out
    AUROC beats the norm-type + log-LR baseline by more than `margin` *and* the lower end of its 95% CI lies above the
    log-LR-only AUROC. `results` is the second output of `fit_and_evaluate_estimators`."""
    spec, lr_only, norm_lr = results["spectral + log LR"], results["log LR only"], results["norm type + log LR"]
    return bool(spec["auroc"] > norm_lr["auroc"] + margin and spec["auroc_ci"][0] > lr_only["auroc"])


def key_prediction_numbers(rows: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The headline prediction numbers of one sweep table, for comparing tables of different horizons: divergences
    per normalisation, AUROC of M≈1 and of the loss-spike count, the best gradient baseline, and the held-out AUROC /
    ECE of the spectral estimator and of the log-LR and norm-type + log-LR baselines (fitted on the `train` group)."""
    table = {t["column"]: t for t in prediction_table(rows, n_resamples=n_resamples, seed=seed)}
    grads = [table[c] for c in GRADIENT_COLUMNS]
    best = max(grads, key=lambda t: t["auroc"])
    by_norm: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        by_norm[r["norm"]][0] += int(bool(r["diverged"]))
        by_norm[r["norm"]][1] += 1
    _, res = fit_and_evaluate_estimators(rows, n_resamples=n_resamples, seed=seed)
    return {
        "horizon_steps": sorted({int(r["max_steps"]) for r in rows}),
        "n_runs": len(rows),
        "n_diverged": int(sum(bool(r["diverged"]) for r in rows)),
        "diverged_by_norm": {n: list(v) for n, v in sorted(by_norm.items())},
        "auroc_near_unit_mass": table["near_unit_mass_mean"]["auroc"],
        "auroc_near_unit_mass_ci": table["near_unit_mass_mean"]["ci"],
        "auroc_loss_spikes": table["loss_spikes_1_500"]["auroc"],
        "best_gradient_baseline": {"column": best["column"], "auroc": best["auroc"], "ci": best["ci"]},
        "heldout": {name: {"auroc": r["auroc"], "auroc_ci": r["auroc_ci"], "ece": r["ece"]} for name, r in res.items()},
        "spectrum_adds_information": spectrum_adds_information(res),
        "n_heldout": res["spectral + log LR"]["n_heldout"],
        "n_heldout_diverged": res["spectral + log LR"]["n_heldout_diverged"],
    }


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
