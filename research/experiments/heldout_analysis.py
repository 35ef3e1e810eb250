"""Analysis of the held-out-family study (plan: `results/heldout_risk/PURPOSE.md`): leave-one-family-out logistic
models, cluster-bootstrap AUROC CIs, ECE, paired differences, measured vs suggested max learning rates.

Everything here follows the plan's fixed choices (feature sets, L2 penalty 1.0 on standardised inputs, 10 ECE bins,
1,000 cluster-bootstrap resamples over model inits); pure numpy.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .stats import auroc, expected_calibration_error, reliability_bins

__all__ = [
    "EXPLORATORY_SETS",
    "FEATURE_SETS",
    "GOAL_WITHIN_2X",
    "SCORE_ROWS",
    "design",
    "fit_logistic",
    "out_of_fold",
    "measured_thresholds",
    "suggested_max_lr",
    "sigma_from_within_2x",
    "calibrated_within_2x",
    "required_within_2x_at_half",
    "seed_spread",
    "max_lr_bound",
    "analyse",
]

NORMS = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")
CONFIG = ("norm_onehot", "num_layers", "log2_width", "log10_init_std", "task_wikitext2")
CURVATURE = ("log10_hessian_top_eig", "log10_adam_sharpness")
SPECTRUM = ("near_unit_mass_mean", "unstable_mass_mean", "log10_spectral_radius_max", "log10_eigvec_condition_mean",
            "nonlinearity_mean")
GRADIENT = ("g_initial_grad_norm", "g_grad_norm_step100", "g_grad_norm_var_1_100", "g_loss_spikes_1_500")
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "lr": ("log10_lr",),
    "norm+lr": ("norm_onehot", "log10_lr"),
    "config+lr": CONFIG + ("log10_lr",),
    "gradient+lr": GRADIENT + ("log10_lr",),
    "curvature+lr": CURVATURE + ("log10_lr",),
    "spectrum+lr": SPECTRUM + ("log10_lr",),
    "config+curvature+lr": CONFIG + CURVATURE + ("log10_lr",),
    "all": CONFIG + CURVATURE + SPECTRUM + ("log10_lr",),
}
# Exploratory (not in the plan, PURPOSE.md rule 6): inputs every `transformers` config carries (depth, width, init
# std), without the normalisation placement, which a generic model does not declare; the candidate for an estimator
# that needs no knowledge of the architecture beyond its config. Reported under their own label, never selected.
EXPLORATORY_SETS: dict[str, tuple[str, ...]] = {
    "arch+lr (exploratory)": ("num_layers", "log2_width", "log10_init_std", "log10_lr"),
    "arch+spectrum+lr (exploratory)": ("num_layers", "log2_width", "log10_init_std") + SPECTRUM + ("log10_lr",),
}
INIT_TIME = tuple(k for k in FEATURE_SETS if k != "gradient+lr")
# unfitted scores (higher = riskier): the paper's spectral predictors and the two curvature-theory ratios
SCORE_ROWS: dict[str, str] = {
    "M≈1 mean (paper)": "near_unit_mass_mean",
    "M≈1 × log10 κ(V) (paper)": "near_unit_mass_x_log10_kappa_mean",
    "ρ max (paper)": "spectral_radius_max",
    "κ(V) mean (paper)": "eigvec_condition_mean",
    "lr · λ_max(H) / 2 (GD theory)": "theory_gd",
    "lr · λ_max(P⁻¹H) / 38 (Adam theory)": "theory_adam",
}
L2 = 1.0
GOAL_WITHIN_2X = 0.8  # PURPOSE.md question 2: within 2x for >= 80% of held-out inits


def _log10_pos(v: Any) -> float:
    if v is None:
        return math.nan
    v = float(v)
    return math.log10(max(v, 1e-8)) if not math.isnan(v) else math.nan


def _value(row: Mapping[str, Any], name: str) -> float:
    if name == "log10_lr":
        return math.log10(float(row["learning_rate"]))
    if name == "num_layers":
        return float(row["num_layers"])
    if name == "log2_width":
        return math.log2(float(row["hidden_size"]))
    if name == "log10_init_std":
        return math.log10(float(row["init_std"]))
    if name == "task_wikitext2":
        return float(row["task"] == "wikitext2")
    if name.startswith("log10_"):
        return _log10_pos(row.get(name[len("log10_"):]))
    if name.startswith("g_"):
        v = row.get(name[2:])
        return math.nan if v is None else float(v)  # inf kept; capped in `design`
    v = row.get(name)
    return math.nan if v is None else float(v)


def _columns(names: Sequence[str]) -> list[str]:
    out = []
    for n in names:
        out.extend(f"norm={k}" for k in NORMS) if n == "norm_onehot" else out.append(n)
    return out


def design(rows: Sequence[Mapping[str, Any]], names: Sequence[str], fit: dict | None = None) -> tuple[np.ndarray, dict]:
    """Standardised design matrix `(n, p)` of `rows` for the input set `names`; `fit` carries the training fold's
    medians / caps / means / stds (computed here when None)."""
    cols = _columns(names)
    raw = np.empty((len(rows), len(cols)))
    for i, row in enumerate(rows):
        j = 0
        for n in names:
            if n == "norm_onehot":
                raw[i, j : j + len(NORMS)] = [float(row["norm"] == k) for k in NORMS]
                j += len(NORMS)
            else:
                raw[i, j] = _value(row, n)
                j += 1
    gcols = [j for j, c in enumerate(cols) if c.startswith("g_")]
    if fit is None:
        fit = {"caps": {}, "medians": {}}
        for j in gcols:
            finite = raw[np.isfinite(raw[:, j]), j]
            fit["caps"][j] = float(finite.max()) * 10 if finite.size else 1e6
    for j in gcols:  # non-finite gradient statistics -> 10 x the largest finite training value, then log10(1 + x)
        col = raw[:, j]
        col[np.isinf(col)] = fit["caps"][j]
        raw[:, j] = np.log10(1.0 + np.maximum(col, 0.0))
    if "means" not in fit:
        for j in range(raw.shape[1]):
            finite = raw[np.isfinite(raw[:, j]), j]
            fit["medians"][j] = float(np.median(finite)) if finite.size else 0.0
    for j in range(raw.shape[1]):
        raw[~np.isfinite(raw[:, j]), j] = fit["medians"][j]
    if "means" not in fit:
        fit["means"] = raw.mean(0)
        std = raw.std(0)
        fit["stds"] = np.where(std > 1e-12, std, 1.0)  # a constant column stays 0
    return (raw - fit["means"]) / fit["stds"], fit


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = L2, iterations: int = 100) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method; returns `(p + 1,)` weights, the intercept last
    (unpenalised)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    pen = np.full(xb.shape[1], l2)
    pen[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -35, 35)))
        grad = xb.T @ (p - y) + pen * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(pen) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def _predict(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x @ w[:-1] + w[-1], -35, 35)))


def out_of_fold(rows: Sequence[Mapping[str, Any]], names: Sequence[str], group_key: str) -> tuple[np.ndarray, dict]:
    """Pooled held-out probabilities: each group of `group_key` predicted by a model fitted on the other groups.
    Returns the probabilities and the fitted `(fit, weights)` per held-out group (for the max-lr curves)."""
    y = np.array([int(bool(r["diverged"])) for r in rows])
    groups = np.array([str(r[group_key]) for r in rows])
    probs = np.full(len(rows), np.nan)
    models = {}
    for g in sorted(set(groups)):
        train = groups != g
        if y[train].min() == y[train].max():
            continue
        x_train, fit = design([rows[i] for i in np.flatnonzero(train)], names)
        w = fit_logistic(x_train, y[train])
        x_test, _ = design([rows[i] for i in np.flatnonzero(~train)], names, fit)
        probs[~train] = _predict(x_test, w)
        models[g] = (fit, w)
    return probs, models


def measured_thresholds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model init: the ladder, the measured threshold `sqrt(lo * hi)` (hi = smallest diverging rung, lo = the
    rung below it), or the censoring, and whether the ladder is monotone."""
    by: dict[str, list] = defaultdict(list)
    for r in rows:
        by[r["model_id"]].append((float(r["learning_rate"]), bool(r["diverged"])))
    out = {}
    for mid, pairs in by.items():
        pairs.sort()
        lrs = [lr for lr, _ in pairs]
        div = [d for _, d in pairs]
        rec: dict[str, Any] = {"n_rungs": len(pairs), "n_diverged": sum(div)}
        if not any(div):
            rec.update(status="right_censored", threshold=None, bound=lrs[-1])
        elif div[0]:
            rec.update(status="left_censored", threshold=None, bound=lrs[0])
        else:
            k = div.index(True)
            rec.update(status="bracketed", threshold=math.sqrt(lrs[k - 1] * lrs[k]), lo=lrs[k - 1], hi=lrs[k])
        first = div.index(True) if any(div) else len(div)
        rec["monotone"] = all(div[first:])
        out[mid] = rec
    return out


