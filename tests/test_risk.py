"""RiskEstimator: fitting, JSON round trip, range / monotonicity, clear errors, and the shipped default."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_koopman.risk import DecisionRule, FeatureSpec, RiskEstimator


def _rows(n=400, seed=0):
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(n):
        lr = 10 ** rng.uniform(-3.5, -1)
        m = rng.uniform(0, 1)
        logit = 3.0 * (math.log10(lr) + 2.2) + 4.0 * (m - 0.5)
        rows.append({"learning_rate": lr, "near_unit_mass_mean": m, "norm": "none" if m > 0.6 else "pre_ln"})
        labels.append(int(rng.uniform() < 1 / (1 + math.exp(-logit))))
    return rows, labels


def test_fit_recovers_signs_and_predicts_in_unit_interval():
    rows, y = _rows()
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"], l2=0.1)
    assert est.coef[0] > 0 and est.coef[1] > 0
    p = est.predict_proba_rows(rows)
    assert np.all((p > 0) & (p < 1))
    # calibrated on its own training data: mean prediction close to base rate
    assert abs(p.mean() - np.mean(y)) < 0.02


def test_monotone_in_learning_rate_and_clipped_outside_training_range():
    rows, y = _rows()
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"])
    probs = [est.predict_proba({"near_unit_mass_mean": 0.5}, learning_rate=lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert all(a <= b for a, b in zip(probs, probs[1:])) and probs[-1] > probs[0]
    # beyond the training range the input is clipped: no extrapolation
    assert est.predict_proba({"near_unit_mass_mean": 0.5}, learning_rate=10.0) == pytest.approx(
        est.predict_proba({"near_unit_mass_mean": 0.5}, learning_rate=0.1), abs=0.02
    )
    assert 0 < est.predict_proba({"near_unit_mass_mean": math.inf}, learning_rate=1e-3) < 1


def test_onehot_context_and_profile_like_objects():
    rows, y = _rows()
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), ("norm", "onehot:none")])

    class FakeProfile:
        aggregates = {"near_unit_mass_mean": 0.2}
        meta = {"learning_rate": 1e-2}

    a = est.predict_proba(FakeProfile(), norm="none")
    b = est.predict_proba(FakeProfile(), norm="pre_ln")
    assert a > b  # the 'none' rows diverge more in the synthetic data
    assert est.predict_proba(FakeProfile(), learning_rate=1e-2, norm="none") == a  # meta lr used when not passed


def test_json_round_trip(tmp_path):
    rows, y = _rows()
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"], metadata={"n": len(rows)})
    path = est.save_json(tmp_path / "est.json")
    data = json.loads(path.read_text())
    assert data["format"] == "hf_koopman.risk_estimator" and data["metadata"] == {"n": 400}
    again = RiskEstimator.from_json(path)
    np.testing.assert_allclose(again.predict_proba_rows(rows), est.predict_proba_rows(rows))
    data["format"] = "pickle"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format"):
        RiskEstimator.from_json(tmp_path / "bad.json")


def test_clear_errors():
    rows, y = _rows()
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"])
    with pytest.raises(ValueError, match="learning_rate"):
        est.predict_proba({"near_unit_mass_mean": 0.5})
    with pytest.raises(ValueError, match="positive"):
        est.predict_proba({"near_unit_mass_mean": 0.5}, learning_rate=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        est.predict_proba({"near_unit_mass_mean": float("nan")}, learning_rate=1e-3)
    with pytest.raises(TypeError, match="SpectralProfile"):
        est.predict_proba(42, learning_rate=1e-3)
    with pytest.raises(ValueError, match="one diverged and one stable"):
        RiskEstimator.fit(rows[:3], [0, 0, 0], ["near_unit_mass_mean"])
    with pytest.raises(ValueError, match="transform"):
        FeatureSpec("x", "sqrt")


def test_shipped_default_loads_and_is_a_probability():
    try:
        est = RiskEstimator.default()
    except FileNotFoundError:
        pytest.fail("hf_koopman/data/risk_estimator.json must ship with the package")
    values = {f.key: (f.low + f.high) / 2 if f.transform != "log10" else 10 ** ((f.low + f.high) / 2) for f in est.features}
    p = est.predict_proba_rows([values])[0]
    assert 0 < p < 1
    assert "heldout" in json.dumps(est.metadata)



def _planted(num_samples: int, strength: float, seed: int, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A block map whose update a linear map explains only in part: population η_nl 0.50 at strength 0.5, 0.92 at 2."""
    X = torch.randn(num_samples, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    A = torch.randn(width, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / width**0.5
    nonlinear = torch.tanh(2 * X @ A.T) ** 2
    return X.float(), (X + 0.3 * X @ A + strength * (nonlinear - nonlinear.mean(0))).float()


@pytest.mark.parametrize("ratio", [3, 16])
def test_the_informative_gate_reads_eta_corrected_for_the_fit_s_degrees_of_freedom(ratio):
    # in-sample, a fit with d regressors on N = 3d states reads a population eta_nl of 0.92 as about 0.75: without the
    # correction the gate would take these barely linear blocks as informative at small N/d only
    from hf_koopman.profiling import profile_from_snapshots

    n = ratio * 64
    barely = profile_from_snapshots([(f"layers.{i}", *_planted(n, 2.0, seed=i)) for i in range(2)])
    raw = [f.nonlinearity for _, f in barely.layers]
    adjusted = [DecisionRule.adjusted_nonlinearity(e, n, 64) for e in raw]
    assert all(a > 0.9 for a in adjusted) and (ratio > 3 or all(e < 0.8 for e in raw))
    assert barely.rule.reads(barely) == [False, False] and barely.verdict == "uninformative"
    partly = profile_from_snapshots([(f"layers.{i}", *_planted(n, 0.5, seed=i)) for i in range(2)])
    assert partly.rule.reads(partly) == [True, True]


def test_adjusted_nonlinearity_edges():
    assert DecisionRule.adjusted_nonlinearity(0.5, None, 64) == 0.5  # N unknown: as measured
    assert DecisionRule.adjusted_nonlinearity(0.5, 65, 64) == math.inf  # no degree of freedom left
    assert DecisionRule.adjusted_nonlinearity(0.5, 129, 64, rank=32) == pytest.approx(0.5 * (128 / 96) ** 0.5)


def test_recommendation_follows_an_in_range_probability_and_the_verdict_otherwise():
    from hf_koopman.risk import ADVICE, RISK_BUDGET, RiskAssessment, recommendation

    low = RiskAssessment(probability=5e-4, out_of_range=False, learning_rate=3e-3)
    text = recommendation("high risk", low)
    assert "< 0.1 %" in text and "no lower learning rate is needed" in text and "'high risk' verdict" in text
    assert "Lower the learning rate" not in text  # the high-risk advice would contradict the in-range probability
    high = RiskAssessment(probability=RISK_BUDGET + 0.2, out_of_range=False, learning_rate=1.0)
    assert "lower the learning rate" in recommendation("safe", high) and "30.0%" in recommendation("safe", high)
    for doubtful in (RiskAssessment(probability=5e-4, out_of_range=True, learning_rate=3e-3),
                     RiskAssessment(probability=5e-4, out_of_range=None, learning_rate=3e-3),
                     RiskAssessment(probability=5e-4, out_of_range=False), None):
        assert recommendation("high risk", doubtful) == ADVICE["high risk"]


def test_the_score_band_stops_at_one():
    from hf_koopman.risk import DecisionRule, score_band

    assert score_band(0.24, 0.5) == "0.24 ± 0.12"
    assert score_band(1.0, 0.5) == "1.00 (band 0.50 to 1, a mass cannot exceed 1)"
    _, reason = DecisionRule().decide(1.0, 5.0, num_samples=256, hidden_size=64, informative=2, total=2)
    assert "± 0.50" not in reason and "band 0.50 to 1" in reason


def test_the_budget_is_judged_on_the_shown_probability():
    from hf_koopman.risk import RiskAssessment, below_risk_budget, recommendation

    # at or below: the rate suggest_max_lr gives for a 10 % risk reads 10.0 %, within the budget
    assert below_risk_budget(0.0994) and below_risk_budget(0.0996) and below_risk_budget(0.1004)
    assert not below_risk_budget(0.1006)
    at = recommendation("safe", RiskAssessment(probability=0.0996, out_of_range=False, learning_rate=0.01))
    assert "10.0%" in at and "no lower learning rate is needed" in at
    edge = recommendation("safe", RiskAssessment(probability=0.1006, out_of_range=False, learning_rate=0.01))
    assert "10.1%" in edge and "lower the learning rate" in edge  # never "10.1% ... no lower learning rate needed"


def test_the_module_example_runs_and_prints_what_it_shows():
    import doctest

    import hf_koopman.risk

    assert doctest.testmod(hf_koopman.risk, optionflags=doctest.ELLIPSIS).failed == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"safe_below": float("nan")}, "safe_below must be a finite number"),
    ({"high_risk_above": float("inf")}, "high_risk_above must be a finite number"),
    ({"safe_below": 0.6}, r"need 0 <= safe_below \(0.6\) <= high_risk_above \(0.5\) <= 1"),
    ({"safe_below": -0.1}, r"need 0 <= safe_below"),
    ({"min_samples_per_dim": -1}, "min_samples_per_dim must be >= 0"),
    ({"max_nonlinearity": float("nan")}, r"max_nonlinearity must be a number \(inf switches the check off\)"),
    ({"kappa_large": 0.5}, "kappa_large is a condition number"),
    ({"max_nonlinearity": "0.9"}, "max_nonlinearity must be a number"),
])
def test_decision_rule_refuses_thresholds_that_cannot_order_verdicts(kwargs, message):
    with pytest.raises(ValueError, match=f"^DecisionRule: {message}"):
        DecisionRule(**kwargs)


