"""KSS v2 (issue #23): the pilot's reading rule, the arm table, the summary merge and the grids, on hand-made rows."""

from __future__ import annotations

import pytest

from research.experiments import kss_v2 as K
from research.experiments.stats import fisher_exact


def _row(layers, seed, diverged, method="none", **kw):
    return {"num_layers": layers, "seed": seed, "method": method, "diverged": diverged,
            "divergence_step": 150 if diverged else None, "divergence_reason": "loss" if diverged else None,
            "steps_run": 150 if diverged else 300, "train_seconds": 30.0 if diverged else 60.0,
            "eval_accuracy": None if diverged else 0.1, "near_unit_mass_mean": 0.9,
            "final_near_unit_mass_mean": None if diverged else 0.7, **kw}


def _pilot(rates: dict[int, int], n: int = 6):
    return [_row(layers, 900 + i, i < k) for layers, k in rates.items() for i in range(n)]


def test_pick_setting_prefers_the_target_interval_then_the_nearest_then_the_smaller_depth():
    got = K.pick_setting(_pilot({4: 1, 6: 4, 8: 6}))  # 1/6, 4/6 (inside), 6/6
    assert got["num_layers"] == 6 and got["inside"] and got["rate"] == pytest.approx(4 / 6)
    got = K.pick_setting(_pilot({4: 3, 6: 4, 8: 6}))  # 3/6 and 4/6 both inside: the smaller depth
    assert got["num_layers"] == 4 and got["inside"]
    got = K.pick_setting(_pilot({4: 0, 6: 1, 8: 6}))  # none inside: 1/6 is 1/3 away, 6/6 is 1/3 away -> tie -> L=6
    assert got["num_layers"] == 6 and not got["inside"]
    got = K.pick_setting(_pilot({4: 0, 6: 6, 8: 6}))
    assert got["num_layers"] == 6 and not got["inside"]  # 1.0 is 1/3 from 2/3, 0.0 is 1/2 from 1/2
    with pytest.raises(ValueError, match="pilot"):
        K.pick_setting([])


def test_arm_table_counts_fisher_and_overhead():
    rows = [_row(4, 100 + t, t < 12) for t in range(24)]  # control 12/24
    rows += [_row(4, 100 + t, t < 3, method="kss0.15", train_seconds=66.0 if t >= 3 else 30.0) for t in range(24)]
    table = {t["arm"]: t for t in K.arm_table(rows)}
    assert set(table) == {"none", "kss0.15"}  # arms without rows are left out
    ctrl, kss = table["none"], table["kss0.15"]
    assert (ctrl["diverged"], ctrl["trials"], ctrl["fisher_p"]) == (12, 24, None)
    assert kss["diverged"] == 3 and kss["rate"] == pytest.approx(3 / 24)
    assert kss["fisher_p"] == pytest.approx(fisher_exact([[3, 21], [12, 12]]))
    assert kss["overhead"] == pytest.approx(0.1)  # 66 s vs 60 s for 300 finished steps
    assert kss["accuracy"] == pytest.approx(0.1) and kss["near_unit_after"] == pytest.approx(0.7)
    assert kss["seeds_diverged"] == [100, 101, 102] and kss["causes"] == {"loss": 3}


def test_merge_summary_keeps_the_d32_numbers_once_and_is_idempotent():
    old = {"baseline_divergence_rate": 0.125, "kss_divergence_rate": 0.083, "kss_divergence_rate_uncapped": 0.71,
           "n_runs": 7}
    keys = {"baseline_divergence_rate": 0.5, "kss_divergence_rate": 0.4, "kss_divergence_rate_uncapped": 0.9,
            "kss_setting": "d=128"}
    merged = K.merge_summary(old, keys)
    assert merged["baseline_divergence_rate"] == 0.5 and merged["kss_setting"] == "d=128" and merged["n_runs"] == 7
    assert merged["prevention_d32_baseline_divergence_rate"] == 0.125
    assert merged["prevention_d32_kss_divergence_rate_uncapped"] == 0.71
    again = K.merge_summary(merged, {**keys, "kss_divergence_rate": 0.3})
    assert again["prevention_d32_kss_divergence_rate"] == 0.083 and again["kss_divergence_rate"] == 0.3
    assert K.merge_summary(old, {}) == old  # nothing measured yet: the summary is untouched


def test_grids_share_seeds_and_lrs_across_arms_and_put_required_arms_first():
    specs = K.comparison_specs(6, 300)
    assert len(specs) == 6 * K.TRIALS
    first = specs[: 4 * K.TRIALS]
    assert {s.method for s in first} == set(K.REQUIRED_ARMS)
    by_seed = {}
    for s in specs:
        by_seed.setdefault(s.seed, set()).add((s.learning_rate, s.num_layers, s.max_steps, s.warmup_steps))
    assert all(len(v) == 1 for v in by_seed.values())  # same LR / depth / horizon in every arm of a trial
    assert {s.learning_rate for s in specs} == set(K.LRS)
    assert all(s.hidden_size == K.HIDDEN and s.norm == "none" and s.backend == "trainer" for s in specs)
    assert not {s.seed for s in specs} & set(K.PILOT_SEEDS)  # the setting is never chosen on comparison seeds
    assert len(K.comparison_specs(6, 300, arms=("none", "clip1.0"))) == 2 * K.TRIALS


def test_max_lr_reading_rule():
    from research.experiments.analysis import max_stable_lr_table
    from research.experiments.kss_v2 import max_lr_reading

    def rows(norm, method, rates):
        return [{"norm": norm, "method": method, "learning_rate": lr, "diverged": i < round(3 * rate)}
                for lr, rate in rates.items() for i in range(3)]

    table = max_stable_lr_table(
        rows("a", "none", {0.01: 0, 0.03: 1, 0.1: 1}) + rows("a", "kss0.15", {0.01: 0, 0.03: 0, 0.1: 1})  # +1 rung, 1.0
        + rows("b", "none", {0.01: 0, 0.03: 1 / 3, 0.1: 1}) + rows("b", "kss0.15", {0.01: 0, 0.03: 0, 0.1: 1})  # 1/3
        + rows("c", "none", {0.01: 0, 0.03: 0, 0.1: 1}) + rows("c", "kss0.15", {0.01: 1, 0.03: 1, 0.1: 1})  # lowers
        + rows("d", "none", {0.01: 0, 0.03: 1, 0.1: 1}) + rows("d", "kss0.15", {0.01: 0, 0.03: 1, 0.1: 1})
    )
    reading = max_lr_reading(table)
    assert reading["a"].startswith("KSS raises the max stable LR (n = 3")
    assert "no measurable difference" in reading["b"] and "0.33" in reading["b"]
    assert reading["c"].startswith("KSS lowers the max stable LR")
    assert "no difference" in reading["d"]