def suggested_max_lr(row: Mapping[str, Any], names: Sequence[str], fit: dict, w: np.ndarray, *, risk: float,
                     grid: np.ndarray | None = None) -> float | None:
    """Largest lr on a 200-point log grid over [1e-4, 10] below which the predicted probability stays under `risk`
    (None if it is already above `risk` at 1e-4; 10 if it never reaches it)."""
    grid = np.logspace(-4, 1, 200) if grid is None else grid
    rows = [dict(row, learning_rate=float(lr)) for lr in grid]
    x, _ = design(rows, names, fit)
    p = _predict(x, w)
    above = np.flatnonzero(p >= risk)
    if above.size == 0:
        return float(grid[-1])
    if above[0] == 0:
        return None
    return float(grid[above[0] - 1])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sigma_from_within_2x(within_2x_at_half: float) -> float | None:
    """Scale sigma (octaves) of a logistic error E with `P(|E| <= 1) = within_2x_at_half`: `2 sigmoid(1 / sigma) - 1
    = w`, so `1 / sigma = ln((1 + w) / (1 - w))`. `None` outside (0, 1), where no finite positive scale fits."""
    w = float(within_2x_at_half)
    if not 0.0 < w < 1.0:
        return None
    return 1.0 / math.log((1 + w) / (1 - w))


