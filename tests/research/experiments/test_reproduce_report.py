"""Report pieces of `research/scripts/reproduce.py` on hand-made rows: the MoE table and the paired control/KSS counts."""

from __future__ import annotations

import pytest

from research.experiments.stats import fisher_exact


@pytest.fixture(scope="module")
def reproduce():
    from research.scripts import reproduce

    return reproduce


def _moe_row(lr, seed, method, diverged, m=0.4):
    return {"learning_rate": lr, "seed": seed, "method": method, "diverged": diverged, "top_k": 2, "hidden_size": 64,
            "num_layers": 4, "max_steps": 150, "final_loss": 6.0 if not diverged else 80.0,
            "eval_accuracy": 0.01 if not diverged else None, "near_unit_mass_mean": m, "spectral_radius_max": 1.8,
            "nonlinearity_mean": 0.9, "final_near_unit_mass_mean": None if diverged else 0.3,
            "divergence_reason": "loss" if diverged else None, "divergence_step": 20 if diverged else None}


def test_paired_outcomes_pairs_by_seed_and_lr(reproduce):
    rows = [_moe_row(1.0, 0, "none", True), _moe_row(1.0, 0, "kss0.15", False),
            _moe_row(1.0, 1, "none", True), _moe_row(1.0, 1, "kss0.15", True),
            _moe_row(2.0, 0, "none", False), _moe_row(2.0, 0, "kss0.15", True),
            _moe_row(2.0, 1, "none", False)]  # unpaired: ignored
    got = reproduce._paired_outcomes(rows, "none", "kss0.15")
    assert got == {"both stable": 0, "both diverged": 1, "only none diverged": 1, "only kss0.15 diverged": 1,
                   "mcnemar_exact_p": 1.0}
    assert reproduce._paired_outcomes(rows, "none", "kss0.20") == {}


def test_moe_section_counts_and_fisher(reproduce):
    rows = [_moe_row(1.0, s, "none", s < 4) for s in range(6)] + [_moe_row(1.0, s, "kss0.15", s < 1) for s in range(6)]
    rows += [_moe_row(2.0, s, "none", True) for s in range(6)] + [_moe_row(2.0, s, "kss0.15", True) for s in range(6)]
    for r in rows:
        if r["method"] == "kss0.15":  # the objective label: every lr-1 KSS run would have tripped on the penalty value
            r["diverged_on_objective"] = r["diverged"] or r["learning_rate"] == 1.0
    for s in range(6, 8):  # replication seeds at LR 1: one KSS divergence, no control divergence
        rows += [{**_moe_row(1.0, s, "none", False), "group": "moe_replication"},
                 {**_moe_row(1.0, s, "kss0.15", s == 6), "group": "moe_replication", "diverged_on_objective": True}]
    md: list[str] = []
    out = reproduce.moe_section(rows, md.append)
    rep = out["replication"]
    assert rep["learning_rate"] == [1.0] and rep["replication seeds"]["seeds"] == [6, 7]
    assert rep["replication seeds"]["kss0.15"] == [1, 2] and rep["replication seeds"]["none"] == [0, 2]
    assert rep["first seeds"]["kss0.15"] == [1, 6] and rep["first seeds"]["none"] == [4, 6]
    rows = [r for r in rows if r.get("group") != "moe_replication"]
    md = []
    out = reproduce.moe_section(rows, md.append)
    assert "replication" not in out
    cell = out["top2/lr1/kss0.15"]
    assert cell["runs"] == 6 and cell["diverged"] == 1
    assert cell["fisher_p_vs_none"] == pytest.approx(fisher_exact([[1, 5], [4, 2]]))
    assert out["top2/lr1/none"]["fisher_p_vs_none"] is None
    assert out["top2/lr2/kss0.15"]["final_loss_converged"] is None  # no converged run: no mean, not NaN
    assert out["pooled"]["none"] == {"runs": 12, "diverged": 10}
    assert out["pooled"]["kss0.15"]["diverged"] == 7
    assert out["pooled"]["kss0.15"]["fisher_p_vs_none"] == pytest.approx(fisher_exact([[7, 5], [10, 2]]))
    assert out["paired_none_vs_kss0.15"]["only none diverged"] == 3
    assert out["paired_none_vs_kss0.15"]["mcnemar_exact_p"] == pytest.approx(0.25)  # 3 vs 0 discordant: 2 / 2**3
    assert out["objective_label"] == {"kss0.15": {"runs": 12, "diverged": 7, "diverged_on_objective": 12}}
    text = "\n".join(md)
    assert "| 2 | 1 | kss0.15 | 6 | 1 |" in text and "Pooled over LRs: kss0.15 7/12" in text


def test_identical_arms(reproduce):
    rows = []
    for seed in range(3):
        rows.append({"seed": seed, "learning_rate": 0.01, "method": "kss0.10", "final_loss": 4.0 + seed,
                     "diverged": False, "divergence_step": None})
        rows.append({"seed": seed, "learning_rate": 0.01, "method": "kss0.20", "final_loss": 4.0 + seed,
                     "diverged": False, "divergence_step": None})
        rows.append({"seed": seed, "learning_rate": 0.01, "method": "kss0.15", "final_loss": 4.5 if seed else 4.0,
                     "diverged": False, "divergence_step": None})
    got = reproduce._identical_arms(rows, ["kss0.10", "kss0.15", "kss0.20"])
    assert got == {("kss0.10", "kss0.15"): (1, 3), ("kss0.10", "kss0.20"): (3, 3), ("kss0.15", "kss0.20"): (1, 3)}


