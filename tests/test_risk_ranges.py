"""RiskEstimator v2: training ranges in the JSON, the out-of-range flag, the learning rate at a given risk and its
interval, and version-1 compatibility."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from hf_koopman.risk import FORMAT_VERSION, FeatureSpec, RiskAssessment, RiskEstimator


def _rows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(n):
        lr = 10 ** rng.uniform(-3.5, -1)
        m = rng.uniform(0.1, 0.9)
        logit = 3.0 * (math.log10(lr) + 2.2) + 4.0 * (m - 0.5)
        rows.append({"learning_rate": lr, "near_unit_mass_mean": m, "model_type": rng.choice(["gpt2", "llama"]),
                     "hidden_size": int(rng.choice([32, 48])), "num_layers": int(rng.choice([2, 4]))})
        labels.append(int(rng.uniform() < 1 / (1 + math.exp(-logit))))
    return rows, labels


@pytest.fixture(scope="module")
def fitted():
    rows, y = _rows()
    return RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"], l2=0.1,
                             families=["tiny gpt2", "tiny llama"], n_bootstrap=20), rows


def _logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------------- JSON round trip
def test_training_ranges_round_trip_through_json(fitted, tmp_path):
    est, rows = fitted
    lrs = [r["learning_rate"] for r in rows]
    ranges = est.training_ranges["inputs"]
    assert ranges["learning_rate"] == {"min": min(lrs), "max": max(lrs)}
    assert ranges["model_type"] == {"values": ["gpt2", "llama"]}
    assert ranges["hidden_size"] == {"min": 32.0, "max": 48.0} and ranges["num_layers"] == {"min": 2.0, "max": 4.0}
    assert est.training_ranges["families"] == ["tiny gpt2", "tiny llama"] and est.training_ranges["n_rows"] == 300
    assert est.learning_rate_range == (min(lrs), max(lrs))

    path = est.save_json(tmp_path / "est.json")
    data = json.loads(path.read_text())
    assert data["version"] == FORMAT_VERSION == 2
    assert [f["name"] for f in data["features"]] == ["log10(learning_rate)", "near_unit_mass_mean"]
    assert [f["coef"] for f in data["features"]] == est.coef  # named features carry their coefficient
    assert data["coef_covariance"]["order"] == ["intercept", "log10(learning_rate)", "near_unit_mass_mean"]
    again = RiskEstimator.from_json(path)
    assert again.training_ranges == est.training_ranges
    np.testing.assert_allclose(again.coef_cov, est.coef_cov)
    np.testing.assert_allclose(again.bootstrap_coefs, est.bootstrap_coefs)
    np.testing.assert_allclose(again.predict_proba_rows(rows), est.predict_proba_rows(rows))
    probe = {"near_unit_mass_mean": 0.5, "model_type": "llama", "hidden_size": 32, "num_layers": 2}
    loaded, fitted_here = again.assess(probe, learning_rate=0.5), est.assess(probe, learning_rate=0.5)
    assert dataclasses.replace(loaded, estimator=None) == dataclasses.replace(fitted_here, estimator=None)
    assert (loaded.estimator, fitted_here.estimator) == (str(path), "custom")  # each says where it came from


def test_fit_stores_the_laplace_covariance(fitted):
    est, rows = fitted
    cov = np.asarray(est.coef_cov)
    assert cov.shape == (3, 3) and np.all(np.linalg.eigvalsh(cov) > 0)
    # the bootstrap spread of the learning-rate coefficient is of the same order as the Laplace standard error
    boot_sd = np.std(np.asarray(est.bootstrap_coefs)[:, 1])
    assert 0.3 < boot_sd / math.sqrt(cov[1, 1]) < 3.0


# ---------------------------------------------------------------------------------------------------- range flag
def test_learning_rate_100x_above_the_range_is_flagged(fitted):
    est, _ = fitted
    lr_max = est.learning_rate_range[1]
    model = {"near_unit_mass_mean": 0.5, "model_type": "llama", "hidden_size": 32, "num_layers": 2}
    inside = est.assess(model, learning_rate=lr_max / 10)
    assert inside.out_of_range is False and inside.status == "within the fitted range" and not inside.outside
    far = est.assess(model, learning_rate=100 * lr_max)
    assert isinstance(far, RiskAssessment) and far.out_of_range is True
    (issue,) = far.outside
    assert issue.key == "learning_rate" and issue.direction == "above" and issue.log_scale
    assert issue.excess == pytest.approx(2.0, abs=1e-9)  # decades
    assert "outside the fitted range: learning_rate" in far.describe()
    # the probability itself is the clipped one, as predict_proba gives it
    assert far.probability == est.predict_proba(model, learning_rate=100 * lr_max)


def test_model_outside_the_training_runs_is_flagged(fitted):
    est, _ = fitted
    base = {"near_unit_mass_mean": 0.5, "model_type": "llama", "hidden_size": 32, "num_layers": 2}
    wide = est.assess({**base, "hidden_size": 4096}, learning_rate=1e-2)
    assert wide.out_of_range is True and [i.key for i in wide.outside] == ["hidden_size"]
    assert wide.outside[0].excess == pytest.approx(4096 - 48)
    other = est.assess({**base, "model_type": "mamba"}, learning_rate=1e-2)
    assert other.out_of_range is True and other.outside[0].direction == "unseen"
    assert "mamba" in other.range_note and "gpt2, llama" in other.range_note
    feature = est.assess({**base, "near_unit_mass_mean": 0.99}, learning_rate=1e-2)
    assert [i.key for i in feature.outside] == ["near_unit_mass_mean"]


def test_an_optimizer_the_runs_did_not_train_with_is_outside():
    """Recorded as a range (`fit(range_keys=...)`), the optimizer is checked where a profile or the context names it:
    every AdamW implementation is the runs' optimizer, SGD is outside; a profile that names none is not flagged."""
    from hf_koopman.risk import MODEL_KEYS, optimizer_family

    rows, y = _rows()
    rows = [dict(r, optimizer="adamw") for r in rows]
    est = RiskEstimator.fit(rows, y, [("learning_rate", "log10"), "near_unit_mass_mean"], l2=0.1,
                            range_keys=(*MODEL_KEYS, "optimizer"))
    inside = {"near_unit_mass_mean": 0.5, "model_type": "gpt2", "hidden_size": 32, "num_layers": 2}
    assert est.training_ranges["inputs"]["optimizer"] == {"values": ["adamw"]}
    assert not est.assess(inside, 1e-2).out_of_range
    assert not est.assess(inside, 1e-2, optimizer="adamw_torch_fused").out_of_range
    sgd = est.assess(inside, 1e-2, optimizer="sgd")
    assert sgd.out_of_range and [i.key for i in sgd.outside] == ["optimizer"]
    assert "optimizer = 'sgd' (fitted on adamw)" in sgd.describe()
    assert optimizer_family("adamw_8bit") == "adamw" and optimizer_family("adafactor") == "adafactor"
    assert optimizer_family("paged_adamw_32bit") == "adamw"
    assert optimizer_family("schedule_free_adamw") == "schedule_free_adamw"  # another update rule


