"""The shipped risk estimator against the research that fitted it: the research GPT's profile and the sweep's grids."""

from __future__ import annotations

import json

import pytest

from hf_koopman.risk import RiskEstimator


def test_spectral_profile_risk_uses_the_shipped_estimator():
    import torch

    from hf_koopman import profile
    from research.rksp_gpt import RKSPGPTConfig, RKSPGPTForSequenceClassification

    torch.manual_seed(0)
    model = RKSPGPTForSequenceClassification(
        RKSPGPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, norm="none", num_labels=64)
    )
    ids = torch.randint(0, 64, (8, 32))
    prof = profile(model, {"input_ids": ids}, num_samples=256, rank=16, learning_rate=1e-2)
    expected = RiskEstimator.default().predict_proba(prof, learning_rate=1e-2)
    assert prof.risk == pytest.approx(expected)
    assert 0 < expected < 1
    low = RiskEstimator.default().predict_proba(prof, learning_rate=1e-4)
    assert low <= expected  # more aggressive LR, no less risk (positive LR coefficient of the shipped model)


def test_shipped_estimator_is_the_heldout_study_fit_and_matches_its_report():
    from pathlib import Path

    from research.experiments.heldout_risk import HORIZON, read_jsonl
    from research.scripts.fit_risk import FAMILY_MODEL_TYPE, PRODUCT_FEATURES

    results = Path(__file__).resolve().parents[2] / "results"
    est = RiskEstimator.default()
    assert [(f.key, f.transform) for f in est.features] == list(PRODUCT_FEATURES)
    assert est.metadata["horizon_steps"] == HORIZON
    rows = read_jsonl(results / "heldout_risk" / "runs.jsonl")
    # fitted on the committed study rows (every one with its features), all families
    assert est.metadata["n_train"] + est.metadata["n_dropped_missing_features"] == len(rows)
    assert set(est.training_ranges["families"]) == {r["family"] for r in rows} <= set(FAMILY_MODEL_TYPE)
    # the held-out numbers in the metadata are the study report's, for the same inputs
    report = json.loads((results / "heldout_risk" / "report.json").read_text())
    assert report["n_runs"] == len(rows)
    held = report["primary_leave_one_family_out"]["models"]["spectrum+lr"]
    meta = est.metadata["heldout_family"]
    assert meta["auroc"] == pytest.approx(held["auroc"]) and meta["ece"] == pytest.approx(held["ece"])


def test_fit_heldout_fits_the_product_inputs_and_records_the_study(tmp_path):
    import numpy as np

    from research.scripts.fit_risk import FAMILY_MODEL_TYPE, PRODUCT_FEATURES, fit_heldout

    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        lr = 10 ** rng.uniform(-3, 0.6)
        m = rng.uniform(0, 1)
        rows.append({"family": list(FAMILY_MODEL_TYPE)[i % 8], "learning_rate": lr, "near_unit_mass_mean": m,
                     "unstable_mass_mean": 1 - m, "spectral_radius_max": 1 + rng.uniform(0, 3),
                     "eigvec_condition_mean": 10 ** rng.uniform(1, 3), "nonlinearity_mean": rng.uniform(0.2, 0.9),
                     "hidden_size": 32, "num_layers": 2, "diverged": bool(lr * (0.3 + m) > 0.3)})
    rows.append(dict(rows[0], near_unit_mass_mean=None))  # a failed profile: dropped and counted
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"auroc": 0.9, "auroc_ci": [0.8, 0.95], "ece": 0.04, "log_loss": 0.3}
    report = {"primary_leave_one_family_out": {"models": {"lr": dict(model, auroc=0.85), "spectrum+lr": model,
                                                          "config+lr": dict(model, auroc=0.93),
                                                          "gradient+lr": dict(model, auroc=0.99)}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    meta = fit_heldout(runs, tmp_path / "report.json", tmp_path / "est.json", n_bootstrap=5)
    est = RiskEstimator.from_json(tmp_path / "est.json")
    assert [f.key for f in est.features] == [k for k, _ in PRODUCT_FEATURES]
    assert meta["n_train"] == 120 and meta["n_dropped_missing_features"] == 1
    assert meta["heldout_family"]["auroc"] == 0.9 and meta["heldout_family"]["best_init_time"] == ("config+lr", 0.93)
    assert set(est.training_ranges["inputs"]["model_type"]["values"]) == set(FAMILY_MODEL_TYPE.values())
    feats = {"near_unit_mass_mean": 0.5, "unstable_mass_mean": 0.5, "spectral_radius_max": 2.0,
             "eigvec_condition_mean": 100.0, "nonlinearity_mean": 0.5}
    assert est.predict_proba(feats, learning_rate=1.0) > 0.5 > est.predict_proba(feats, learning_rate=1e-3)


def test_shipped_coefficients_refit_from_the_committed_study_rows():
    """The shipped estimator's coefficients and standardisation come out of a refit on `results/heldout_risk/runs.jsonl`
    with the inputs and penalty `research/scripts/fit_risk.py` uses (a hand-edited artefact fails here)."""
    import math
    from pathlib import Path

    from research.experiments.heldout_risk import read_jsonl
    from research.scripts.fit_risk import FAMILY_MODEL_TYPE, PRODUCT_FEATURES

    est = RiskEstimator.default()
    rows = read_jsonl(Path(__file__).resolve().parents[2] / "results" / "heldout_risk" / "runs.jsonl")
    keys = [k for k, _ in PRODUCT_FEATURES]
    kept = [dict(r, model_type=FAMILY_MODEL_TYPE[r["family"]]) for r in rows
            if all(isinstance(r.get(k), (int, float)) and not math.isnan(r[k]) for k in keys)]
    refit = RiskEstimator.fit(kept, [int(bool(r["diverged"])) for r in kept], list(PRODUCT_FEATURES),
                              l2=est.metadata["l2"])
    assert refit.intercept == pytest.approx(est.intercept, rel=1e-6, abs=1e-9)
    assert refit.coef == pytest.approx(est.coef, rel=1e-6, abs=1e-9)
    assert [v for f in refit.features for v in (f.mean, f.std)] == pytest.approx(
        [v for f in est.features for v in (f.mean, f.std)])
