"""Report pieces of `scripts/reproduce.py` on hand-made rows: the MoE table and the paired control/KSS counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hf_koopman.experiments.stats import fisher_exact


@pytest.fixture(scope="module")
def reproduce():
    path = Path(__file__).resolve().parents[2] / "scripts" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("_reproduce_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