def test_naming_the_optimizer_keeps_the_weights_unknown_note():
    """A profile that cannot say whether its weights are an initialisation keeps that note whatever the optimizer."""
    from hf_koopman.profiling import SpectralProfile

    rows, y = _rows()
    est = RiskEstimator.fit([dict(r, optimizer="adamw") for r in rows], y,
                            [("learning_rate", "log10"), "near_unit_mass_mean"], l2=0.1,
                            range_keys=("model_type", "hidden_size", "num_layers", "optimizer"))
    prof = SpectralProfile(layers=[], aggregates={"near_unit_mass_mean": 0.5}, meta={"model_type": "gpt2"})
    for optim in ("adamw_torch", "sgd"):
        assert "weights (origin unknown)" in est.assess(prof, 1e-2, optimizer=optim).unknown, optim


def test_missing_ranges_say_unknown_not_in_range(fitted):
    est, _ = fitted
    not_given = est.assess({"near_unit_mass_mean": 0.5}, learning_rate=1e-2)  # no model type / width / depth given
    assert not_given.out_of_range is None and not_given.status == "ranges unknown"
    assert "model_type (not given)" in not_given.unknown and "ranges unknown for" in not_given.range_note
    hand = RiskEstimator([FeatureSpec("learning_rate", "log10")], [1.0], 0.0)  # hand-built: no ranges at all
    a = hand.assess(learning_rate=1e-3)
    assert a.out_of_range is None and set(a.unknown) == {"learning_rate", "model_type"}
    assert "within" not in a.describe()