def test_decision_rule_gates_can_be_switched_off():
    math_inf = float("inf")
    rule = DecisionRule(max_nonlinearity=math_inf, kappa_large=math_inf, gate_band=math_inf, min_samples_per_dim=0,
                        warn_samples_per_dim=0)
    assert rule.decide(0.1, 5.0, num_samples=10, hidden_size=64)[0] == "safe"
    assert DecisionRule(min_samples_per_dim=10).min_samples_per_dim == 10  # above the default warning ratio of 8


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_the_learning_rate_must_be_positive_and_finite(lr):
    with pytest.raises(ValueError, match="must be a positive finite number"):
        RiskEstimator.default().predict_proba({"near_unit_mass_mean": 0.3}, learning_rate=lr)


def test_a_probability_from_an_uninformative_profile_comes_with_a_warning(caplog):
    import logging

    from hf_koopman.risk import _warn_once

    _warn_once.cache_clear()  # said once per process: start from none said
    est = RiskEstimator.default()
    aggregates = {f.key: 0.3 for f in est.features if f.key != "learning_rate"}
    profile = {"verdict": "uninformative", "verdict_reason": "only N = 16 token states", "aggregates": aggregates}
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        est.predict_proba({**profile, "verdict": "safe"}, learning_rate=1e-2)
        assert "uninformative" not in caplog.text
        p = est.predict_proba(profile, learning_rate=1e-2)
    assert 0 < p < 1 and "profile is uninformative (only N = 16 token states)" in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        caplog.clear()
        est.predict_proba(profile, learning_rate=2e-2)  # the same profile again: said once
    assert "uninformative" not in caplog.text