def calibrated_within_2x(within_2x_at_half: float, risk: float = 0.1) -> float:
    """The within-2x fraction at `risk` of a calibrated estimator that is logistic in log lr with one scale for all
    inits (as the fitted models are: log lr enters linearly, without interactions) and whose 50 % point lies within
    2x of the threshold for `within_2x_at_half` of the inits. A reference value, not a bound for estimators whose
    scale varies by init or whose curve is not logistic.

    Why: such an estimator's curve is `sigmoid((log2 lr - log2 s) / sigma)` (sigma in octaves), and calibration makes
    the error `E = log2(s / T)` of its 50 % point s logistic with the same scale sigma. `P(|E| <= 1) = 2 sigmoid(1 /
    sigma) - 1` fixes sigma from `within_2x_at_half`; the `risk`-point is `s 2^(sigma l)` with `l = logit(risk)`, and
    it lies within 2x of T when `|E + sigma l| <= 1`, with probability `sigmoid(1/sigma - l) - sigmoid(-1/sigma - l)`
    (increasing in `within_2x_at_half`).
    """
    w = float(within_2x_at_half)
    if math.isnan(w):
        return math.nan
    sigma = sigma_from_within_2x(w)
    if sigma is None:
        return 1.0 if w >= 1.0 else 0.0
    u = 1.0 / sigma
    shift = -math.log(risk / (1 - risk))  # -logit(risk), in units of sigma
    return _sigmoid(shift + u) - _sigmoid(shift - u)


