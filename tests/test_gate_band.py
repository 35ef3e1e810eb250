"""The band of the informative gate: layers whose corrected η_nl sits near 0.9 make a verdict tentative when
reading them or not can change it (`DecisionRule.near_gate`, `gate_verdicts`)."""

from __future__ import annotations

import math

import pytest

from hf_koopman.koopman.features import LayerFeatures
from hf_koopman.profiling import SpectralProfile
from hf_koopman.risk import TENTATIVE, DecisionRule


def _features(near: float, eta: float, *, degenerate: bool = False) -> LayerFeatures:
    return LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                         spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=eta, kreiss=float("inf"),
                         n_modes=10, n_reliable=10, degenerate=degenerate)


def _profile(layers: list[tuple[float, float]], n: int = 4096, d: int = 64, **kwargs) -> SpectralProfile:
    """`layers`: (M≈1, in-sample η_nl) per layer, every layer fitted on N = `n` states of width `d`."""
    feats = [(f"layers.{i}", _features(near, eta, **kwargs)) for i, (near, eta) in enumerate(layers)]
    return SpectralProfile(layers=feats, aggregates={}, settings={"num_samples": n, "hidden_size": d, "rank": None})


def _in_sample(corrected: float, n: int, d: int) -> float:
    """The in-sample η_nl whose degrees-of-freedom correction is `corrected`."""
    return corrected / DecisionRule.adjusted_nonlinearity(1.0, n, d)


def test_gate_width_follows_sqrt_d_over_n_and_is_zero_when_unknown():
    rule = DecisionRule()
    assert rule.gate_width(4096, 64) == pytest.approx(0.55 / 8)
    assert rule.gate_width(128, 64) == pytest.approx(0.55 / math.sqrt(2))
    assert rule.gate_width(None, 64) == 0.0 and rule.gate_width(4096, None) == 0.0
    assert DecisionRule(gate_band=0).gate_width(128, 64) == 0.0


def test_near_gate_flags_only_layers_inside_the_band_that_the_gate_decides():
    n, d = 4096, 64  # band ±0.069
    etas = [0.5, 0.85, 0.95, 0.98]
    result = _profile([(0.1, _in_sample(e, n, d)) for e in etas], n, d)
    assert result.rule.near_gate(result) == [False, True, True, False]
    assert result.near_gate_layers == ["layers.1", "layers.2"]
    assert result.to_dict()["near_gate_layers"] == ["layers.1", "layers.2"]
    degenerate = _profile([(0.1, _in_sample(0.88, n, d))], n, d, degenerate=True)
    assert degenerate.rule.near_gate(degenerate) == [False]  # the gate does not decide a degenerate layer


def test_a_verdict_that_near_gate_layers_can_flip_is_tentative_and_names_the_alternative():
    # two clearly read layers with low M≈1 and two near the gate with high M≈1: read or not, they move the score
    # across the 0.3 threshold
    n, d = 4096, 64
    layers = [(0.1, _in_sample(0.5, n, d))] * 2 + [(0.95, _in_sample(0.87, n, d))] * 2
    result = _profile(layers, n, d)
    assert result.rule.gate_verdicts(result) == ("safe", "moderate", "high risk")
    assert result.verdict == "high risk"  # all four read: mean 0.525
    reason = result.verdict_reason
    assert reason.startswith(TENTATIVE)
    assert "2 layers have a corrected η_nl ±0.07 of the 0.9 gate, where it still moves as N grows" in reason
    assert "'safe' or 'moderate'" in reason


def test_near_gate_layers_that_cannot_change_the_verdict_leave_it_firm():
    n, d = 4096, 64
    layers = [(0.1, _in_sample(0.5, n, d))] * 3 + [(0.12, _in_sample(0.88, n, d))]
    result = _profile(layers, n, d)
    assert result.near_gate_layers == ["layers.3"]
    assert result.rule.gate_verdicts(result) == ("safe",)
    assert result.verdict == "safe" and not result.verdict_reason.startswith(TENTATIVE)


def test_an_uninformative_verdict_that_near_gate_layers_could_make_informative_is_tentative():
    # one layer read of three: uninformative; the two others sit just above the gate
    n, d = 4096, 64
    layers = [(0.9, _in_sample(0.5, n, d))] + [(0.9, _in_sample(0.92, n, d))] * 2
    result = _profile(layers, n, d)
    assert result.verdict == "uninformative"
    assert result.rule.gate_verdicts(result) == ("high risk", "uninformative")
    assert result.verdict_reason.startswith(TENTATIVE) and "give 'high risk'" in result.verdict_reason