def test_an_uninformative_profile_without_a_learning_rate_raises_before_any_warning(caplog):
    # the estimator needs the learning rate: no probability is computed, so none is warned about
    import logging

    from hf_koopman.risk import _warn_once

    _warn_once.cache_clear()
    est = RiskEstimator.default()
    aggregates = {f.key: 0.3 for f in est.features if f.key != "learning_rate"}
    profile = {"verdict": "uninformative", "verdict_reason": "a rank-8 profile", "aggregates": aggregates}
    with caplog.at_level(logging.WARNING, logger="hf_koopman"), pytest.raises(ValueError, match="learning_rate"):
        est.predict_proba(profile)
    assert "uninformative" not in caplog.text


def test_a_learning_rate_below_the_fitted_range_gets_no_advice_to_lower_it():
    from hf_koopman.risk import ADVICE, RangeIssue, RiskAssessment, recommendation

    below = RangeIssue("learning_rate", 5e-5, low=1e-3, high=4.1, excess=1.3, log_scale=True)
    assessment = RiskAssessment(probability=2e-5, out_of_range=True, outside=(below,), learning_rate=5e-5)
    text = recommendation("high risk", assessment)
    assert text.startswith("The planned learning rate 5e-05 lies below every rate the risk estimator was fitted on "
                           "(0.001 to 4.1); at the lowest of them it reads < 0.1 %")
    assert "No lower learning rate is indicated" in text and "Lower the learning rate" not in text
    above = RangeIssue("learning_rate", 10.0, low=1e-3, high=4.1, excess=0.4, log_scale=True)
    unseen = RangeIssue("model_type", "mamba", seen=("gpt2",))
    for outside, p in (((above,), 2e-5), ((below, unseen), 2e-5), ((below,), 0.3)):  # the edge reading says little
        other = RiskAssessment(probability=p, out_of_range=True, outside=outside, learning_rate=5e-5)
        assert recommendation("high risk", other) == ADVICE["high risk"]


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1e-3, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError), ("1e-3", TypeError)])
def test_a_profiles_risk_at_a_bad_learning_rate_is_refused_not_none(bad, error):
    from hf_koopman.profiling import profile
    from hf_koopman.testing_utils import tiny_model

    result = profile(tiny_model("llama"), num_samples=256, progress=False)
    with pytest.raises(error, match="learning_rate"):
        result.risk_assessment(learning_rate=bad)
    with pytest.raises(error, match="learning_rate"):
        result.risk_probability(learning_rate=bad)