def required_within_2x_at_half(goal: float = GOAL_WITHIN_2X, risk: float = 0.1) -> float:
    """The `within_2x_at_half` a calibrated logistic estimator needs for `calibrated_within_2x(., risk) = goal`
    (bisection; the relation is increasing)."""
    lo, hi = 1e-9, 1 - 1e-12
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if calibrated_within_2x(mid, risk) < goal else (lo, mid)
    return (lo + hi) / 2


_SEEDED_ID = re.compile(r"^(?P<configuration>.+)-s(?P<seed>\d+)$")


def seed_spread(rows: Sequence[Mapping[str, Any]],
                thresholds: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """How many ladder rungs apart the thresholds of two seeds of one configuration lie (model ids that differ only
    in their `-s<seed>` suffix). Each pair is compared on the rungs both seeds ran, so a seed run on every other rung
    is not mistaken for a one-rung difference; pairs with a non-monotone ladder (an isolated divergence below stable
    rungs) or censored on the shared rungs are left out and counted.

    If seeds of one configuration mostly share a rung, the seed-to-seed noise of the label does not limit a predictor
    that sees the configuration: the threshold is a property of the configuration to within one rung.
    `thresholds`: `measured_thresholds(rows)` when the caller has it already."""
    thresholds = measured_thresholds(rows) if thresholds is None else thresholds
    ladders: dict[str, dict[float, bool]] = defaultdict(dict)
    seeds: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        ladders[str(r["model_id"])][float(r["learning_rate"])] = bool(r["diverged"])
        m = _SEEDED_ID.match(str(r["model_id"]))
        if m:  # ids without a seed suffix have no sibling seeds
            seeds[m["configuration"]][m["seed"]] = str(r["model_id"])
    rungs, steps, non_monotone, censored = [], [], 0, 0
    for ids in seeds.values():
        mids = [ids[k] for k in sorted(ids)]
        for i in range(len(mids)):
            for j in range(i + 1, len(mids)):
                a, b = mids[i], mids[j]
                if not (thresholds[a]["monotone"] and thresholds[b]["monotone"]):
                    non_monotone += 1
                    continue
                common = sorted(set(ladders[a]) & set(ladders[b]))
                firsts = [next((k for k, lr in enumerate(common) if ladders[m][lr]), None) for m in (a, b)]
                if len(common) < 2 or any(k is None or k == 0 for k in firsts):
                    censored += 1
                    continue
                rungs.append(abs(firsts[0] - firsts[1]))
                steps.append(math.log2(common[1] / common[0]))
    out: dict[str, Any] = {"n_pairs": len(rungs), "left_out_non_monotone": non_monotone,
                           "left_out_censored": censored}
    if rungs:
        d = np.array(rungs)
        out.update(same_rung=float(np.mean(d == 0)), one_rung=float(np.mean(d == 1)),
                   two_or_more_rungs=float(np.mean(d >= 2)),
                   rung_octaves=sorted({round(x, 3) for x in steps}))
    return out


def max_lr_bound(max_lr: Mapping[str, Any], spread: Mapping[str, Any], *,
                 goal: float = GOAL_WITHIN_2X) -> dict[str, Any]:
    """Why the max-lr goal is missed (a diagnostic beside the plan, PURPOSE.md rule 6): per model, the within-2x
    fraction at risk 0.1 of a calibrated common-scale logistic estimator as accurate at risk 0.5 as the model
    (`calibrated_within_2x`) next to the measured one and the tails of the 50 % point's error; the accuracy at risk 0.5
    such an estimator needs for `goal`; the seeds' spread (`seed_spread`)."""
    per_model = {}
    for name, e in max_lr.items():
        half, low = e.get("risk_0.5", {}), e.get("risk_0.1", {})
        w_half = half.get("within_2x")
        if w_half is None or math.isnan(float(w_half)):
            continue
        per_model[name] = {
            "within_2x_risk_0.5": w_half,
            "sigma_octaves": sigma_from_within_2x(w_half),
            "calibrated_within_2x_risk_0.1": calibrated_within_2x(w_half, 0.1),
            "measured_within_2x_risk_0.1": low.get("within_2x"),
            "above_4x_risk_0.5": half.get("above_4x"), "below_4x_risk_0.5": half.get("below_4x"),
            "above_4x_by_variant_risk_0.5": half.get("above_4x_by_variant", {}),
        }
    return {"goal": goal, "required_within_2x_risk_0.5": required_within_2x_at_half(goal, 0.1),
            "per_model": per_model, "seed_spread": dict(spread)}


def _cluster_indices(rows: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by[r["model_id"]].append(i)
    return [np.array(v) for v in by.values()]


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def analyse(rows: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the plan's "Metrics" section on `rows` (the study's runs; partial tables allowed)."""
    rows = list(rows)
    for r in rows:
        lr = float(r["learning_rate"])
        h, a = r.get("hessian_top_eig"), r.get("adam_sharpness")
        r["theory_gd"] = lr * float(h) / 2 if h is not None else math.nan
        r["theory_adam"] = lr * float(a) / 38 if a is not None else math.nan
    y = np.array([int(bool(r["diverged"])) for r in rows])
    clusters = _cluster_indices(rows)
    rng = np.random.default_rng(seed)
    resamples = []
    while len(resamples) < n_resamples:
        pick = rng.integers(0, len(clusters), size=len(clusters))
        idx = np.concatenate([clusters[k] for k in pick])
        if y[idx].min() != y[idx].max():
            resamples.append(idx)

    report: dict[str, Any] = {
        "n_runs": len(rows), "n_diverged": int(y.sum()), "n_model_inits": len(clusters),
        "families": sorted({r["family"] for r in rows}),
    }
    thresholds = measured_thresholds(rows)
    report["thresholds"] = {
        "bracketed": sum(t["status"] == "bracketed" for t in thresholds.values()),
        "right_censored": sum(t["status"] == "right_censored" for t in thresholds.values()),
        "left_censored": sum(t["status"] == "left_censored" for t in thresholds.values()),
        "non_monotone": sum(not t["monotone"] for t in thresholds.values()),
    }
    spread = seed_spread(rows, thresholds)
    for split, key in (("primary_leave_one_family_out", "family"), ("secondary_leave_one_variant_out", "variant")):
        probs: dict[str, np.ndarray] = {}
        models: dict[str, dict] = {}
        for name, names in {**FEATURE_SETS, **EXPLORATORY_SETS}.items():
            probs[name], models[name] = out_of_fold(rows, names, key)
        res: dict[str, Any] = {}
        for name, p in probs.items():
            ok = ~np.isnan(p)
            boots = [auroc(p[idx][ok[idx]], y[idx][ok[idx]]) for idx in resamples]
            res[name] = {
                "auroc": auroc(p[ok], y[ok]),
                "auroc_ci": [float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))],
                "ece": expected_calibration_error(p[ok], y[ok]),
                "log_loss": _logloss(p[ok], y[ok]),
                "brier": float(np.mean((p[ok] - y[ok]) ** 2)),
                "reliability": reliability_bins(p[ok], y[ok]),
                "n": int(ok.sum()),
                "per_group_auroc": {
                    g: auroc(p[ok & (groups == g)], y[ok & (groups == g)])
                    for groups in [np.array([str(r[key]) for r in rows])] for g in sorted(set(groups))
                },
            }
        diffs = {}
        for a_name, b_name in (("all", "config+curvature+lr"), ("spectrum+lr", "lr"), ("all", "config+lr"),
                               ("config+lr", "lr"), ("curvature+lr", "lr")):
            pa, pb = probs[a_name], probs[b_name]
            ok = ~np.isnan(pa) & ~np.isnan(pb)
            d_auc = [auroc(pa[idx][ok[idx]], y[idx][ok[idx]]) - auroc(pb[idx][ok[idx]], y[idx][ok[idx]])
                     for idx in resamples]
            d_ll = [_logloss(pa[idx][ok[idx]], y[idx][ok[idx]]) - _logloss(pb[idx][ok[idx]], y[idx][ok[idx]])
                    for idx in resamples]
            diffs[f"{a_name} - {b_name}"] = {
                "delta_auroc": auroc(pa[ok], y[ok]) - auroc(pb[ok], y[ok]),
                "delta_auroc_ci": [float(np.nanquantile(d_auc, 0.025)), float(np.nanquantile(d_auc, 0.975))],
                "delta_log_loss": _logloss(pa[ok], y[ok]) - _logloss(pb[ok], y[ok]),
                "delta_log_loss_ci": [float(np.quantile(d_ll, 0.025)), float(np.quantile(d_ll, 0.975))],
            }
        max_lr = {}
        for name in (*INIT_TIME, *EXPLORATORY_SETS):
            names = {**FEATURE_SETS, **EXPLORATORY_SETS}[name]
            seen: dict[str, dict] = {}
            for r in rows:
                if r["model_id"] in seen or str(r[key]) not in models[name]:
                    continue
                fit, w = models[name][str(r[key])]
                t = thresholds[r["model_id"]]
                rec = {"status": t["status"], "measured": t.get("threshold"), "bound": t.get("bound"),
                       "family": r["family"], "variant": str(r.get("variant", r["family"]))}
                for risk in (0.1, 0.5):
                    rec[f"suggested_{risk}"] = suggested_max_lr(r, names, fit, w, risk=risk)
                seen[r["model_id"]] = rec
            summary = {}
            for risk in (0.1, 0.5):
                br = [s for s in seen.values() if s["status"] == "bracketed"]
                ratios = [(s[f"suggested_{risk}"] or 1e-4) / s["measured"] for s in br]
                within = [0.5 <= q <= 2.0 for q in ratios]
                cens = [s for s in seen.values() if s["status"] != "bracketed"]
                consistent = sum(
                    (s["status"] == "right_censored" and (s[f"suggested_{risk}"] or 0) >= s["bound"] / 2)
                    or (s["status"] == "left_censored" and (s[f"suggested_{risk}"] or 0) <= 2 * s["bound"])
                    for s in cens
                )
                summary[f"risk_{risk}"] = {
                    "within_2x": float(np.mean(within)) if within else math.nan,
                    "n_bracketed": len(br),
                    "median_log2_ratio": float(np.median(np.log2(ratios))) if ratios else math.nan,
                    "below_measured": float(np.mean([q < 1 for q in ratios])) if ratios else math.nan,
                    "above_4x": float(np.mean([q > 4 for q in ratios])) if ratios else math.nan,
                    "below_4x": float(np.mean([q < 0.25 for q in ratios])) if ratios else math.nan,
                    "above_4x_by_variant": dict(Counter(b["variant"] for q, b in zip(ratios, br) if q > 4)
                                                .most_common()),
                    "n_censored": len(cens), "censored_consistent": int(consistent),
                    "per_family": {
                        fam: {"within_2x": float(np.mean([w for w, b in zip(within, br) if b["family"] == fam])),
                              "n_bracketed": sum(b["family"] == fam for b in br)}
                        for fam in sorted({b["family"] for b in br})
                    },
                }
            max_lr[name] = summary
        report[split] = {"models": res, "paired_differences": diffs, "max_lr": max_lr,
                         "max_lr_bound": max_lr_bound(max_lr, spread)}
    scores = {}
    for label, col in SCORE_ROWS.items():
        s = np.array([float(r[col]) if r.get(col) is not None else math.nan for r in rows])
        ok = ~np.isnan(s)
        boots = [auroc(s[idx][ok[idx]], y[idx][ok[idx]]) for idx in resamples]
        scores[label] = {"auroc": auroc(s[ok], y[ok]), "n": int(ok.sum()),
                         "auroc_ci": [float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))]}
    report["unfitted_scores"] = scores
    return report