def test_the_band_narrows_with_more_token_states():
    # the same corrected η_nl (0.86) is near the gate at N/d = 8 (band ±0.19) and not at N/d = 1024 (±0.017)
    d = 64
    for n, expected in ((8 * d, [True]), (1024 * d, [False])):
        result = _profile([(0.2, _in_sample(0.86, n, d))], n, d)
        assert result.rule.near_gate(result) == expected


def test_gate_band_zero_turns_the_band_off():
    n, d = 4096, 64
    layers = [(0.1, _in_sample(0.5, n, d))] * 2 + [(0.95, _in_sample(0.87, n, d))] * 2
    rule = DecisionRule(gate_band=0.0)
    result = SpectralProfile(layers=_profile(layers, n, d).layers, aggregates={}, rule=rule,
                             settings={"num_samples": n, "hidden_size": d, "rank": None})
    assert result.near_gate_layers == [] and "still moves as N grows" not in result.verdict_reason


def test_sample_size_uninformative_verdict_is_not_called_tentative_by_the_gate():
    # N/d < 2: no layer is adequately sampled, so the gate decides none and cannot offer alternatives
    result = _profile([(0.2, 0.3)] * 3, n=96, d=64)
    assert result.verdict == "uninformative" and result.near_gate_layers == []
    assert "still moves as N grows" not in result.verdict_reason


def test_kappa_large_verdict_keeps_high_risk_among_the_alternatives():
    n, d = 4096, 64
    layers = [(0.1, _in_sample(0.5, n, d))] * 2 + [(0.95, _in_sample(0.87, n, d))] * 2
    rule = DecisionRule(kappa_large=10.0)  # every layer's κ(V) is 20: high risk whatever the score
    result = SpectralProfile(layers=_profile(layers, n, d).layers, aggregates={}, rule=rule,
                             settings={"num_samples": n, "hidden_size": d, "rank": None})
    assert result.verdict == "high risk" and not result.verdict_reason.startswith(TENTATIVE)


def test_gate_verdicts_are_exact_over_every_subset():
    # M≈1 of 0.25 and 0.9 near the gate: reading one, both or none gives 0.25 / 0.9 / 0.575 / none, never moderate;
    # the extremes of the mean alone would have listed moderate as well
    n, d = 4096, 64
    result = _profile([(0.25, _in_sample(0.87, n, d)), (0.9, _in_sample(0.87, n, d))], n, d)
    assert result.rule.gate_verdicts(result) == ("safe", "high risk", "uninformative")


def test_gate_verdicts_apply_the_kappa_rule_to_each_subset():
    # κ(V) 20 on every layer and kappa_large=10: every informative reading is high risk, whatever the score
    n, d = 4096, 64
    layers = [(0.1, _in_sample(0.5, n, d))] * 2 + [(0.95, _in_sample(0.87, n, d))] * 2
    result = SpectralProfile(layers=_profile(layers, n, d).layers, aggregates={}, rule=DecisionRule(kappa_large=10.0),
                             settings={"num_samples": n, "hidden_size": d, "rank": None})
    assert result.rule.gate_verdicts(result) == ("high risk",)
    from hf_koopman.profiling.report import render_report

    assert "reading them or not gives the same verdict" in render_report(result)


def test_an_uninformative_tentative_verdict_claims_no_score_threshold():
    from hf_koopman.profiling.report import render_report

    n, d = 512, 64  # N/d = 8: band ±0.19
    layers = [(0.55, _in_sample(0.5, n, d))] + [(0.55, _in_sample(0.95, n, d))] * 2
    result = _profile(layers, n, d)
    assert result.verdict == "uninformative" and result.verdict_reason.startswith(TENTATIVE)
    assert result.rule.score_band_crossed(result) == ()
    report = render_report(result)
    assert "spans the" not in report and "so the verdict is tentative" in report


def test_a_profile_json_from_a_newer_version_loads_without_its_unknown_rule_fields(tmp_path, caplog):
    import json

    result = _profile([(0.1, 0.3)] * 2)
    data = json.loads(result.to_json())
    data["decision_rule"]["a_future_field"] = 1.0
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    loaded = SpectralProfile.from_json(path)
    assert loaded.rule == DecisionRule() and loaded.verdict == result.verdict
    assert "a_future_field" in caplog.text