def _pred_row(norm, lr, seed, d, steps, div_step):
    """A prediction-sweep row: No-Norm has M≈1 = 0.9, the rest 0.2; `div_step` None = stable."""
    m = 0.9 if norm == "none" else 0.2
    return {"run_id": f"{norm}-lr{lr}-s{seed}-d{d}-T{steps}", "divergence_reason": "loss" if div_step else None,
            "norm": norm, "learning_rate": lr, "seed": seed, "hidden_size": d, "num_layers": 2, "max_steps": steps,
            "group": "heldout" if d == 48 or seed == 2 else "train", "diverged": div_step is not None,
            "divergence_step": div_step, "near_unit_mass_mean": m + 0.01 * seed, "unstable_mass_mean": 1 - m,
            "near_unit_mass_x_log10_kappa_mean": m, "spectral_radius_max": 2 - m, "eigvec_condition_mean": 10.0 + seed,
            "initial_grad_norm": 1.0 + seed, "grad_norm_step100": 50.0 if div_step else 1.0,
            "grad_norm_var_1_100": 1.0, "loss_spikes_1_500": 3.0 if div_step else 0.0, "loss_spikes_1_100": 0.0}


def _pred_tables(late_step=300):
    old, new = [], []
    for norm in ("none", "pre_ln"):
        for lr in (0.01, 0.1):
            for seed in range(3):
                for d in (32, 48):
                    early = 40 if norm == "none" and lr == 0.1 else None  # diverges within both horizons
                    late = late_step if norm == "none" and lr == 0.01 and seed != 1 else None  # only in the long one
                    old.append(_pred_row(norm, lr, seed, d, 100, early))
                    new.append(_pred_row(norm, lr, seed, d, 500, early or late))
    return old, new


def test_horizon_comparison_counts_and_consistency(reproduce):
    old, new = _pred_tables()
    md: list[str] = []
    summary: dict = {}
    reproduce.horizon_comparison_section(old, new, md.append, summary, n_resamples=20)
    cmp = summary["horizon_comparison"]
    assert cmp["T100"]["diverged_by_norm"]["none"] == [6, 12] and cmp["T500"]["diverged_by_norm"]["none"] == [10, 12]
    assert cmp["T100"]["diverged_by_norm"]["pre_ln"] == [0, 12] and cmp["T500"]["n_diverged"] == 10
    assert cmp["diverged_within_short_horizon_identical"] is True
    text = "\n".join(md)
    # middle column: the 500-step runs cut at step 100 (same labels as the 100-step table here)
    assert "| diverged, none | 6/12 | 6/12 | 10/12 |" in text and "4 more diverged in steps 101-500" in text
    assert cmp["T500_cut_at_100"]["diverged_by_norm"]["none"] == [6, 12]
    assert cmp["init_features_changed"]["runs"] == 0
    new[1] = {**new[1], "near_unit_mass_mean": new[1]["near_unit_mass_mean"] - 0.25}  # a profiler change in one run
    summary = {}
    reproduce.horizon_comparison_section(old, new, md.append, summary, n_resamples=20)
    changed = summary["horizon_comparison"]["init_features_changed"]
    assert changed["runs"] == 1 and changed["max_abs_delta_near_unit_mass"] == pytest.approx(0.25)
    # a long-table run that diverged at a different step within the first 100 steps breaks the consistency check
    bad = [dict(r) for r in new]
    for r in bad:
        if r["diverged"] and r["divergence_step"] == 40:
            r["divergence_step"] = 41
            break
    summary = {}
    reproduce.horizon_comparison_section(old, bad, md.append, summary, n_resamples=20)
    assert summary["horizon_comparison"]["diverged_within_short_horizon_identical"] is False


def test_truncate_rows_relabels_at_step_100(reproduce):
    _, new = _pred_tables()
    cut = reproduce.truncate_rows(new, 100)
    assert sum(r["diverged"] for r in cut) == 6 and {r["max_steps"] for r in cut} == {100}
    assert all(r["loss_spikes_1_500"] == r["loss_spikes_1_100"] for r in cut)
    with pytest.raises(ValueError, match="step=100"):
        reproduce.truncate_rows(new, 200)
    with pytest.raises(ValueError, match="loss_spikes_1_100"):
        reproduce.truncate_rows([{k: v for k, v in new[0].items() if k != "loss_spikes_1_100"}], 100)


def test_early_warning_section_reports_late_divergences(reproduce):
    _, new = _pred_tables()
    md: list[str] = []
    summary: dict = {}
    reproduce.early_warning_section(new, md.append, summary)
    ew = summary["early_warning_step100"]
    assert (ew["n_dropped"], ew["n"], ew["n_diverged"]) == (6, 18, 4)
    lr = next(r for r in ew["rows"] if r["column"] == "learning_rate")
    # the 4 late runs are at LR 0.01, tied with 8 stable runs (1/2 each) and below 6 at LR 0.1: 4 / 14
    assert lr["auroc"] == pytest.approx(2 / 7)
    text = "\n".join(md)
    assert "of the remaining 18 runs, 4 diverged later" in text
    assert "Late divergences (4): none d=32 L=2 LR 0.01 seed 0 at step 300" in text and "all are none runs" in text
    assert len(ew["late_runs"]) == 4


def test_horizons_sentence_reads_the_tables(reproduce, tmp_path):
    import json

    for d, steps in (("sweep_prediction", 500), ("sweep_max_lr", 100)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "runs.jsonl").write_text(json.dumps({"run_id": d, "max_steps": steps}) + "\n")
    assert reproduce._horizons(tmp_path) == "500 steps for the prediction sweep, 100 for max-LR"
    assert reproduce._horizons(tmp_path / "missing") == "no tables"
