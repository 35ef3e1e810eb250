"""Divergence labelling (paper Sec. 3.1), gradient baselines and the statistics, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from research.experiments import (
    auroc,
    bootstrap_auroc,
    count_loss_spikes,
    expected_calibration_error,
    fisher_exact,
    gradient_baselines,
    is_divergent_step,
    label_divergence,
    reliability_bins,
)


def test_divergence_thresholds_are_the_papers():
    assert not is_divergent_step(50.0, 500.0)  # "exceeds": strictly greater
    assert is_divergent_step(50.01, 1.0)
    assert is_divergent_step(1.0, 500.01)
    assert is_divergent_step(float("nan"), 1.0)
    assert is_divergent_step(1.0, float("inf"))
    lab = label_divergence([5, 4, 60, float("nan")], [1, 1, 1, 1])
    assert (lab.diverged, lab.step, lab.reason) == (True, 3, "loss")
    lab = label_divergence([5, 4, 3], [1, 600, 1])
    assert (lab.diverged, lab.step, lab.reason) == (True, 2, "grad_norm")
    lab = label_divergence([5, float("inf")], [1, 1])
    assert (lab.step, lab.reason) == (2, "non_finite")
    assert not label_divergence([5.0] * 10, [1.0] * 10).diverged
    with pytest.raises(ValueError, match="same length"):
        label_divergence([1, 2], [1])


def test_loss_spikes_definition():
    flat = [2.0] * 30
    assert count_loss_spikes(flat) == 0
    spiky = [2.0] * 10 + [3.1] + [2.0] * 10 + [float("nan")]
    assert count_loss_spikes(spiky) == 2  # 3.1 > 1.5 * 2.0, and the NaN
    assert count_loss_spikes([2.0, 9.0]) == 0  # fewer than 5 previous losses: no reference yet
    assert count_loss_spikes(spiky, end=15) == 1


def test_gradient_baselines_carry_last_value_and_map_nonfinite_to_inf():
    g = list(range(1, 121))
    b = gradient_baselines([1.0] * 120, g)
    assert b["initial_grad_norm"] == 1 and b["grad_norm_step100"] == 100
    assert b["grad_norm_var_1_100"] == pytest.approx(np.var(np.arange(1, 101)))
    short = gradient_baselines([1.0, 1.0, float("nan")], [1.0, 2.0, float("nan")])
    assert short["grad_norm_step100"] == math.inf and short["grad_norm_var_1_100"] == math.inf
    assert short["loss_spikes_1_500"] == 1 and short["loss_spikes_1_100"] == 1


def test_spike_counts_cover_their_windows():
    # one spike at step 50, one at step 300 (each 3.1 > 1.5 x 2.0), one at step 600 (beyond the paper's 1-500 window)
    losses = [2.0] * 700
    for step in (50, 300, 600):
        losses[step - 1] = 3.1
    b = gradient_baselines(losses, [1.0] * 700)
    assert b["loss_spikes_1_100"] == 1 and b["loss_spikes_1_500"] == 2


def test_auroc_hand_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # pairs (pos, neg): (0.5 vs 0.5 tie -> 1/2), (0.5 vs 0.1 -> 1), (0.3 vs 0.5 -> 0), (0.3 vs 0.1 -> 1) = 2.5 / 4
    assert auroc([0.5, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.625)
    assert auroc([math.inf, 1.0, 0.0], [1, 0, 0]) == 1.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 1.0], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])


def test_auroc_agrees_with_scikit_learn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(3)
    for _ in range(50):  # ties included: scores on a coarse grid
        n = int(rng.integers(4, 120))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = np.round(rng.normal(size=n) + y, 1)
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_statistic_has_the_bits_of_the_point_estimate():
    from research.experiments.stats import _auroc, _auroc_along_last_axis

    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=(40, 30)), 1)
    s[0, 0] = np.inf
    y = rng.integers(0, 2, (40, 30))
    y[1] = 1  # one resample with a single class: NaN
    batched = _auroc_along_last_axis(s, y)
    for b in range(40):
        one = _auroc(s[b], y[b])
        assert (math.isnan(one) and math.isnan(batched[b])) or one == batched[b]


def test_bootstrap_keeps_only_resamples_with_both_classes():
    # 2 positives in 12 rows: about a third of the resamples hold no positive; they are dropped, not counted as NaN
    s, y = np.arange(12.0), np.array([0] * 10 + [1] * 2)
    point, (lo, hi) = bootstrap_auroc(s, y, n_resamples=200, seed=0)
    assert point == 1.0 and (lo, hi) == (1.0, 1.0)


def test_bootstrap_ci_brackets_the_point_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.0, 200)
    point, (lo, hi) = bootstrap_auroc(s, y, n_resamples=300, seed=1)
    assert lo < point < hi and 0.5 < lo and hi < 1.0
    assert bootstrap_auroc(s, y, n_resamples=300, seed=1) == (point, (lo, hi))
    perfect, ci = bootstrap_auroc([0, 0, 1, 1], [0, 0, 1, 1], n_resamples=50)
    assert perfect == 1.0 and ci == (1.0, 1.0)


def test_ece_hand_case():
    # bin [0.1,0.2): probs 0.1,0.1 with outcomes 0,1 -> |0.5-0.1| * 2/4 ; bin [0.9,1]: 0.9,0.9 with 1,1 -> |1-0.9| * 2/4
    p, y = [0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == 0.0
    bins = reliability_bins(p, y, n_bins=10)
    assert [b["count"] for b in bins] == [2, 2] and bins[1]["frac_positive"] == 1.0
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([1.2], [1])


def test_fisher_exact_matches_known_values():
    # classic tea-tasting table: p = 0.4857 (two-sided)
    assert fisher_exact([[3, 1], [1, 3]]) == pytest.approx(0.4857142857, rel=1e-6)
    # 16/24 vs 3/24 (the paper's 66.7% -> 12.5%), scipy.stats.fisher_exact gives 2.7507e-4
    assert fisher_exact([[16, 8], [3, 21]]) == pytest.approx(2.7506701357e-4, rel=1e-6)
    assert fisher_exact([[5, 5], [5, 5]]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fisher_exact([[-1, 2], [3, 4]])
