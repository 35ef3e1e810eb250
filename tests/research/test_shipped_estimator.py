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


def test_shipped_estimator_is_the_500_step_fit_and_matches_its_evaluation():
    from pathlib import Path

    from research.experiments.grids import PREDICTION_STEPS

    est = RiskEstimator.default()
    # fitted on the prediction sweep's full horizon (the paper's 1-500 spike window), not the 100-step table
    assert est.metadata["horizon_steps"] == [PREDICTION_STEPS]
    assert f"{PREDICTION_STEPS} steps" in est.metadata["description"]
    held = est.metadata["heldout"]
    assert held["n"] == 120 and 0 < held["n_diverged"] < held["n"]
    evaluation = Path(__file__).resolve().parents[2] / "results" / "risk_estimator_eval.json"
    spec = json.loads(evaluation.read_text())["estimators"]["spectral + log LR"]
    # the shipped metadata and the written evaluation come from one fit_risk.py run
    assert held["auroc"] == pytest.approx(spec["auroc"]) and held["ece"] == pytest.approx(spec["ece"])
    assert held["n_diverged"] == spec["n_heldout_diverged"]
