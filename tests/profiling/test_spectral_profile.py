"""SpectralProfile: decision rule, serialisation round trip, report, plots, risk hook."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch

import hf_koopman
from hf_koopman.profiling import DecisionRule, SpectralProfile, profile
from hf_koopman.risk import ADVICE, VERDICT_LEVELS, VERDICTS, RiskEstimator
from hf_koopman.testing_utils import tiny_model


@pytest.fixture(scope="module")
def tiny_profile() -> SpectralProfile:
    return profile(tiny_model("llama", num_hidden_layers=3), num_samples=128, model_name="tiny-llama")


@pytest.mark.parametrize(
    ("score", "kappa", "verdict"),
    [
        (0.10, 5.0, "safe"),
        (0.29, 99.0, "safe"),
        (0.10, 1e4, "safe"),  # κ(V) is reported, not used, by default (it separates nothing on the full spectrum)
        (0.30, 5.0, "moderate"),
        (0.50, 5.0, "moderate"),
        (0.51, 5.0, "high risk"),
        (None, None, "uninformative"),
    ],
)
def test_decision_rule(score, kappa, verdict):
    assert DecisionRule().decide(score, kappa)[0] == verdict


def test_decision_rule_thresholds_are_configurable():
    assert DecisionRule(kappa_large=1000.0).decide(0.1, 150.0)[0] == "safe"
    assert DecisionRule(kappa_large=100.0).decide(0.1, 150.0)[0] == "high risk"
    assert DecisionRule(kappa_large=100.0).decide(0.2, math.inf)[0] == "high risk"


@pytest.mark.parametrize(("num_samples", "hidden", "verdict"), [(66, 64, "uninformative"), (2, 4, "uninformative"),
                                                                 (127, 64, "uninformative"), (128, 64, "safe")])
def test_too_few_samples_for_the_width_is_uninformative(num_samples, hidden, verdict):
    got, reason = DecisionRule().decide(0.1, 5.0, num_samples=num_samples, hidden_size=hidden)
    assert got == verdict
    if verdict == "safe":
        assert "caution: N/d = 2.00" in reason  # within a few multiples of d: a warning in the reason


def test_mostly_nonlinear_or_degenerate_layers_make_the_verdict_uninformative():
    assert DecisionRule().decide(0.1, 5.0, informative=1, total=4)[0] == "uninformative"
    assert DecisionRule().decide(0.1, 5.0, informative=2, total=4)[0] == "safe"


def test_one_rule_behind_every_public_name(tiny_profile):
    assert hf_koopman.DecisionRule is DecisionRule is hf_koopman.risk.DecisionRule
    assert set(VERDICTS) == set(VERDICT_LEVELS) == set(ADVICE)
    assert tiny_profile.verdict in VERDICTS
    assert f"Recommendation: {ADVICE[tiny_profile.verdict]}" in tiny_profile.to_markdown()
    # the profile reads its layers through its rule: a rule that trusts no linear fit leaves nothing to judge
    strict = dataclasses.replace(tiny_profile, rule=DecisionRule(max_nonlinearity=0.0))
    assert strict.informative_layers == [] and strict.score is None and strict.verdict == "uninformative"
    assert set(tiny_profile.informative_layers) <= set(tiny_profile.names)


def test_json_round_trip(tiny_profile, tmp_path):
    text = tiny_profile.to_json()
    data = json.loads(text)
    assert data["verdict"] == tiny_profile.verdict and len(data["layers"]) == 3
    restored = SpectralProfile.from_json(text)
    assert restored.names == tiny_profile.names
    assert restored.aggregates == pytest.approx(tiny_profile.aggregates)
    assert [f.to_dict() for f in restored.features] == [f.to_dict() for f in tiny_profile.features]
    for a, b in zip(restored.eigenvalues, tiny_profile.eigenvalues):
        assert a == pytest.approx(b)
    written = tiny_profile.save(tmp_path)
    assert SpectralProfile.from_json(written["profile"]).verdict == tiny_profile.verdict


def test_profiles_compare_with_equals(tiny_profile, tmp_path):
    # "is the profile I reloaded the one I saved?" is `==` (a dataclass `==` compared the NumPy eigenvalue arrays
    # and raised "the truth value of an array ... is ambiguous")
    tiny_profile.save(tmp_path / "p", plots=False)
    restored = SpectralProfile.from_json(tmp_path / "p")
    assert restored == tiny_profile and not restored != tiny_profile
    other = SpectralProfile.from_json(tmp_path / "p")
    other.model_name = "another"
    assert other != tiny_profile
    other = SpectralProfile.from_json(tmp_path / "p")
    other.eigenvalues[0] = other.eigenvalues[0] * 1.01
    assert other != tiny_profile
    assert tiny_profile != "tiny-llama" and tiny_profile == tiny_profile


def test_to_json_file_makes_missing_folders_as_save_does(tiny_profile, tmp_path):
    path = tiny_profile.to_json_file(tmp_path / "runs" / "a" / "profile.json")
    assert SpectralProfile.from_json(path) == tiny_profile


def test_to_json_file_writes_what_from_json_reads(tiny_profile, tmp_path):
    path = tiny_profile.to_json_file(tmp_path / "mine.json")
    assert path == tmp_path / "mine.json" and path.read_text() == tiny_profile.to_json()
    assert SpectralProfile.from_json(path).names == tiny_profile.names
    with pytest.raises(IsADirectoryError, match="use save"):
        tiny_profile.to_json_file(tmp_path)


def test_non_finite_values_survive_json(tiny_profile):
    data = tiny_profile.to_dict()
    data["layers"][0]["eigvec_condition"] = "inf"
    restored = SpectralProfile.from_dict(data)
    assert math.isinf(restored.features[0].eigvec_condition)


def test_save_writes_report_and_plots(tiny_profile, tmp_path):
    pytest.importorskip("matplotlib")
    written = tiny_profile.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"profile.json", "report.md", "eigenvalues.png", "masses.png"}
    assert all(path.stat().st_size > 0 for path in written.values())
    report = (tmp_path / "report.md").read_text()
    assert f"**Verdict: {tiny_profile.verdict.upper()}" in report
    assert "![Spectral masses vs depth](masses.png)" in report
    assert report.count("| `model.layers.") == 3


def test_plot_returns_figure(tiny_profile, tmp_path):
    pytest.importorskip("matplotlib")
    fig = tiny_profile.plot(tmp_path / "both.png")
    assert len(fig.axes) >= 2 and (tmp_path / "both.png").stat().st_size > 0


def test_risk_is_none_without_estimator(tiny_profile, monkeypatch):
    def no_estimator(cls):
        raise FileNotFoundError("no shipped risk estimator")

    monkeypatch.setattr(RiskEstimator, "default", classmethod(no_estimator))
    assert tiny_profile.risk is None
    assert "No calibrated risk: no shipped risk estimator" in tiny_profile.to_markdown()


def test_risk_uses_the_estimator_when_available(tiny_profile, monkeypatch):
    calls = {}

    class FakeEstimator:
        def predict_proba(self, prof, learning_rate=None):
            calls["lr"] = learning_rate
            return 0.25 + prof.aggregates["near_unit_mass_mean"] * 0

        def assess(self, prof, learning_rate=None):
            note = "ranges unknown for: model_type"
            return types.SimpleNamespace(probability=self.predict_proba(prof, learning_rate), range_note=note,
                                         to_dict=lambda: {"note": note})

    monkeypatch.setattr(RiskEstimator, "default", classmethod(lambda cls: FakeEstimator()))
    assert tiny_profile.risk_probability(learning_rate=1e-3) == 0.25 and calls["lr"] == 1e-3
    assert "25.0%** — ranges unknown for: model_type" in tiny_profile.to_markdown()  # the range note follows it


def test_a_rank_r_profile_gets_no_threshold_verdict():
    # the thresholds read the full spectrum; the rank-r masses are biased (M≈1 toward 0), so a low rank-r score must
    # not read as "safe"
    rule = DecisionRule()
    verdict, reason = rule.decide(0.05, 5.0, num_samples=4096, hidden_size=64, informative=3, total=3, rank=8)
    assert verdict == "uninformative" and "rank-8 profile" in reason and "rank=None" in reason
    assert rule.decide(0.05, 5.0, num_samples=4096, hidden_size=64, informative=3, total=3)[0] == "safe"
    prof = hf_koopman.profile(tiny_model("llama"), rank=8, num_samples=512, progress=False)
    assert prof.verdict == "uninformative" and "the thresholds read the full spectrum" in prof.verdict_reason


def test_an_uninformative_rank_r_profile_names_the_truncation():
    prof = hf_koopman.profile(tiny_model("llama"), rank=2, num_samples=512, progress=False)
    assert prof.verdict == "uninformative"
    assert "with rank=2 the linear fit covers 2 of 32 directions" in prof.verdict_reason
    assert "profile the full spectrum (rank=None)" in prof.verdict_reason
    full = hf_koopman.profile(tiny_model("llama"), num_samples=512, progress=False)
    assert "truncation" not in full.verdict_reason


def test_the_report_accounts_for_every_mode():
    import re

    from hf_koopman.profiling.report import render_report

    text = render_report(profile(tiny_model("llama"), num_samples=512, progress=False))
    sentence = next(line for line in text.splitlines() if "of the modes of the whitened block map" in line)
    shares = [int(v) for v in re.findall(r"(\d+)% (?:of the modes|expand|contract|lie in between)", sentence)]
    assert len(shares) == 4 and abs(sum(shares) - 100) <= 2  # near-unit, expanding, contracting, mid band (rounded)
    assert "| M≈1 | M>1 | M<0.80 | mid |" in text and "four columns sum to 1" in text
    # the bands the profile was run with, not the paper's defaults
    custom = render_report(profile(tiny_model("llama"), num_samples=512, progress=False, near_band=(0.95, 1.02),
                                   contractive_below=0.5, residual_tol=0.3))
    assert "0.95 ≤ |λ| ≤ 1.02" in custom and "| M<0.50 | mid |" in custom and "(τ = 0.3)" in custom
    assert "0.90 ≤" not in custom and "τ = 0.1" not in custom


def test_a_rank_r_profile_with_too_few_samples_names_both_fixes():
    reason = DecisionRule().decide(0.4, None, num_samples=100, hidden_size=64, rank=8)[1]
    assert "rank-8 profile" in reason and "rank=None" in reason and "N/d = 1.56 is below 2" in reason


def test_truncating_only_layers_the_verdict_leaves_out_keeps_the_verdict():
    import torch

    from hf_koopman.profiling.profiler import profile_from_snapshots
    from hf_koopman.profiling.report import render_report

    g = torch.Generator().manual_seed(0)

    def snap(n, d, i):
        x = torch.randn(n, d, generator=g)
        return f"layers.{i}", x, 0.5 * x + 0.3 * torch.randn(n, d, generator=g)

    # layers 0, 1 (d = 8, N = 512) get every mode at rank 16; layer 2 (d = 64, N = 64: N/d = 1) is truncated and
    # left out
    snaps = [snap(512, 8, 0), snap(512, 8, 1), snap(64, 64, 2)]
    full, cut = profile_from_snapshots(snaps, progress=False), profile_from_snapshots(snaps, rank=16, progress=False)
    assert cut.rule.truncated(cut) == [False, False, True] and cut.rule.truncated_rank(cut) is None
    assert cut.verdict == full.verdict != "uninformative" and "rank-16 profile" not in cut.verdict_reason
    assert "the verdict reads none of them" in render_report(cut)


def test_the_report_recommends_the_full_spectrum_for_a_rank_r_profile_and_follows_an_in_range_probability(
        in_range_estimator):
    from hf_koopman.risk import ADVICE, RANK_ADVICE

    in_range_estimator(0.002)
    model = tiny_model("llama")
    cut = hf_koopman.profile(model, rank=8, num_samples=512, learning_rate=1e-3, progress=False)
    assert f"Recommendation: {RANK_ADVICE}" in cut.to_markdown()
    assert "The verdict above follows no threshold: the paper's decision rule" in cut.to_markdown()
    no_lr = hf_koopman.profile(model, rank=8, num_samples=512, progress=False)
    assert "this is a rank-8 profile" in no_lr.to_markdown()
    full = hf_koopman.profile(tiny_model("gpt2"), num_samples=512, learning_rate=1e-3, progress=False)
    assert full.verdict != "uninformative"  # precondition: the advice follows the in-range probability
    assert "Recommendation: At learning rate 0.001 the calibrated divergence probability is 0.2%" in full.to_markdown()
    # an uninformative spectrum's probability is no reading of the model: its verdict's advice stands
    blind = hf_koopman.profile(model, num_samples=512, learning_rate=1e-3, progress=False)
    assert blind.verdict == "uninformative"
    assert f"Recommendation: {ADVICE['uninformative']}" in blind.to_markdown()


def test_a_tentative_verdict_keeps_the_calibrated_advice():
    from hf_koopman.risk import ADVICE, recommendation

    prof = hf_koopman.profile(tiny_model("llama"), num_samples=128, learning_rate=0.01, progress=False)
    assert prof.verdict_reason.startswith("tentative") and prof.verdict != "uninformative"  # precondition
    assessment = prof.risk_assessment()
    assert assessment.out_of_range is False  # the shipped estimator's ranges cover this tiny LLaMA and rate
    advice = recommendation(prof.verdict, assessment)
    assert advice != ADVICE[prof.verdict] and advice.startswith("At learning rate 0.01 the calibrated")


def test_a_truncated_layer_that_fails_only_the_gate_withholds_the_verdict():
    import torch

    from hf_koopman.profiling.profiler import profile_from_snapshots

    g = torch.Generator().manual_seed(0)

    def snap(n, d, i, nonlinear):
        x = torch.randn(n, d, generator=g)
        y = x + (torch.tanh(3 * x @ torch.randn(d, d, generator=g)) if nonlinear else 0.3 * x)
        return f"layers.{i}", x, y

    # one layer with its full spectrum (d = 16); three truncated at rank 32 (d = 64, N/d = 8), which the truncation
    # pushes over the η_nl gate: the verdict must say rank, not "profile again after training"
    snaps = [snap(512, 16, 0, False)] + [snap(512, 64, i, True) for i in (1, 2, 3)]
    cut = profile_from_snapshots(snaps, rank=32, progress=False)
    assert cut.rule.truncated(cut) == [False, True, True, True] and cut.rule.truncated_rank(cut) == 32
    assert cut.verdict == "uninformative" and "rank-32 profile" in cut.verdict_reason


def test_json_that_is_not_a_profile_is_named_with_the_fix(tmp_path):
    (tmp_path / "broken.json").write_text("{oops", encoding="utf-8")
    (tmp_path / "other.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    cases = {
        str(tmp_path / "broken.json"): (ValueError, r"broken.json' is not JSON \(Expecting"),
        str(tmp_path / "other.json"): (ValueError, r"other.json' is not a spectral profile \(no 'layers'"),
        '{"layers": 5}': (ValueError, r"the JSON text is not a spectral profile"),
        '{"layers": [{"name": "x", "near_unit_mass": 0.1}]}': (ValueError, r"not a readable spectral profile"),
        str(tmp_path / "missing.json"): (FileNotFoundError, r"neither a JSON object nor an existing file"),
    }
    for source, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            SpectralProfile.from_json(source)
        if error is ValueError:
            with pytest.raises(error, match="SpectralProfile.save"):
                SpectralProfile.from_json(source)


def test_a_saved_rule_this_version_refuses_loads_under_the_default_rule(tiny_profile, caplog):
    import logging

    data = tiny_profile.to_dict()
    data["decision_rule"] = {**data["decision_rule"], "safe_below": 0.9}  # above high_risk_above
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        restored = SpectralProfile.from_dict(data)
    assert restored.rule == DecisionRule() and "is refused" in caplog.text


def test_a_profile_records_its_probe_and_the_version_that_computed_it(tiny_profile, tmp_path):
    import hf_koopman

    assert tiny_profile.meta["probe"] == "default" and tiny_profile.meta["hf_koopman_version"] == hf_koopman.__version__
    given = profile(tiny_model("llama", num_hidden_layers=2), {"input_ids": torch.randint(0, 64, (4, 32))},
                    num_samples=96, progress=False)
    assert given.meta["probe"] == "given"
    tiny_profile.save(tmp_path / "p", plots=False)
    assert SpectralProfile.from_json(tmp_path / "p").meta["hf_koopman_version"] == hf_koopman.__version__


def test_a_saved_verdict_this_version_reads_differently_is_said_on_load(tiny_profile, caplog):
    import logging

    data = tiny_profile.to_dict()
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        SpectralProfile.from_dict(data)
    assert "saved with the verdict" not in caplog.text
    data["verdict"] = next(v for v in ("safe", "high risk") if v != tiny_profile.verdict)
    data["meta"] = {k: v for k, v in data["meta"].items() if k != "hf_koopman_version"}
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        restored = SpectralProfile.from_dict(data)
    assert restored.verdict == tiny_profile.verdict
    assert f"saved with the verdict {data['verdict']!r} (by an earlier hf_koopman)" in caplog.text