# ---------------------------------------------------------------------------------------------------- lr at risk
HAND = RiskEstimator(
    [FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5, low=-5.0, high=-1.0),
     FeatureSpec("near_unit_mass_mean", mean=0.5, std=0.25, low=0.0, high=1.0)],
    coef=[2.0, 1.0], intercept=-1.0,
)


@pytest.mark.parametrize("risk", [0.01, 0.1, 0.5])
def test_learning_rate_at_risk_is_the_analytic_solution(risk):
    m = 0.75  # z = 1
    expected = 10 ** (-3.0 + 0.5 * (_logit(risk) + 1.0 - 1.0 * 1.0) / 2.0)
    lr = HAND.learning_rate_at_risk({"near_unit_mass_mean": m}, risk=risk)
    assert lr == pytest.approx(expected, rel=1e-12)
    assert HAND.predict_proba({"near_unit_mass_mean": m}, learning_rate=lr) == pytest.approx(risk, abs=1e-12)


def test_bisection_path_matches_the_analytic_solution():
    # the learning rate enters linearly (identity transform): no closed form is used, the grid + bisection is
    est = RiskEstimator([FeatureSpec("learning_rate", mean=0.01, std=0.02)], coef=[1.5], intercept=-4.0)
    for risk in (0.05, 0.2, 0.6):
        expected = 0.01 + 0.02 * (_logit(risk) + 4.0) / 1.5
        assert est.learning_rate_at_risk(risk=risk) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("estimator", [HAND, RiskEstimator([FeatureSpec("learning_rate", mean=0.01, std=0.02)],
                                                           coef=[1.5], intercept=-4.0)])
def test_learning_rate_at_risk_is_monotone_in_risk(estimator):
    risks = [0.01, 0.05, 0.1, 0.2, 0.5, 0.9]
    lrs = [estimator.learning_rate_at_risk({"near_unit_mass_mean": 0.3}, risk=r) for r in risks]
    assert all(a < b for a, b in zip(lrs, lrs[1:])), lrs


def test_no_crossing_and_bad_risk():
    falling = RiskEstimator([FeatureSpec("learning_rate", "log10")], coef=[-1.0], intercept=0.0)
    assert math.isinf(falling.learning_rate_at_risk(risk=0.1))
    always = RiskEstimator([FeatureSpec("learning_rate", "onehot:1")], coef=[1.0], intercept=5.0)
    assert always.learning_rate_at_risk(risk=0.1) == 0.0
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        HAND.learning_rate_at_risk({"near_unit_mass_mean": 0.5}, risk=1.0)
    with pytest.raises(ValueError, match="does not use the learning rate"):
        RiskEstimator([FeatureSpec("near_unit_mass_mean")], [1.0], 0.0).learning_rate_at_risk({"near_unit_mass_mean": 1})
    with pytest.raises(ValueError, match="near_unit_mass_mean"):
        HAND.learning_rate_at_risk({}, risk=0.1)


def test_interval_from_covariance_matches_the_delta_method():
    s = 0.4  # standard deviation of the intercept only: log10 lr* = mean + std (L - b - w_m z) / w_lr is linear in b
    cov = np.diag([s**2, 0.0, 0.0]).tolist()
    est = RiskEstimator(HAND.features, HAND.coef, HAND.intercept, coef_cov=cov)
    assert est.interval_source == "covariance"
    lr = est.learning_rate_at_risk({"near_unit_mass_mean": 0.75}, risk=0.1)
    (low, high), how = est.learning_rate_interval({"near_unit_mass_mean": 0.75}, risk=0.1, level=0.95)
    half = 1.959964 * 0.5 * s / 2.0  # decades: std * s / w_lr
    assert math.log10(high / lr) == pytest.approx(half, rel=0.06)
    assert math.log10(lr / low) == pytest.approx(half, rel=0.06)
    assert how == "the central 95 % of 4000 draws from the stored coefficient covariance"
    assert est.learning_rate_interval({"near_unit_mass_mean": 0.75}, level=0.975)[1].startswith("the central 97.5 % ")