@pytest.mark.parametrize("value, expected", [(800.0, 0.0), (-800.0, 1.0), (0.0, 0.5)])
def test_an_unclipped_estimator_gives_a_probability_for_any_logit(value, expected):
    # a hand-built feature has no clip range (low=-inf, high=inf): a logit beyond -709 overflowed math.exp
    estimator = RiskEstimator([FeatureSpec("x")], [-1.0], 0.0)
    profile = {"x": value}
    assert estimator.predict_proba(profile) == pytest.approx(expected, abs=1e-300)
    assert estimator.assess(profile).probability == pytest.approx(expected, abs=1e-300)
    with np.errstate(over="raise"):
        assert estimator.predict_proba_rows([profile]).tolist() == [pytest.approx(expected, abs=1e-300)]


def test_a_layer_at_the_gate_is_not_informative():
    from types import SimpleNamespace

    rule = DecisionRule()
    at = SimpleNamespace(nonlinearity=rule.max_nonlinearity, degenerate=False, update_ratio=1.0)
    below = SimpleNamespace(nonlinearity=rule.max_nonlinearity - 1e-9, degenerate=False, update_ratio=1.0)
    assert not rule.is_informative(at) and rule.is_informative(below)  # "at or above it are not informative"


def test_the_verdicts_sample_is_that_of_a_layer_it_reads():
    from types import SimpleNamespace

    from hf_koopman.koopman.features import LayerFeatures

    def layer(eta: float) -> LayerFeatures:
        return LayerFeatures(near_unit_mass=0.2, unstable_mass=0.8, contractive_mass=0.0, mid_mass=0.0,
                             spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=eta, kreiss=math.inf,
                             n_modes=64, n_reliable=64, degenerate=False)

    # layer 1 is the least sampled but not read (eta_nl above the gate): the verdict's N/d is layer 0's
    profile = SimpleNamespace(features=[layer(0.3), layer(0.95)], sample_sizes=[(1000, 64), (200, 64)],
                              settings={"rank": None})
    rule = DecisionRule()
    assert rule.reads(profile) == [True, False]
    assert rule.verdict_layer(profile) == 0 and rule.verdict_sample(profile) == (1000, 64)


