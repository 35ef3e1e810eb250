"""The held-out study's analysis on synthetic rows with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from research.experiments.heldout_analysis import (
    EXPLORATORY_SETS,
    FEATURE_SETS,
    analyse,
    calibrated_within_2x,
    design,
    fit_logistic,
    max_lr_bound,
    measured_thresholds,
    out_of_fold,
    required_within_2x_at_half,
    seed_spread,
    suggested_max_lr,
)


def test_logistic_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 2))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5)))
    y = (rng.random(4000) < p).astype(float)
    w = fit_logistic(x, y, l2=1e-6)
    assert w == pytest.approx([2.0, -1.0, 0.5], abs=0.15)


def test_measured_thresholds_bracketing_and_censoring():
    ladder = [1e-3 * 2**k for k in range(6)]
    rows = []
    for mid, first_div in (("a", 3), ("b", None), ("c", 0)):
        for k, lr in enumerate(ladder):
            rows.append({"model_id": mid, "learning_rate": lr, "diverged": first_div is not None and k >= first_div})
    rows.append({"model_id": "d", "learning_rate": 1e-3, "diverged": False})
    rows.append({"model_id": "d", "learning_rate": 2e-3, "diverged": True})
    rows.append({"model_id": "d", "learning_rate": 4e-3, "diverged": False})  # non-monotone
    t = measured_thresholds(rows)
    assert t["a"]["status"] == "bracketed" and t["a"]["threshold"] == pytest.approx(math.sqrt(4e-3 * 8e-3))
    assert t["b"]["status"] == "right_censored" and t["b"]["bound"] == ladder[-1]
    assert t["c"]["status"] == "left_censored"
    assert t["d"]["status"] == "bracketed" and not t["d"]["monotone"]
    assert t["a"]["monotone"]


def _synthetic_rows(seed: int = 0) -> list[dict]:
    """Four families whose true threshold is set by a config feature (init std): a model seeing the config must
    transfer; one seeing only the LR cannot rank runs at the same LR."""
    rng = np.random.default_rng(seed)
    rows = []
    for fam in ("f1", "f2", "f3", "f4"):
        for std in (0.02, 0.08):
            for s in range(3):
                thr = 0.5 if std == 0.02 else 0.02
                for k in range(13):
                    lr = 1e-3 * 2**k
                    diverged = bool(math.log10(lr) + rng.normal(0, 0.1) > math.log10(thr))
                    rows.append({
                        "model_id": f"{fam}-{std}-{s}", "family": fam, "variant": fam, "norm": "pre_ln",
                        "num_layers": 2, "hidden_size": 32, "init_std": std, "task": "assoc_recall",
                        "learning_rate": lr, "diverged": diverged,
                        "hessian_top_eig": 10.0 / thr * (1 + rng.normal(0, 0.05)), "adam_sharpness": 38 / thr,
                        "near_unit_mass_mean": rng.random(), "unstable_mass_mean": rng.random(),
                        "spectral_radius_max": 1 + rng.random(), "eigvec_condition_mean": 10 + rng.random(),
                        "nonlinearity_mean": rng.random(), "near_unit_mass_x_log10_kappa_mean": rng.random(),
                        "initial_grad_norm": 1.0, "grad_norm_step100": float("inf") if diverged else 1.0,
                        "grad_norm_var_1_100": 0.1, "loss_spikes_1_500": 0.0,
                    })
    return rows


def test_out_of_fold_config_beats_lr_alone_on_unseen_families():
    rows = _synthetic_rows()
    y = np.array([r["diverged"] for r in rows])
    from research.experiments.stats import auroc

    p_lr, _ = out_of_fold(rows, FEATURE_SETS["lr"], "family")
    p_cfg, models = out_of_fold(rows, FEATURE_SETS["config+lr"], "family")
    assert auroc(p_cfg, y) > auroc(p_lr, y) + 0.05
    assert auroc(p_cfg, y) > 0.97
    # the suggested max lr at risk 0.5 lands near the true threshold of each init std
    fit, w = models["f1"]
    for std, thr in ((0.02, 0.5), (0.08, 0.02)):
        row = next(r for r in rows if r["family"] == "f1" and r["init_std"] == std)
        s = suggested_max_lr(row, FEATURE_SETS["config+lr"], fit, w, risk=0.5)
        assert 0.5 < s / thr < 2.0


def test_design_uses_training_statistics_only():
    rows = _synthetic_rows()
    x_train, fit = design(rows[:100], FEATURE_SETS["gradient+lr"])
    x_test, _ = design(rows[100:], FEATURE_SETS["gradient+lr"], fit)
    assert np.isfinite(x_train).all() and np.isfinite(x_test).all()
    assert x_train.mean(0) == pytest.approx(np.zeros(x_train.shape[1]), abs=1e-9)


def test_analyse_reports_every_planned_number():
    rep = analyse(_synthetic_rows(), n_resamples=50)
    prim = rep["primary_leave_one_family_out"]
    assert set(prim["models"]) == set(FEATURE_SETS) | set(EXPLORATORY_SETS)  # exploratory rows carry their label
    assert all("(exploratory)" in k for k in EXPLORATORY_SETS)
    assert "all - config+curvature+lr" in prim["paired_differences"]
    lo, hi = prim["models"]["config+lr"]["auroc_ci"]
    assert lo <= prim["models"]["config+lr"]["auroc"] <= hi
    assert 0.0 <= prim["models"]["all"]["ece"] <= 1.0
    assert rep["thresholds"]["bracketed"] + rep["thresholds"]["right_censored"] + rep["thresholds"]["left_censored"] \
        == rep["n_model_inits"]
    # the curvature-theory score is perfectly informative by construction here
    assert rep["unfitted_scores"]["lr · λ_max(P⁻¹H) / 38 (Adam theory)"]["auroc"] > 0.95


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0])
def test_calibrated_within_2x_matches_a_simulated_calibrated_estimator(sigma):
    """Thresholds drawn from the estimator's own logistic curve (calibration by construction): the within-2x fraction
    of its 10 % point follows from that of its 50 % point."""
    rng = np.random.default_rng(1)
    log2_s = rng.uniform(-8, 2, 40_000)  # the estimator's 50 % points, octaves
    u = rng.random(log2_s.size)
    log2_t = log2_s + sigma * np.log(u / (1 - u))  # P(T <= lr) = sigmoid((log2 lr - log2 s) / sigma)
    w_half = np.mean(np.abs(log2_s - log2_t) <= 1)
    log2_s10 = log2_s + sigma * math.log(0.1 / 0.9)
    w_low = np.mean(np.abs(log2_s10 - log2_t) <= 1)
    assert calibrated_within_2x(w_half, 0.1) == pytest.approx(w_low, abs=0.01)
    assert calibrated_within_2x(w_half, 0.5) == pytest.approx(w_half, abs=1e-9)


def test_required_accuracy_inverts_the_relation_and_is_monotone():
    w = required_within_2x_at_half(0.8, 0.1)
    assert calibrated_within_2x(w, 0.1) == pytest.approx(0.8, abs=1e-6)
    assert 0.9 < w < 0.99  # the 80 % goal at risk 0.1 needs the 50 % point within 2x for ~95 % of inits
    grid = np.linspace(0.01, 0.99, 99)
    vals = [calibrated_within_2x(x, 0.1) for x in grid]
    assert all(b > a for a, b in zip(vals, vals[1:]))


def test_seed_spread_compares_seeds_on_their_shared_rungs():
    ladder = [1e-3 * 2**k for k in range(8)]
    first_div = {"c1-s0": 3, "c1-s1": 3, "c2-s0": 2, "c2-s1": 3, "c3-s0": 1, "c3-s1": 4, "c4-s0": None, "c4-s1": 2}
    rows = [{"model_id": m, "learning_rate": lr, "diverged": k_div is not None and k >= k_div}
            for m, k_div in first_div.items() for k, lr in enumerate(ladder)]
    # c5: seed 1 ran the even rungs only; its first diverging rung (index 4) is the one after seed 0's stable
    # index 3, so on the shared (even) rungs both first diverge at the same rung
    rows += [{"model_id": "c5-s0", "learning_rate": lr, "diverged": k >= 4} for k, lr in enumerate(ladder)]
    rows += [{"model_id": "c5-s1", "learning_rate": lr, "diverged": k >= 4}
             for k, lr in enumerate(ladder) if k % 2 == 0]
    # c6: an isolated divergence below stable rungs on seed 0 (non-monotone): left out, not counted as 3 rungs
    rows += [{"model_id": "c6-s0", "learning_rate": lr, "diverged": k == 1 or k >= 5} for k, lr in enumerate(ladder)]
    rows += [{"model_id": "c6-s1", "learning_rate": lr, "diverged": k >= 5} for k, lr in enumerate(ladder)]
    out = seed_spread(rows)
    assert out["n_pairs"] == 4 and out["left_out_censored"] == 1 and out["left_out_non_monotone"] == 1
    assert out["same_rung"] == pytest.approx(2 / 4) and out["one_rung"] == pytest.approx(1 / 4)
    assert out["two_or_more_rungs"] == pytest.approx(1 / 4)
    assert out["rung_octaves"] == [1.0, 2.0]


def test_max_lr_bound_skips_missing_accuracy_and_handles_perfect_models():
    max_lr = {
        "a": {"risk_0.5": {"within_2x": 0.8, "above_4x": 0.1, "below_4x": 0.0}, "risk_0.1": {"within_2x": 0.4}},
        "b": {"risk_0.5": {"within_2x": float("nan")}, "risk_0.1": {"within_2x": float("nan")}},
        "c": {"risk_0.5": {"within_2x": 1.0}, "risk_0.1": {"within_2x": 1.0}},
    }
    out = max_lr_bound(max_lr, {"n_pairs": 0})
    assert set(out["per_model"]) == {"a", "c"}
    assert out["per_model"]["a"]["sigma_octaves"] == pytest.approx(1 / math.log(9))  # w = 0.8 -> (1+w)/(1-w) = 9
    assert out["per_model"]["c"]["sigma_octaves"] is None
    assert out["per_model"]["c"]["calibrated_within_2x_risk_0.1"] == 1.0
    assert out["required_within_2x_risk_0.5"] == pytest.approx(required_within_2x_at_half(0.8, 0.1))
    assert math.isnan(calibrated_within_2x(float("nan")))