def test_interval_from_bootstrap_and_unavailable():
    assert HAND.interval_source is None
    assert HAND.learning_rate_interval({"near_unit_mass_mean": 0.75}, risk=0.1) is None
    draws = [[-1.0 + d, 2.0, 1.0] for d in np.linspace(-0.5, 0.5, 101)]
    est = RiskEstimator(HAND.features, HAND.coef, HAND.intercept, bootstrap_coefs=draws)
    (low, high), how = est.learning_rate_interval({"near_unit_mass_mean": 0.75}, risk=0.1, level=0.9)
    lr = est.learning_rate_at_risk({"near_unit_mass_mean": 0.75}, risk=0.1)
    assert low < lr < high and how == "the central 90 % of 101 stored bootstrap refits"
    # the intercept draws span +-0.45 at the 5 % / 95 % order statistics: log10 lr moves by -/+ 0.45 * 0.5 / 2
    assert math.log10(high / lr) == pytest.approx(0.45 * 0.25, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- version 1
V1 = {
    "format": "hf_koopman.risk_estimator",
    "version": 1,
    "features": [
        {"key": "learning_rate", "transform": "log10", "mean": -2.0, "std": 0.5, "low": -3.0, "high": -1.0},
        {"key": "near_unit_mass_mean", "transform": "identity", "mean": 0.5, "std": 0.3, "low": 0.1, "high": 0.9},
        {"key": "norm", "transform": "onehot:none", "mean": 0.2, "std": 0.4, "low": 0.0, "high": 1.0},
        {"key": "spectral_radius_max", "transform": "log10", "mean": 0.0, "std": 1.0, "low": "-inf", "high": "inf"},
    ],
    "coef": [1.3, 1.1, 2.0, 0.1],
    "intercept": -4.0,
    "metadata": {"note": "hand-written version-1 file"},
}


def test_version_1_files_load_with_their_clip_ranges(tmp_path):
    (tmp_path / "v1.json").write_text(json.dumps(V1))
    est = RiskEstimator.from_json(tmp_path / "v1.json")
    assert est.learning_rate_range == pytest.approx((1e-3, 0.1))
    assert est.training_ranges["inputs"]["near_unit_mass_mean"] == {"min": 0.1, "max": 0.9}
    values = {"near_unit_mass_mean": 0.5, "norm": "pre_ln", "spectral_radius_max": 1.2}
    # the probability is what the version-1 formula gives: sigma(b + sum w (clip(x) - mean) / std)
    z = [(math.log10(1e-2) + 2.0) / 0.5, 0.0, (0.0 - 0.2) / 0.4, math.log10(1.2)]
    expected = 1 / (1 + math.exp(-(-4.0 + float(np.dot(V1["coef"], z)))))
    assert est.predict_proba(values, learning_rate=1e-2) == pytest.approx(expected, rel=1e-12)
    a = est.assess(values, learning_rate=50.0)
    assert a.out_of_range is True and a.outside[0].key == "learning_rate"
    assert a.outside[0].excess == pytest.approx(math.log10(500))
    # what the file does not record is unknown, never "in range"
    inside = est.assess(values, learning_rate=1e-2)
    assert inside.out_of_range is None and {"norm", "spectral_radius_max", "model_type"} <= set(inside.unknown)
    # re-saved as version 2: same predictions, same ranges
    again = RiskEstimator.from_json(est.save_json(tmp_path / "v2.json"))
    assert json.loads((tmp_path / "v2.json").read_text())["version"] == 2
    assert again.predict_proba(values, learning_rate=1e-2) == est.predict_proba(values, learning_rate=1e-2)
    assert again.training_ranges["inputs"] == est.training_ranges["inputs"]


def test_shipped_estimator_flags_lr_50():
    est = RiskEstimator.default()
    assert est.learning_rate_range is not None  # the shipped file's clip ranges are the training ranges
    values = {f.key: (f.low + f.high) / 2 if f.transform != "log10" else 10 ** ((f.low + f.high) / 2)
              for f in est.features if f.key != "learning_rate"}
    a = est.assess(values, learning_rate=50.0)
    assert a.out_of_range is True and "outside the fitted range: learning_rate = 50" in a.describe()
    assert "model_type (not given)" in a.unknown  # recorded by the shipped file, but not part of these values
    assert {"gpt2", "llama", "mamba"} <= set(est.training_ranges["inputs"]["model_type"]["values"])


@pytest.mark.parametrize(
    ("change", "match"),
    [({"version": 3}, "newer hf_koopman: upgrade"), ({"version": None}, "reads versions 1 and 2"),
     ({"format": "pickle"}, "format")],
)
def test_unreadable_versions_fail_clearly(change, match):
    with pytest.raises(ValueError, match=match):
        RiskEstimator.from_dict({**V1, **change})


def test_inconsistent_version_2_file_fails_clearly(fitted):
    est, _ = fitted
    data = est.to_dict()
    data["coef_covariance"]["order"] = ["intercept", "x", "y"]
    with pytest.raises(ValueError, match="does not match"):
        RiskEstimator.from_dict(data)
    data = est.to_dict()
    del data["intercept"]
    with pytest.raises(ValueError, match="lacks the field 'intercept'"):
        RiskEstimator.from_dict(data)


def test_the_training_horizon_bounds_what_the_answer_means(fitted):
    est, _ = fitted
    assert "within" not in est.training_summary()  # no horizon recorded: nothing claimed
    est = RiskEstimator.fit(*_rows(), [("learning_rate", "log10"), "near_unit_mass_mean"], l2=0.1,
                            metadata={"horizon_steps": 150})
    assert est.training_summary().endswith("the label is divergence within 150 steps, so for a longer run the "
                                           "probability is a lower bound and the suggested learning rate an upper one")
    assert "within 150 steps" in RiskEstimator.default().training_summary()


def test_a_value_just_past_a_bound_prints_differently_from_it():
    from hf_koopman.risk import RangeIssue

    text = RangeIssue("learning_rate", 4.1, 0.001, 4.096, excess=0.00042, log_scale=True).describe()
    assert text == "learning_rate = 4.1 is 0.00042 decades above the fitted [0.001, 4.096]"
    assert "[0.001, 4.1]" in RangeIssue("learning_rate", 50.0, 0.001, 4.096, excess=1.1, log_scale=True).describe()


def test_the_shipped_estimator_is_a_fresh_copy_each_time():
    from hf_koopman.risk import RiskEstimator

    first = RiskEstimator.default()
    first.coef[0] = -5.0  # a user's experiment on their copy
    again = RiskEstimator.default()
    assert again.coef[0] != -5.0 and again.is_shipped


def test_a_hand_edited_estimator_file_names_the_file_and_what_is_wrong(tmp_path):
    import json
    from importlib import resources

    from hf_koopman.risk import RiskEstimator

    base = json.loads((resources.files("hf_koopman") / "data" / "risk_estimator.json").read_text())
    edits = {
        "coef": (lambda d: d["features"][0].__setitem__("coef", None), r"coef must be a number, got None"),
        "coef_string": (lambda d: d["features"][0].__setitem__("coef", "1e0"), r"coef must be a number, got '1e0'"),
        "coef_bool": (lambda d: d["features"][0].__setitem__("coef", True), r"coef must be a number, got True"),
        "nan_mean": (lambda d: d["features"][0].__setitem__("mean", float("nan")), r"needs a finite mean"),
        "inf_mean": (lambda d: d["features"][0].__setitem__("mean", float("inf")), r"needs a finite mean"),
        "reversed_clip": (lambda d: d["features"][0].__setitem__("clip", [5, -5]), r"needs a clip range low <= high"),
        "nan_clip": (lambda d: d["features"][0].__setitem__("clip", [float("nan"), float("nan")]),
                     r"needs a clip range low <= high"),
        "negative_covariance": (lambda d: d["coef_covariance"].__setitem__(
            "matrix", [[-abs(v) if i == j else 0.0 for j, v in enumerate(r)] for i, r in enumerate(d["coef_covariance"]["matrix"])]),
            r"coef_cov must be positive semi-definite"),
        "inputs": (lambda d: d["training_ranges"].__setitem__("inputs", [1]), "TypeError"),
        "inverted": (lambda d: d["training_ranges"]["inputs"]["learning_rate"].update(min=4.0, max=0.001),
                     r"training_ranges.inputs\['learning_rate'\] has min 4.0 above max 0.001"),
    }
    for name, (edit, message) in edits.items():
        data = json.loads(json.dumps(base))
        edit(data)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"{path} is not a valid risk estimator \(.*{message}"):
            RiskEstimator.from_json(path)
