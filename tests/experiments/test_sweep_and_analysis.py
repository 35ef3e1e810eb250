"""Sweep rows (one tiny end-to-end run per back-end, resumability) and the analysis tables on hand-made rows."""

from __future__ import annotations

import json
import math

import pytest

from hf_koopman.experiments.analysis import (
    fit_and_evaluate_estimators,
    max_stable_lr_table,
    prediction_table,
    prevention_table,
    within_norm_table,
)
from hf_koopman.experiments.sweep import RunSpec, execute, read_rows, run_sweep


def test_runspec_validation_and_ids():
    spec = RunSpec(norm="none", learning_rate=0.01, seed=3, method="clip0.5")
    assert spec.clip == 0.5 and spec.kss_alpha == 0.0 and "lr0.01-s3" in spec.run_id
    with pytest.raises(ValueError, match="backend='trainer'"):
        RunSpec(norm="none", learning_rate=0.01, seed=0, method="kss0.15", backend="loop")
    with pytest.raises(ValueError, match="task"):
        RunSpec(norm="none", learning_rate=0.01, seed=0, task="cifar")


def test_execute_and_resume(tmp_path):
    spec = RunSpec(norm="none", learning_rate=1e-3, seed=0, hidden_size=16, num_layers=2, num_heads=2, max_steps=3)
    out = tmp_path / "runs.jsonl"
    rows = run_sweep([spec], out, progress=False)
    row = rows[0]
    assert row["diverged"] is False and row["steps_run"] == 3 and row["num_layers"] == 2
    assert 0.0 <= row["near_unit_mass_mean"] <= 1.0 and row["initial_grad_norm"] > 0
    assert "final_near_unit_mass_mean" in row and 0 <= row["eval_accuracy"] <= 1
    assert run_sweep([spec], out, progress=False) == []  # resumable: nothing left to do
    assert len(read_rows(out)) == 1


def test_trainer_backend_with_kss_runs():
    spec = RunSpec(norm="pre_ln", learning_rate=1e-3, seed=0, hidden_size=16, num_layers=2, num_heads=2, max_steps=2,
                   method="kss0.15", backend="trainer")
    row = execute(spec, features=False)
    assert row["steps_run"] == 2 and math.isfinite(row["final_loss"])


def test_read_rows_maps_inf_strings(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"run_id": "a", "x": "inf", "num_layers": 2.0}) + "\n")
    row = read_rows(p)[0]
    assert row["x"] == math.inf and row["num_layers"] == 2 and isinstance(row["num_layers"], int)


def _row(norm, lr, diverged, m, group="train", seed=0, method="none", **kw):
    base = dict(norm=norm, learning_rate=lr, diverged=diverged, near_unit_mass_mean=m, group=group, seed=seed,
                method=method, near_unit_mass_x_log10_kappa_mean=m, spectral_radius_max=2 - m, eigvec_condition_mean=10.0,
                unstable_mass_mean=1 - m, initial_grad_norm=1.0, grad_norm_step100=1.0, grad_norm_var_1_100=0.1,
                loss_spikes_1_500=0.0, train_seconds=1.0, steps_run=10, eval_accuracy=0.5)
    base.update(kw)
    return base


def test_prediction_and_within_norm_tables():
    rows = [_row("none", lr, lr > 0.005, 0.9) for lr in (0.001, 0.01, 0.1)] + [_row("pre_ln", lr, False, 0.2) for lr in (0.001, 0.01)]
    table = {t["column"]: t for t in prediction_table(rows, n_resamples=50)}
    # 2 positives, both with M≈1 = 0.9; negatives: one 0.9 (tie, 1/2) and two 0.2 -> (2*0.5 + 4*1) / 6
    assert table["near_unit_mass_mean"]["auroc"] == pytest.approx(5 / 6)
    within = within_norm_table(rows)
    assert within["none"]["learning_rate"] == 1.0 and within["none"]["near_unit_mass_mean"] == 0.5
    assert within["pre_ln"]["near_unit_mass_mean"] is None  # one outcome only: undefined, not 0.5


def test_estimators_are_fitted_on_train_and_scored_on_heldout():
    rows = []
    for seed, group in ((0, "train"), (1, "train"), (2, "heldout")):
        for norm, m in (("none", 0.9), ("pre_ln", 0.2)):
            for lr in (0.001, 0.01, 0.1):
                rows.append(_row(norm, lr, norm == "none" and lr >= 0.01, m + 0.01 * seed, group=group, seed=seed))
    est, res = fit_and_evaluate_estimators(rows, n_resamples=50)
    assert res["spectral + log LR"]["n_train"] == 12 and res["spectral + log LR"]["n_heldout"] == 6
    assert res["spectral + log LR"]["auroc"] > 0.9
    assert res["log LR only"]["auroc"] < res["norm type + log LR"]["auroc"]
    assert 0 <= res["raw M≈1 as probability (paper)"]["ece"] <= 1


def test_prevention_and_max_lr_tables():
    rows = [_row("none", 0.01, i < 4, 0.9, method="none") for i in range(6)]
    rows += [_row("none", 0.01, i < 1, 0.9, method="kss0.15", train_seconds=1.1) for i in range(6)]
    table = {t["method"]: t for t in prevention_table(rows)}
    assert table["none"]["divergence_rate"] == pytest.approx(4 / 6)
    assert table["kss0.15"]["overhead"] == pytest.approx(0.1)
    assert 0 < table["kss0.15"]["fisher_p_vs_control"] < 1
    lr_rows = [_row("pre_ln", lr, d, 0.2, method="none") for lr, d in ((0.001, False), (0.01, False), (0.1, True))]
    lr_rows += [_row("pre_ln", lr, False, 0.2, method="kss0.15") for lr in (0.001, 0.01, 0.1)]
    t = max_stable_lr_table(lr_rows)["pre_ln"]
    assert t["none"]["max_stable_lr"] == 0.01 and not t["none"]["censored"]
    assert t["kss0.15"]["max_stable_lr"] == 0.1 and t["kss0.15"]["censored"]


def test_grids_shapes_and_heldout_split():
    from hf_koopman.experiments.grids import max_lr_grid, prediction_grid, prevention_grid, real_data_grid

    pred = prediction_grid()
    assert len(pred) == 216 and len({s.run_id for s in pred}) == 216
    train = [s for s in pred if s.group == "train"]
    assert len(train) == 96
    assert all((s.hidden_size, s.num_layers) != (48, 3) and s.seed != 2 for s in train)
    prev = prevention_grid()
    assert len(prev) == 144 and {s.method for s in prev[:6]} == {"none", "clip0.5", "clip1.0", "kss0.10", "kss0.15", "kss0.20"}
    assert all(0.005 <= s.learning_rate <= 0.01 and s.norm == "none" for s in prev)
    assert len(max_lr_grid()) == 54 and len(real_data_grid()) == 12
