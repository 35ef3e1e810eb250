"""`suggest_max_lr`, `hf-koopman max-lr`, and the range flag in `SpectralProfile` (risk assessment, report, JSON)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import hf_koopman
from hf_koopman.cli import main
from hf_koopman.max_lr import SUGGESTION_VERDICTS, MaxLRSuggestion, suggest_max_lr
from hf_koopman.profiling import profile
from hf_koopman.risk import FeatureSpec, RiskEstimator
from hf_koopman.testing_utils import tiny_model

N = 128  # token states: N / d = 4 for the tiny models (d = 32)


def _estimator(lr_range=(1e-5, 0.1), **kw) -> RiskEstimator:
    """Known coefficients: logit = -1 + 2 (log10 lr + 3) / 0.5 + (M≈1 - 0.5) / 0.25."""
    ranges = {"inputs": {"learning_rate": {"min": lr_range[0], "max": lr_range[1]},
                         "near_unit_mass_mean": {"min": 0.0, "max": 1.0}, "model_type": {"values": ["llama"]}}}
    return RiskEstimator(
        [FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5, low=-5.0, high=-1.0),
         FeatureSpec("near_unit_mass_mean", mean=0.5, std=0.25, low=0.0, high=1.0)],
        coef=[2.0, 1.0], intercept=-1.0, training_ranges=ranges, **kw,
    )


def _expected_lr(m: float, risk: float) -> float:
    z = (min(max(m, 0.0), 1.0) - 0.5) / 0.25
    return 10 ** (-3.0 + 0.5 * (math.log(risk / (1 - risk)) + 1.0 - z) / 2.0)


@pytest.fixture(scope="module")
def tiny_profile():
    prof = profile(tiny_model("llama", num_hidden_layers=2), num_samples=N, model_name="tiny-llama")
    assert prof.verdict != "uninformative", prof.verdict_reason  # precondition of the tests below
    return prof


def test_public_names():
    assert hf_koopman.suggest_max_lr is suggest_max_lr and hf_koopman.MaxLRSuggestion is MaxLRSuggestion
    assert hf_koopman.RiskAssessment.__name__ == "RiskAssessment"


def test_suggest_max_lr_returns_the_analytic_learning_rate(tiny_profile):
    m = tiny_profile.aggregates["near_unit_mass_mean"]
    s = suggest_max_lr(tiny_profile, risk=0.1, estimator=_estimator())
    assert s.verdict == "suggested" and s.model_name == "tiny-llama"
    assert s.max_learning_rate == pytest.approx(_expected_lr(m, 0.1), rel=1e-12)
    assert s.out_of_range is False and not s.outside and not s.unknown  # lr, M≈1 and model type all recorded
    assert s.interval is None and "neither a coefficient covariance nor bootstrap" in s.interval_method
    text = s.describe()
    assert "interval: unavailable" in text and "within the fitted range" in text
    data = json.loads(json.dumps(s.to_dict()))
    assert data["max_learning_rate"] == s.max_learning_rate and data["interval"] is None


def test_profile_of_pretrained_weights_gets_the_extrapolation_caveat_first(tiny_profile):
    import copy

    pretrained = copy.deepcopy(tiny_profile)
    pretrained.meta["weights"] = "pretrained"
    for prof, first_is_caveat in ((tiny_profile, False), (pretrained, True)):
        s = suggest_max_lr(prof, risk=0.1, estimator=_estimator())
        assert s.caveats[0].startswith("extrapolated: these are pretrained weights") is first_is_caveat
        assert sum(c.startswith("extrapolated") for c in s.caveats) == int(first_is_caveat)
    assert tiny_profile.meta.get("weights") == "init"  # the fixture is untouched


def test_a_partly_random_or_partly_run_model_gets_a_caveat(tiny_profile):
    import copy

    partial = copy.deepcopy(tiny_profile)
    partial.meta.update(weights_not_in_checkpoint=["layers.1.mlp.weight"], blocks_not_run=["vision.layers.0"],
                        num_blocks=3)
    caveats = suggest_max_lr(partial, risk=0.1, estimator=_estimator()).caveats
    assert any(c.startswith("partly random: 1 weights") for c in caveats)
    assert any(c.startswith("partial: the inputs did not reach 1 of the 3 residual blocks") for c in caveats)
    assert not any(c.startswith("partly random") or c.startswith("partial:")
                   for c in suggest_max_lr(tiny_profile, risk=0.1, estimator=_estimator()).caveats)


def test_suggest_max_lr_is_monotone_in_risk(tiny_profile):
    est = _estimator(coef_cov=[[0.04, 0, 0], [0, 0.01, 0], [0, 0, 0.01]])
    risks = [0.01, 0.05, 0.1, 0.3, 0.6]
    out = [suggest_max_lr(tiny_profile, risk=r, estimator=est) for r in risks]
    lrs = [s.max_learning_rate for s in out]
    assert all(a < b for a, b in zip(lrs, lrs[1:])), lrs
    for s in out:
        low, high = s.interval
        assert low < s.max_learning_rate < high and "covariance" in s.interval_method


def test_model_and_profile_give_the_same_answer(tiny_profile):
    direct = suggest_max_lr(tiny_model("llama", num_hidden_layers=2), risk=0.1, estimator=_estimator(),
                            num_samples=N, model_name="tiny-llama")
    assert direct.max_learning_rate == pytest.approx(
        suggest_max_lr(tiny_profile, risk=0.1, estimator=_estimator()).max_learning_rate, rel=1e-9)
    with pytest.raises(ValueError, match="solves for the learning rate"):
        suggest_max_lr(tiny_model("llama"), learning_rate=1e-3, estimator=_estimator())
    with pytest.raises(ValueError, match="already a SpectralProfile"):
        suggest_max_lr(tiny_profile, num_samples=64, estimator=_estimator())


def test_answer_outside_the_learning_rate_range_is_flagged(tiny_profile):
    s = suggest_max_lr(tiny_profile, risk=0.1, estimator=_estimator(lr_range=(1e-2, 1e-1)))
    assert s.verdict == "suggested" and s.max_learning_rate < 1e-2  # the analytic answer lies in [1.6e-4, 1.6e-3]
    assert s.out_of_range is True and s.outside[0].key == "learning_rate" and s.outside[0].direction == "below"
    assert any("extrapolates the logistic" in c for c in s.caveats)
    # an estimator that clips the rate to that range reads another risk at the answer, and says so
    clipping = RiskEstimator(
        [FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5, low=-2.0, high=-1.0),
         FeatureSpec("near_unit_mass_mean", mean=0.5, std=0.25, low=0.0, high=1.0)],
        coef=[2.0, 1.0], intercept=-1.0, training_ranges=_estimator(lr_range=(1e-2, 1e-1)).training_ranges)
    clipped = suggest_max_lr(tiny_profile, risk=0.1, estimator=clipping)
    assert any("the estimator's own reading at that rate" in c and "not 10%" in c for c in clipped.caveats)
    assert not any("own reading" in c for c in s.caveats)  # this one does not clip there: no such clause
    assert "outside the fitted range: learning_rate" in s.describe()
    from dataclasses import replace

    for out_of_range in (True, False):  # the interval's meaning is said where the answer is an extrapolation
        shown = replace(s, interval=(1e-3, 2e-3), interval_method="bootstrap", out_of_range=out_of_range)
        interval = next(line for line in shown.describe().splitlines() if line.startswith("  interval:"))
        assert ("not the error of reading it outside the fitted range" in interval) is out_of_range


def test_other_model_type_is_flagged(tiny_profile):
    est = _estimator()
    est.training_ranges["inputs"]["model_type"] = {"values": ["gpt2"]}
    s = suggest_max_lr(tiny_profile, risk=0.1, estimator=est)
    assert s.out_of_range is True and [i.key for i in s.outside] == ["model_type"]
    assert any("extrapolation to a model unlike" in c for c in s.caveats)


def test_uninformative_profile_gives_no_learning_rate():
    prof = profile(tiny_model("llama", num_hidden_layers=2), num_samples=16)  # N / d = 0.5: uninformative
    assert prof.verdict == "uninformative"
    s = suggest_max_lr(prof, risk=0.1, estimator=_estimator())
    assert s.verdict == "uninformative" and s.max_learning_rate is None and "N = 16" in s.reason
    assert "no max learning rate (uninformative)" in s.describe()
    wide = _estimator()
    wide.training_ranges["inputs"]["model_type"] = {"values": ["gpt2"]}  # the model also lies outside the runs
    text = suggest_max_lr(prof, risk=0.1, estimator=wide).describe()
    assert "range: the model lies outside the fitted range: model_type = 'llama'" in text
    # an estimator that does not read the spectrum still answers
    lr_only = RiskEstimator([FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5)], coef=[2.0], intercept=-1.0)
    answer = suggest_max_lr(prof, risk=0.1, estimator=lr_only)
    assert answer.verdict == "suggested" and answer.max_learning_rate == pytest.approx(
        10 ** (-3.0 + 0.5 * (math.log(1 / 9) + 1.0) / 2.0), rel=1e-12)
    assert answer.out_of_range is None and "learning_rate" in answer.unknown  # that estimator records no ranges


def test_no_crossing_is_reported(tiny_profile):
    falling = RiskEstimator([FeatureSpec("learning_rate", "log10")], coef=[-1.0], intercept=0.0)
    s = suggest_max_lr(tiny_profile, risk=0.1, estimator=falling)
    assert s.verdict == "no crossing" and s.max_learning_rate is None and "does not grow with the learning rate" in (
        s.reason)
    assert set(SUGGESTION_VERDICTS) == {"suggested", "no crossing", "uninformative"}


# ---------------------------------------------------------------------------------------------------- SpectralProfile
def test_profile_risk_assessment_report_and_json_flag_lr_50(tiny_profile):
    a = tiny_profile.risk_assessment(learning_rate=50.0)
    assert a is not None and a.out_of_range is True and a.outside[0].key == "learning_rate"
    assert a.probability == tiny_profile.risk_probability(learning_rate=50.0)
    at_50 = dataclasses.replace(tiny_profile, meta={**tiny_profile.meta, "learning_rate": 50.0})
    assert "outside the fitted range: learning_rate = 50" in at_50.to_markdown()
    data = json.loads(at_50.to_json())
    assert data["risk_assessment"]["out_of_range"] is True and data["risk"] == a.probability
    assert json.loads(tiny_profile.to_json())["risk_assessment"] is None  # no learning rate: no probability


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_model("llama", num_hidden_layers=2, head=False).save_pretrained(folder)
    return folder


def test_cli_max_lr_json_matches_the_python_api(saved_model, tmp_path, capsys):
    from transformers import AutoModel

    est_path = _estimator().save_json(tmp_path / "est.json")
    code = main(["max-lr", str(saved_model), "--num-samples", str(N), "--estimator", str(est_path), "--json",
                 "--no-progress"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    prof = profile(AutoModel.from_pretrained(saved_model), num_samples=N)
    expected = _expected_lr(prof.aggregates["near_unit_mass_mean"], 0.1)
    assert data["verdict"] == "suggested" and data["max_learning_rate"] == pytest.approx(expected, rel=1e-9)
    assert data["model_name"] == "tiny-llama" and data["risk"] == 0.1
    # a saved checkpoint: its weights are not an initialisation, the only input outside the training runs
    assert data["out_of_range"] is True and [i["key"] for i in data["outside"]] == ["weights"]
    assert data["caveats"][0].startswith("extrapolated: these are pretrained weights")


def test_learning_rate_in_context_is_refused_with_the_reason(tiny_profile, saved_model, capsys):
    with pytest.raises(ValueError, match="solves for the learning rate"):
        suggest_max_lr(tiny_profile, estimator=_estimator(), context={"learning_rate": 0.1})
    assert main(["max-lr", str(saved_model), "--context", "learning_rate=0.1", "--no-progress"]) == 2
    assert "drop learning_rate from --context" in capsys.readouterr().err


def test_uninformative_or_non_init_profiles_are_not_called_in_range(tiny_profile):
    import copy

    est = _estimator()
    assert est.assess(tiny_profile, learning_rate=1e-3).out_of_range is False
    for weights in ("pretrained", "trained"):
        other = copy.deepcopy(tiny_profile)
        other.meta["weights"] = weights
        assessment = est.assess(other, learning_rate=1e-3)
        assert assessment.out_of_range is True and [i.key for i in assessment.outside] == ["weights"]
        assert "outside the fitted range: the weights are not an initialisation" in assessment.describe()
        assert "clipped" not in assessment.describe()  # nothing is clipped for the weights
    short = profile(tiny_model("llama", num_hidden_layers=2), num_samples=40)  # N/d = 1.25 < 2
    assert short.verdict == "uninformative"
    assessment = est.assess(short, learning_rate=1e-3)
    assert assessment.out_of_range is None and "the spectrum is uninformative" in assessment.describe()
    assert any("uninformative" in u for u in assessment.unknown)


def test_cli_max_lr_text_with_the_shipped_estimator(saved_model, capsys):
    assert main(["max-lr", str(saved_model), "--num-samples", str(N), "--risk", "0.2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-llama: ") and "range: " in out
    # the shipped estimator records the model types it was fitted on (llama among them): the range line says in or out
    assert "llama" in RiskEstimator.default().training_ranges["inputs"]["model_type"]["values"]
    assert "ranges unknown" not in out and ("within the fitted range" in out or "outside the fitted range" in out)


def test_cli_max_lr_errors(saved_model, tmp_path, capsys):
    assert main(["max-lr", str(saved_model), "--risk", "1.5"]) == 2
    assert "--risk must be a probability" in capsys.readouterr().err
    assert main(["max-lr", str(saved_model), "--context", "norm"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"format": "hf_koopman.risk_estimator", "version": 7}))
    assert main(["max-lr", str(saved_model), "--estimator", str(tmp_path / "bad.json")]) == 2
    assert "upgrade" in capsys.readouterr().err


def test_risk_levels_print_with_the_digits_they_need(tiny_profile):
    text = suggest_max_lr(tiny_profile, risk=0.025, estimator=_estimator()).describe()
    assert "at 2.5% divergence risk" in text
    assert "at 0.1% divergence risk" in suggest_max_lr(tiny_profile, risk=0.001, estimator=_estimator()).describe()
    from hf_koopman.max_lr import _risk_text

    assert _risk_text(0.999999) == "99.9999%" and _risk_text(0.9995) == "99.95%"  # never a rounded 100%


def test_pretrained_profiles_get_one_caveat_and_keep_their_flag_when_uninformative(tiny_profile):
    import copy

    pretrained = copy.deepcopy(tiny_profile)
    pretrained.meta["weights"] = "pretrained"
    s = suggest_max_lr(pretrained, estimator=_estimator())
    assert not any("lies outside the training runs in" in c for c in s.caveats)  # only the weights are outside
    short = profile(tiny_model("llama", num_hidden_layers=2), num_samples=40)
    short.meta["weights"] = "pretrained"
    s = suggest_max_lr(short, estimator=_estimator())
    assert s.verdict == "uninformative" and s.out_of_range is True and [i.key for i in s.outside] == ["weights"]


def test_context_weights_override_the_profile_and_a_spectrum_free_estimator_ignores_the_verdict(tiny_profile):
    est = _estimator()
    assert est.check_ranges(tiny_profile, 1e-3, weights="pretrained")[0] is True
    lr_only = RiskEstimator([FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5, low=-5.0, high=-1.0)],
                            coef=[2.0], intercept=-1.0,
                            training_ranges={"inputs": {"learning_rate": {"min": 1e-5, "max": 0.1},
                                                        "model_type": {"values": ["llama"]}}})
    short = profile(tiny_model("llama", num_hidden_layers=2), num_samples=40)
    assert short.verdict == "uninformative"
    assert lr_only.check_ranges(short, 1e-3) == (False, (), ())


def test_the_shipped_estimator_carries_its_held_out_accuracy(tiny_profile):
    for estimator in (None, RiskEstimator.default()):
        s = suggest_max_lr(tiny_profile, estimator=estimator)
        if s.verdict == "suggested":
            assert any("28 % of inits at risk 0.1" in c for c in s.caveats)
    assert not any("28 %" in c for c in suggest_max_lr(tiny_profile, estimator=_estimator()).caveats)


def test_unknown_ranges_are_listed_once():
    import torch

    from hf_koopman import profile
    from hf_koopman.max_lr import suggest_max_lr
    from hf_koopman.testing_utils import tiny_model

    prof = profile(tiny_model("llama", dtype=torch.float16), num_samples=128, progress=False)
    text = suggest_max_lr(prof).describe()
    assert text.count("ranges unknown for") <= 1, text


def test_a_model_wider_than_the_training_runs_is_named_in_the_answer_and_its_caveat(tiny_profile):
    ranges = {"inputs": {"learning_rate": {"min": 1e-5, "max": 0.1}, "near_unit_mass_mean": {"min": 0.0, "max": 1.0},
                         "model_type": {"values": ["llama"]}, "hidden_size": {"min": 4.0, "max": 8.0}}}
    est = _estimator()
    narrow = RiskEstimator(est.features, coef=est.coef, intercept=est.intercept, training_ranges=ranges)
    s = suggest_max_lr(tiny_profile, estimator=narrow)
    assert s.out_of_range and [i.key for i in s.outside] == ["hidden_size"]
    assert "(extrapolated: outside the fitted range, see below)" in s.describe().splitlines()[0]
    caveat = next(c for c in s.caveats if "lies outside the training runs in" in c)
    assert "its hidden_size" in caveat and "clipped" not in caveat  # hidden_size is not an input of the estimator