def test_pretrained_weights_in_the_estimators_range_get_the_calibrated_advice():
    from hf_koopman.risk import RiskAssessment, recommendation

    high = RiskAssessment(probability=0.3, out_of_range=False, learning_rate=0.01)
    advice = recommendation("safe", high, pretrained=True)
    assert "lower" in advice and "30" in advice  # the in-range probability decides, not the generic pretrained text
    outside = RiskAssessment(probability=0.3, out_of_range=True, learning_rate=0.01)
    assert recommendation("safe", outside, pretrained=True) != advice


@pytest.mark.parametrize("coef, intercept, crossing", [(1.0, -5.0, 5.0 + math.log(0.1 / 0.9)),
                                                       (1e8, -1.0 + math.log(0.1 / 0.9), 1e-8)],
                         ids=["above-1", "below-1e-6"])
def test_a_learning_rate_read_as_is_crosses_anywhere_in_the_searched_decades(coef, intercept, crossing):
    # the learning rate as an identity feature: no closed form, the crossing is searched on [1e-10, 1e3]
    estimator = RiskEstimator([FeatureSpec("learning_rate")], [coef], intercept)
    assert estimator.learning_rate_at_risk({}, risk=0.1) == pytest.approx(crossing, rel=1e-3)


def _planted_growth(factor: float):
    """Three layers whose linear map scales one of 16 directions by `factor` and halves the others."""
    from hf_koopman.profiling import profile_from_snapshots

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g)
    A = torch.eye(16) * 0.5
    A[0, 0] = factor
    pairs = [(f"layer.{i}", X, X @ A.T + 1e-3 * torch.randn(512, 16, generator=g)) for i in range(3)]
    return profile_from_snapshots(pairs, progress=False)


def test_a_blown_up_spectral_radius_is_named_as_outside_the_rule():
    blown = _planted_growth(1e29)  # weights that diverged: M≈1 = 0 reads "safe" by the paper's rule alone
    assert blown.verdict == "safe"
    assert blown.rule.beyond_radius(blown)[0] == ("layer.0", pytest.approx(1e29, rel=1e-6))
    assert "caution: 3 layers read amplify some direction more than 100-fold (ρ = 1e+29" in blown.verdict_reason
    assert "does not cover this model" in blown.verdict_reason
    ordinary = _planted_growth(50.0)  # large, but within 100-fold
    assert ordinary.rule.beyond_radius(ordinary) == [] and "caution" not in ordinary.verdict_reason
    blown.rule = DecisionRule(max_spectral_radius=math.inf)  # switched off
    assert "caution" not in blown.verdict_reason
    with pytest.raises(ValueError, match="max_spectral_radius must be >= 1"):
        DecisionRule(max_spectral_radius=0.5)


def test_the_report_shows_an_uninformative_probability_without_the_warning(caplog):
    """The report states the caveat next to the number itself; the warning is for callers who do not."""
    import logging

    from hf_koopman.profiling import profile
    from hf_koopman.profiling.report import render_report
    from hf_koopman.risk import _warn_once
    from hf_koopman.testing_utils import tiny_model

    _warn_once.cache_clear()
    result = profile(tiny_model("gpt2"), num_samples=16, learning_rate=1e-2, progress=False)  # N/d = 0.5
    assert result.verdict == "uninformative"
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        report = render_report(result)
    assert "predict_proba" not in caplog.text and "uninformative" in report
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        result.risk_probability()  # a direct call still says it
    assert "predict_proba: the profile is uninformative" in caplog.text


def test_a_nan_spectral_radius_is_outside_the_rule_too_and_a_short_input_caution_names_inputs():
    import dataclasses

    blown = _planted_growth(1e29)
    name, features = blown.layers[0]
    blown.layers[0] = (name, dataclasses.replace(features, spectral_radius=float("nan")))  # an edited profile.json
    assert [n for n, _ in blown.rule.beyond_radius(blown)][:1] == ["layer.0"]
    rule = DecisionRule()
    _, asked = rule.decide(0.2, 10.0, num_samples=3072, hidden_size=768, informative=4, total=4)
    _, short = rule.decide(0.2, 10.0, num_samples=1126, hidden_size=256, informative=4, total=4, tokens_seen=1126)
    assert "(N >= 6144 token states remove it)" in asked
    assert "(N >= 2048 token states remove it: more inputs, the inputs gave all they had)" in short
