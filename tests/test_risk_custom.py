"""A risk estimator fitted on your own runs: clear errors on bad training rows, the row a profile gives, and the
estimator plugged into profile(), the saved profile, RKSPCallback and the CLI, each saying which estimator it used."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from hf_koopman.profiling import SpectralProfile, profile
from hf_koopman.risk import RiskEstimator
from hf_koopman.testing_utils import tiny_model

FEATURES = [("learning_rate", "log10"), "near_unit_mass_mean"]


def _rows(n: int = 60, seed: int = 0) -> tuple[list[dict], list[int]]:
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(n):
        lr, m = 10 ** rng.uniform(-3, 0), rng.uniform(0.1, 0.9)
        rows.append({"learning_rate": lr, "near_unit_mass_mean": m, "model_type": "llama", "hidden_size": 64,
                     "num_layers": 4})
        labels.append(int(rng.uniform() < 1 / (1 + math.exp(-3.0 * (math.log10(lr) + 1.5)))))
    return rows, labels


@pytest.fixture(scope="module")
def mine() -> RiskEstimator:
    rows, labels = _rows()
    return RiskEstimator.fit(rows, labels, FEATURES, metadata={"name": "my-llama-runs"})


# ------------------------------------------------------------------------------------------------ bad training rows
@pytest.mark.parametrize(("edit", "message"), [
    ({"learning_rate": 0.0}, r"training row 3: learning_rate=0.0 must be a positive finite number"),
    ({"learning_rate": -1e-3}, r"training row 3: learning_rate=-0.001"),
    ({"near_unit_mass_mean": float("nan")}, r"training row 3: feature 'near_unit_mass_mean' is NaN.*Drop the row"),
])
def test_a_bad_training_row_is_named(edit, message):
    rows, labels = _rows()
    rows[3] = {**rows[3], **edit}
    with pytest.raises(ValueError, match=message):
        RiskEstimator.fit(rows, labels, FEATURES)


def test_a_row_without_a_feature_is_named_with_the_helper():
    rows, labels = _rows()
    del rows[5]["near_unit_mass_mean"]
    with pytest.raises(ValueError, match=r"training row 5 has no 'near_unit_mass_mean'.*RiskEstimator.row"):
        RiskEstimator.fit(rows, labels, FEATURES)


@pytest.mark.parametrize("l2", [-1.0, float("nan"), "1"])
def test_a_bad_ridge_strength_is_refused(l2):
    rows, labels = _rows()
    with pytest.raises(ValueError, match="l2="):
        RiskEstimator.fit(rows, labels, FEATURES, l2=l2)


def test_a_fit_that_does_not_converge_says_so(caplog):
    rows = [{"learning_rate": lr, "near_unit_mass_mean": 0.5} for lr in (1e-3, 2e-3, 1e-1, 2e-1)]
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        RiskEstimator.fit(rows, [0, 0, 1, 1], FEATURES, l2=0.0)  # separable, unpenalised: no finite optimum
    assert "did not converge" in caplog.text and "raise l2" in caplog.text


def test_an_infinite_feature_is_no_evidence_of_range():
    rows, labels = _rows()
    rows[0] = {**rows[0], "eigvec_condition_mean": math.inf}
    for row in rows[1:]:
        row["eigvec_condition_mean"] = 100.0
    est = RiskEstimator.fit(rows, labels, [*FEATURES, ("eigvec_condition_mean", "log10")])
    assert est.training_ranges["inputs"]["eigvec_condition_mean"] == {"min": 100.0, "max": 100.0}


def test_rows_given_for_prediction_are_checked_too(mine):
    rows, _ = _rows(4)
    with pytest.raises(ValueError, match="row 2: learning_rate=0"):
        mine.predict_proba_rows([*rows[:2], {**rows[2], "learning_rate": 0}])
    with pytest.raises(ValueError, match=r"row 1 has no \['learning_rate'\]; every row needs"):
        mine.predict_proba_rows([rows[0], {"near_unit_mass_mean": 0.5}])


# ------------------------------------------------------------------------------------------------ a profile's row
@pytest.fixture(scope="module")
def llama_profile() -> SpectralProfile:
    return profile(tiny_model("llama"), num_samples=256, progress=False)


def test_the_row_of_a_profile_predicts_what_the_profile_does(mine, llama_profile):
    row = RiskEstimator.row(llama_profile, learning_rate=3e-3)
    assert {"learning_rate", "near_unit_mass_mean", "model_type", "hidden_size", "num_layers"} <= set(row)
    assert set(llama_profile.aggregates) <= set(row) and row["learning_rate"] == 3e-3
    assert mine.predict_proba_rows([row])[0] == pytest.approx(mine.predict_proba(llama_profile, learning_rate=3e-3))
    saved = RiskEstimator.row(llama_profile.to_dict(), learning_rate=3e-3)  # a profile.json's "inf" strings too
    assert mine.predict_proba_rows([saved])[0] == pytest.approx(mine.predict_proba_rows([row])[0])


def test_a_range_note_calls_only_the_inputs_it_reads_clipped():
    shipped = RiskEstimator.default()
    aggregates = {"near_unit_mass_mean": 0.3, "unstable_mass_mean": 0.3, "spectral_radius_max": 2.0,
                  "eigvec_condition_mean": 100.0, "nonlinearity_mean": 0.5}
    note = shipped.assess(aggregates, learning_rate=1e-2, model_type="llama", hidden_size=160,
                          num_layers=3).range_note
    assert "hidden_size = 160" in note and "clipped" not in note  # the width is range-checked, never an input


# ------------------------------------------------------------------------------------------------ plugged in
def test_profile_uses_your_estimator_and_says_so(mine, tmp_path):
    prof = profile(tiny_model("llama"), num_samples=256, learning_rate=3e-3, risk_estimator=mine, progress=False)
    assert prof.risk == pytest.approx(mine.predict_proba(prof, learning_rate=3e-3))
    assert prof.risk != pytest.approx(RiskEstimator.default().predict_proba(prof, learning_rate=3e-3))
    assert prof.meta["risk_estimator"] == "my-llama-runs" and prof.risk_assessment().estimator == "my-llama-runs"
    assert "`RiskEstimator` `my-llama-runs`" in prof.to_markdown() and "your estimator" in prof.to_markdown()


def test_a_saved_profile_reads_its_estimator_back_from_its_file_and_never_swaps_in_the_shipped_one(mine, tmp_path):
    path = mine.save_json(tmp_path / "est.json")
    prof = profile(tiny_model("llama"), num_samples=256, learning_rate=3e-3, risk_estimator=str(path),
                   progress=False)
    assert prof.meta["risk_estimator"] == "my-llama-runs"  # metadata's name first, and its file
    assert prof.meta["risk_estimator_file"] == str(path)
    prof.save(tmp_path / "prof")
    again = SpectralProfile.from_json(tmp_path / "prof")
    assert again.risk == pytest.approx(prof.risk) and again.risk_assessment().estimator == "my-llama-runs"
    mine_from_file = RiskEstimator.from_json(path)
    mine_from_file.metadata.pop("name")
    unnamed = mine_from_file.save_json(tmp_path / "unnamed.json")
    prof = profile(tiny_model("llama"), num_samples=256, learning_rate=3e-3, risk_estimator=unnamed, progress=False)
    assert prof.meta["risk_estimator"] == str(unnamed)  # no name: its file
    prof.save(tmp_path / "prof2")
    unnamed.unlink()
    gone = SpectralProfile.from_json(tmp_path / "prof2")
    assert gone.risk is None  # not the shipped estimator's number under this estimator's name
    in_memory = profile(tiny_model("llama"), num_samples=256, learning_rate=3e-3, risk_estimator=mine, progress=False)
    in_memory.save(tmp_path / "prof3")
    assert SpectralProfile.from_json(tmp_path / "prof3").risk is None  # built in memory: nothing to read back


def test_the_callback_logs_your_estimators_risk(mine, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_koopman.training import RKSPCallback

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    callback = RKSPCallback(num_samples=128, guard=False, save_artifacts=False, risk_estimator=mine)
    args = TrainingArguments(str(tmp_path), max_steps=1, learning_rate=3e-3, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logged = trainer.state.log_history[0]["rksp/risk"]
    assert logged == pytest.approx(mine.predict_proba(callback.profile, learning_rate=3e-3))


def test_the_cli_takes_your_estimator(mine, tmp_path, capsys):
    from hf_koopman.cli import main
    from hf_koopman.testing_utils import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama").to_json_string())
    path = mine.save_json(tmp_path / "est.json")
    assert main(["profile", str(config), "--init", "--num-samples", "128", "--no-plots", "--no-progress",
                 "--learning-rate", "3e-3", "--estimator", str(path), "--out", str(tmp_path / "out")]) == 0
    saved = SpectralProfile.from_json(tmp_path / "out")
    assert saved.meta["risk_estimator"] == "my-llama-runs"
    assert main(["profile", str(config), "--init", "--estimator", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "out2")]) == 2
    assert "no risk-estimator JSON" in capsys.readouterr().err


def test_an_estimator_attached_by_hand_is_saved_with_the_profile(mine, llama_profile, tmp_path):
    path = mine.save_json(tmp_path / "est.json")
    prof = SpectralProfile.from_dict(llama_profile.to_dict())
    prof.meta["learning_rate"] = 1e-2
    prof.risk_estimator = RiskEstimator.from_json(path)  # e.g. on a profile_from_snapshots result
    again = SpectralProfile.from_json(prof.to_json())
    assert again.risk == pytest.approx(prof.risk) and again.risk_assessment().estimator == "my-llama-runs"
    prof.risk_estimator = mine  # in memory only: the reloaded profile has no risk, not the shipped one's
    gone = SpectralProfile.from_json(prof.to_json())
    assert gone.risk is None
    assert "No calibrated risk: this profile's risk estimator, my-llama-runs, is not available here" in gone.to_markdown()


def test_suggest_max_lr_on_a_profile_uses_its_estimator(mine, llama_profile):
    from hf_koopman import suggest_max_lr

    prof = SpectralProfile.from_dict(llama_profile.to_dict())
    prof.set_risk_estimator(mine)
    suggestion = suggest_max_lr(prof)
    assert suggestion.verdict == "suggested"
    assert suggestion.max_learning_rate == pytest.approx(mine.learning_rate_at_risk(prof, risk=0.1))
    shipped = suggest_max_lr(prof, estimator=RiskEstimator.default())
    assert shipped.max_learning_rate != pytest.approx(suggestion.max_learning_rate)


def test_a_callback_whose_estimator_file_is_gone_names_the_fix(tmp_path):
    from hf_koopman.training import RKSPCallback

    with pytest.raises(FileNotFoundError, match="restore_callback_states_from_checkpoint=False"):
        RKSPCallback(risk_estimator=str(tmp_path / "moved.json"))


def test_an_estimator_replaced_by_hand_replaces_what_the_saved_profile_names(mine, llama_profile, tmp_path):
    other = RiskEstimator.fit(*_rows(seed=1), FEATURES, l2=10.0)
    other_path = other.save_json(tmp_path / "other.json")
    prof = SpectralProfile.from_dict(llama_profile.to_dict())
    prof.meta["learning_rate"] = 1e-2
    prof.set_risk_estimator(other_path)
    prof.risk_estimator = RiskEstimator.default()  # back to the shipped one, by hand
    again = SpectralProfile.from_json(prof.to_json())
    assert again.risk == pytest.approx(RiskEstimator.default().predict_proba(prof, learning_rate=1e-2))
    prof.set_risk_estimator(other_path)
    prof.risk_estimator = mine  # an in-memory one over a file-backed one: not read back as the other
    assert SpectralProfile.from_json(prof.to_json()).risk is None


def test_suggest_max_lr_on_a_reloaded_profile_uses_its_estimator_or_refuses(mine, llama_profile, tmp_path):
    from hf_koopman import suggest_max_lr

    prof = SpectralProfile.from_dict(llama_profile.to_dict())
    prof.set_risk_estimator(mine.save_json(tmp_path / "est.json"))
    live = suggest_max_lr(prof).max_learning_rate
    reloaded = SpectralProfile.from_json(prof.to_json())
    assert suggest_max_lr(reloaded).max_learning_rate == pytest.approx(live)
    (tmp_path / "est.json").unlink()
    with pytest.raises(FileNotFoundError, match="not available here"):
        suggest_max_lr(SpectralProfile.from_json(prof.to_json()))


def test_the_name_shipped_is_the_package_estimators_only(mine):
    impostor = RiskEstimator.from_dict(mine.to_dict())
    impostor.metadata["name"] = "shipped"
    assert impostor.name == "custom" and RiskEstimator.default().name == "shipped"


def test_the_report_says_which_input_a_custom_estimator_lacks(llama_profile):
    rows, labels = _rows()
    for row, label in zip(rows, labels):
        row["norm"] = "pre_ln" if label else "post_ln"
    needs_norm = RiskEstimator.fit(rows, labels, [*FEATURES, ("norm", "onehot:pre_ln")])
    prof = SpectralProfile.from_dict(llama_profile.to_dict())
    prof.meta["learning_rate"] = 1e-2
    prof.set_risk_estimator(needs_norm)
    assert prof.risk is None and "needs norm, which this profile does not carry" in prof.to_markdown()


def test_the_shipped_estimator_is_named_shipped_whatever_its_metadata_says(monkeypatch):
    shipped = RiskEstimator.default()
    monkeypatch.setitem(shipped.metadata, "name", "heldout-study")
    assert shipped.name == "shipped"


def test_a_callback_with_an_in_memory_estimator_says_a_restored_one_cannot_keep_it(mine, tmp_path, caplog):
    from transformers import Trainer, TrainingArguments

    from hf_koopman.training import RKSPCallback

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    for restore, shipped in ((False, False), (True, True), (True, False)):
        callback = RKSPCallback(num_samples=128, guard=False, save_artifacts=False,
                                risk_estimator=RiskEstimator.default() if shipped else mine)
        args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                                 use_cpu=True, save_strategy="no", restore_callback_states_from_checkpoint=restore)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_koopman"):
            Trainer(model=tiny_model("llama"), args=args, train_dataset=data, callbacks=[callback]).train()
        assert callback.state()["args"]["risk_estimator"] is None
        warned = "built in memory" in caplog.text
        assert warned == (restore and not shipped), (restore, shipped)  # only where a restore would lose it


def test_max_lr_expands_a_tilde_in_the_estimator_path(mine, tmp_path, monkeypatch):
    from hf_koopman.cli import main
    from hf_koopman.testing_utils import tiny_config

    monkeypatch.setenv("HOME", str(tmp_path))
    mine.save_json(tmp_path / "est.json")
    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama").to_json_string())
    assert main(["max-lr", str(config), "--init", "--num-samples", "128", "--no-progress", "--estimator=~/est.json",
                 "--json"]) == 0



# ------------------------------------------------------------------------------------------------ what a fit records
def test_a_fitted_estimator_clips_each_input_to_its_training_range(mine):
    rows, _ = _rows()
    masses = [r["near_unit_mass_mean"] for r in rows]
    spec = next(f for f in mine.features if f.key == "near_unit_mass_mean")
    assert (spec.raw_bound(spec.low), spec.raw_bound(spec.high)) == pytest.approx((min(masses), max(masses)))
    at_max, beyond = mine.predict_proba_rows([{"learning_rate": 1e-2, "near_unit_mass_mean": max(masses)},
                                              {"learning_rate": 1e-2, "near_unit_mass_mean": 10 * max(masses)}])
    assert at_max == beyond  # clipped to the largest training value, not extrapolated


def test_an_input_read_as_log10_is_out_of_range_by_decades():
    rows, labels = _rows()
    for i, row in enumerate(rows):
        row["eigvec_condition_mean"] = 10.0 + 90.0 * i / (len(rows) - 1)  # 10 ... 100
    est = RiskEstimator.fit(rows, labels, [*FEATURES, ("eigvec_condition_mean", "log10")])
    flag, outside, _ = est.check_ranges({"near_unit_mass_mean": 0.5, "eigvec_condition_mean": 1e4,
                                         "model_type": "llama", "hidden_size": 64, "num_layers": 4},
                                        learning_rate=1e-2)
    (issue,) = [i for i in outside if i.key == "eigvec_condition_mean"]
    assert flag and issue.log_scale and issue.excess == pytest.approx(2.0)


def test_a_learning_rate_the_profile_records_is_no_range_issue_of_max_lr(llama_profile):
    from hf_koopman import suggest_max_lr

    rows, labels = _rows()
    never = RiskEstimator.fit(rows, [1 - y for y in labels], FEATURES)  # risk falls with the rate: no crossing
    recorded = SpectralProfile.from_dict({**llama_profile.to_dict(),
                                          "meta": {**llama_profile.meta, "learning_rate": 10.0}})  # outside 1e-3..1
    suggestion = suggest_max_lr(recorded, estimator=never)
    assert suggestion.verdict in ("no crossing", "uninformative")
    assert "learning_rate" not in [issue.key for issue in suggestion.outside]
