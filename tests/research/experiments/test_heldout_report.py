"""Results page and summary keys of the held-out-family study, on a constructed report dict."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from research.experiments.heldout_report import (
    VERDICT_ADDS,
    VERDICT_HURTS,
    VERDICT_NONE,
    render_markdown,
    spectrum_verdict,
    summary_keys,
    tier_status,
)
from research.experiments.heldout_risk import study_grid

MODELS = ("lr", "config+lr", "gradient+lr", "spectrum+lr", "config+curvature+lr", "all")
FAMS = ("fam_a", "fam_b")


def _report(seed: int = 0) -> dict:
    """A report dict with the structure of `heldout_analysis.analyse`, random numbers."""
    rng = np.random.default_rng(seed)

    def split() -> dict:
        models = {}
        for k in MODELS:
            a = float(rng.uniform(0.6, 0.95))
            models[k] = {"auroc": a, "auroc_ci": [a - 0.03, a + 0.03], "ece": float(rng.uniform(0, 0.2)),
                         "log_loss": float(rng.uniform(0.1, 0.5)), "brier": float(rng.uniform(0, 0.2)),
                         "reliability": [], "n": 100,
                         "per_group_auroc": {f: float(rng.uniform(0.5, 1)) for f in FAMS}}
        models["gradient+lr"]["auroc"] = 0.999  # never the best init-time model
        diffs = {}
        for name in ("all - config+curvature+lr", "spectrum+lr - lr", "all - config+lr"):
            d, l = float(rng.normal(0, 0.01)), float(rng.normal(0, 0.01))
            diffs[name] = {"delta_auroc": d, "delta_auroc_ci": [d - 0.02, d + 0.02],
                           "delta_log_loss": l, "delta_log_loss_ci": [l - 0.02, l + 0.02]}
        max_lr = {k: {f"risk_{r}": {"within_2x": float(rng.uniform(0, 1)), "n_bracketed": 30,
                                    "median_log2_ratio": float(rng.normal()), "below_measured": 0.5,
                                    "n_censored": 2, "censored_consistent": 1} for r in (0.1, 0.5)}
                  for k in MODELS if k != "gradient+lr"}
        return {"models": models, "paired_differences": diffs, "max_lr": max_lr}

    return {"n_runs": 0, "n_diverged": 0, "n_model_inits": 0, "families": list(FAMS),
            "thresholds": {"bracketed": 30, "right_censored": 2, "left_censored": 0, "non_monotone": 0},
            "primary_leave_one_family_out": split(), "secondary_leave_one_variant_out": split(),
            "unfitted_scores": {"ρ max (paper)": {"auroc": 0.51, "auroc_ci": [0.45, 0.57], "n": 100}}}


def _with_rule1(auroc_ci: list[float], ll_ci: list[float]) -> dict:
    rep = _report()
    d = rep["primary_leave_one_family_out"]["paired_differences"]["all - config+curvature+lr"]
    d["delta_auroc_ci"], d["delta_log_loss_ci"] = auroc_ci, ll_ci
    return rep


def test_spectrum_verdict_reads_the_cis():
    assert spectrum_verdict(_with_rule1([0.01, 0.03], [-0.05, -0.01])) == VERDICT_ADDS
    assert spectrum_verdict(_with_rule1([0.01, 0.03], [-0.05, 0.01])) == VERDICT_NONE  # log-loss CI covers 0
    assert spectrum_verdict(_with_rule1([-0.01, 0.03], [-0.05, -0.01])) == VERDICT_NONE
    assert spectrum_verdict(_with_rule1([-0.03, -0.01], [-0.05, 0.01])) == VERDICT_HURTS
    assert spectrum_verdict(_with_rule1([-0.01, 0.01], [0.01, 0.02])) == VERDICT_HURTS  # log-loss above 0


def _rows(n_first: int, n_second: int) -> list[dict]:
    """Rows of the first `n_first` runs of tier (seed 0, even) and `n_second` of tier (seed 0, odd)."""
    grid = study_grid()
    first = [r for r in grid if r.model.seed == 0][:728]
    second = [r for r in grid if r.model.seed == 0][728:]
    rows = []
    for i, run in enumerate(first[:n_first] + second[:n_second]):
        rows.append({"run_id": run.run_id, "model_id": run.model.model_id, "seed": run.model.seed,
                     "learning_rate": run.learning_rate, "family": FAMS[i % 2], "diverged": i % 3 == 0})
    return rows


def test_tier_status_counts_the_seed_major_tiers():
    tiers = {t: (n, total) for t, n, total in tier_status(_rows(728, 5))}
    assert tiers["seed 0, even rungs"] == (728, 728)
    assert tiers["seed 0, odd rungs"] == (5, 2704 // 2 - 728)
    assert tiers["seed 1, even rungs"][0] == 0


def test_markdown_has_tables_tiers_and_verdict():
    rows = _rows(728, 5)
    rep = _report()
    rep.update(n_runs=len(rows), n_diverged=sum(r["diverged"] for r in rows))
    md = render_markdown(rep, rows, total_runs=2704)
    assert f"{len(rows)} of 2704 planned runs" in md
    assert "complete: seed 0, even rungs;" in md
    assert "partial: seed 0, odd rungs (5/624)" in md
    assert "no run was selected or dropped by its outcome" in md
    assert "| model | AUROC [95% CI] | ECE | log-loss | Brier |" in md
    assert "| comparison | ΔAUROC |" in md
    assert spectrum_verdict(rep) in md
    a = rep["primary_leave_one_family_out"]["models"]["all"]
    assert f"{a['auroc']:.3f} [{a['auroc_ci'][0]:.3f}, {a['auroc_ci'][1]:.3f}]" in md
    assert "reliability.png" in md
    assert "No `rksp_kan` rows" in md
    assert "fam_a |" in md and "fam_a †" not in md  # over 100 runs of each class: interpreted
    md_small = render_markdown(rep, rows[:12], total_runs=2704)
    assert "fam_a †" in md_small


def test_kan_rows_are_reported_per_shape():
    rows = _rows(26, 0)
    for r in rows:
        r.update(family="rksp_kan", num_layers=2, hidden_size=32, init_std=0.02, near_unit_mass_mean=0.25,
                 nonlinearity_mean=0.5, spectral_radius_max=1.5, eigvec_condition_mean=40.0, verdict="safe")
    md = render_markdown(_report(), rows, total_runs=2704)
    assert "| L2 d32 std0.02 |" in md and "0.250" in md and "safe x" in md


def test_summary_keys_come_from_the_report():
    rep = _report(1)
    prim = rep["primary_leave_one_family_out"]
    keys = summary_keys(rep)
    assert keys["heldout_family_auroc"] == prim["models"]["spectrum+lr"]["auroc"]
    assert keys["heldout_family_ece"] == prim["models"]["spectrum+lr"]["ece"]
    assert keys["max_lr_within_2x"]["spectrum+lr"] == prim["max_lr"]["spectrum+lr"]["risk_0.1"]["within_2x"]
    assert keys["max_lr_within_2x"]["all"] == prim["max_lr"]["all"]["risk_0.1"]["within_2x"]
    best = keys["max_lr_within_2x"]["best_init_time"]["model"]
    init_time = {k: m["auroc"] for k, m in prim["models"].items() if k != "gradient+lr"}
    assert best == max(init_time, key=init_time.get)
    d = prim["paired_differences"]["all - config+curvature+lr"]
    assert keys["heldout_spectrum_added_auroc"]["delta"] == d["delta_auroc"]
    assert keys["heldout_spectrum_added_auroc"]["ci"] == d["delta_auroc_ci"]
    assert keys["heldout_spectrum_added_auroc"]["comparison"] == "all - config+curvature+lr"
    assert keys["heldout_spectrum_vs_lr_auroc"]["delta"] == prim["paired_differences"]["spectrum+lr - lr"]["delta_auroc"]
    assert keys["heldout_verdict"] == spectrum_verdict(rep)
    rep2 = copy.deepcopy(rep)
    rep2["primary_leave_one_family_out"]["models"]["spectrum+lr"]["auroc"] = 0.123
    assert summary_keys(rep2)["heldout_family_auroc"] == pytest.approx(0.123)


def test_write_pages_merges_only_an_existing_summary(tmp_path):
    from research.scripts.heldout_risk import _write_pages

    out = tmp_path / "heldout_risk"
    out.mkdir()
    rows = _rows(10, 0)
    rep = _report()
    rep.update(n_runs=len(rows))
    _write_pages(out, rep, rows)
    assert (tmp_path / "heldout_risk.md").is_file()
    assert not (tmp_path / "summary.json").exists()
    (tmp_path / "summary.json").write_text(json.dumps({"other": 1}), encoding="utf-8")
    _write_pages(out, rep, rows)
    data = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert data["other"] == 1
    assert data["heldout_family_auroc"] == rep["primary_leave_one_family_out"]["models"]["spectrum+lr"]["auroc"]


def test_bound_section_reads_the_ceilings():
    from research.experiments.heldout_analysis import calibrated_within_2x, required_within_2x_at_half
    from research.experiments.heldout_report import _bound_lines

    def bound(w_half: float) -> dict:
        return {"goal": 0.8, "required_within_2x_risk_0.5": required_within_2x_at_half(0.8, 0.1),
                "per_model": {"all": {"within_2x_risk_0.5": w_half, "sigma_octaves": 0.5,
                                      "calibrated_within_2x_risk_0.1": calibrated_within_2x(w_half, 0.1),
                                      "measured_within_2x_risk_0.1": 0.3,
                                      "above_4x_risk_0.5": 0.1, "below_4x_risk_0.5": 0.0,
                                      "above_4x_by_variant_risk_0.5": {"gpt-none": 3, "mamba": 1}}},
                "seed_spread": {"n_pairs": 0}}

    text = "\n".join(_bound_lines(bound(0.8)))
    assert "0.947" in text and "Every model's reference value lies below the goal" in text
    assert "4 inits have a 50 % point more than 4x above the threshold, of which 3 `gpt-none`, 1 `mamba`" in text
    assert "**Reading.**" not in "\n".join(_bound_lines(bound(0.97)))  # reference above the goal: no such reading
    assert _bound_lines(None) == []
