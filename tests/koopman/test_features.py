"""Spectral features: masses, rho, kappa(V), eta_nl, ResDMD filter, degeneracy, rank-limited data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_koopman.koopman import (
    FEATURE_NAMES,
    LayerFeatures,
    eigvec_condition,
    resdmd_residuals,
    spectral_features,
    spectral_masses,
    whitened_dmd,
)
from _planted import anisotropic_states, planted_operator

F64 = torch.float64


def _planted_result(noise=0.0, **kwargs):
    # one eigenvalue in each band: unstable 1.2 | near 1.0, 0.95, complex pair 0.98 | mid 0.85 | contractive 0.5, -0.3
    A, lam = planted_operator([1.2, 1.0, 0.95, 0.85, 0.5, -0.3], pair=(0.98, 0.5), seed=3)
    X = anisotropic_states(3000, 8, seed=4)
    Y = X @ A.T + noise * torch.randn(X.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    return whitened_dmd(X, Y, **kwargs), A, lam


def test_masses_of_planted_spectrum():
    res, A, lam = _planted_result()
    f = spectral_features(res)
    assert isinstance(f, LayerFeatures)
    assert f.n_modes == 8 and f.n_reliable == 8 and not f.degenerate
    assert f.unstable_mass == pytest.approx(1 / 8)
    assert f.near_unit_mass == pytest.approx(4 / 8)
    assert f.mid_mass == pytest.approx(1 / 8)
    assert f.contractive_mass == pytest.approx(2 / 8)
    assert f.spectral_radius == pytest.approx(1.2, abs=1e-9)
    assert f.kreiss == math.inf  # rho > 1
    assert 0 <= f.nonlinearity < 1e-6  # exactly linear data
    # kappa(V) with unit-norm eigenvectors, against numpy on the same operator
    w, V = np.linalg.eig(res.operator.numpy())
    V = V / np.linalg.norm(V, axis=0)
    assert f.eigvec_condition == pytest.approx(np.linalg.cond(V), rel=1e-6)
    assert f.eigvec_condition > 1.5  # the planted basis is non-normal


def test_masses_partition_to_one_on_random_operators():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(400, 12, generator=g, dtype=F64)
        Y = X @ (torch.randn(12, 12, generator=g, dtype=F64) * 0.4) + torch.tanh(X)
        for kwargs in ({}, {"rank": 6, "randomized": True}):
            for reliable_only in (False, True):
                f = spectral_features(whitened_dmd(X, Y, **kwargs), reliable_only=reliable_only)
                total = f.near_unit_mass + f.unstable_mass + f.contractive_mass + f.mid_mass
                assert total == pytest.approx(1.0, abs=1e-12) or (reliable_only and f.n_reliable == 0
                                                                  and math.isnan(total))


def test_band_edges_follow_definition_1():
    moduli = torch.tensor([1.05, 0.90, 0.80, 1.0500001, 0.7999999, 0.85, 1.0], dtype=F64)
    near, unstable, contractive, mid = spectral_masses(moduli)
    assert (near, unstable, contractive, mid) == pytest.approx((3 / 7, 1 / 7, 1 / 7, 2 / 7))
    assert spectral_masses(torch.tensor([], dtype=F64)) == (0.0, 0.0, 0.0, 0.0)
    # thresholds are arguments
    near, unstable, contractive, mid = spectral_masses(moduli, near_band=(0.95, 1.01), contractive_below=0.5)
    assert unstable == pytest.approx(2 / 7) and near == pytest.approx(1 / 7) and contractive == 0.0


def test_resdmd_filter_drops_a_planted_spurious_mode():
    d = 6
    A, _ = planted_operator([1.0, 0.95, 0.7, 0.5, 0.3], seed=1)
    X = anisotropic_states(3000, d, seed=2, spread=5.0)
    Y = torch.empty_like(X)
    Y[:, :5] = X[:, :5] @ A.T + 0.01 * X[:, 5:6]
    # the last coordinate of Y is pure noise, unrelated to X: its mode is spurious
    Y[:, 5] = torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=F64) * X[:, 5].std()
    res = whitened_dmd(X, Y)
    r = resdmd_residuals(res)
    f = spectral_features(res)
    assert f.n_modes == 6 and f.n_reliable == 5
    bad = int(torch.argmax(r))
    assert float(r[bad]) > 0.5 and float(torch.sort(r).values[-2]) < 0.1
    assert abs(complex(res.eigenvalues[bad])) < 0.1  # the spurious mode is the ~0 eigenvalue of the noise coordinate
    # residual_tol and reliable_only are honoured
    assert spectral_features(res, residual_tol=10.0).n_reliable == 6
    f_rel = spectral_features(res, reliable_only=True)
    assert f_rel.contractive_mass == pytest.approx(3 / 5)  # 0.7, 0.5, 0.3 among the 5 reliable modes
    assert f.contractive_mass == pytest.approx(4 / 6)  # ... and the spurious ~0, among all 6


def _planted_with_sixth(sixth) -> torch.Tensor:
    """Snapshots of five planted modes (1.0, 0.95, 0.7, 0.5, 0.3) and a sixth coordinate `sixth(X)`: `(3000, 6)`."""
    A, _ = planted_operator([1.0, 0.95, 0.7, 0.5, 0.3], seed=1)
    X = anisotropic_states(3000, 6, seed=2, spread=5.0)
    Y = torch.empty_like(X)
    Y[:, :5] = X[:, :5] @ A.T + 0.01 * X[:, 5:6]
    Y[:, 5] = sixth(X)
    return X, Y


def test_a_mode_with_a_residual_between_tau_and_twice_tau_is_not_reliable():
    noise = torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=F64)
    X, Y = _planted_with_sixth(lambda X: 0.6 * X[:, 5] + 0.15 * noise * X[:, 5].std())
    res = whitened_dmd(X, Y)
    r = sorted(float(v) for v in resdmd_residuals(res))
    assert r[-2] < 0.1 < r[-1] < 0.2  # one mode between the paper's tau = 0.1 and 0.2
    assert spectral_features(res).n_reliable == 5  # the default tau is the paper's
    assert spectral_features(res, residual_tol=0.2).n_reliable == 6


def test_the_reliable_spectral_radius_leaves_out_a_large_spurious_mode():
    noise = torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=F64)
    X, Y = _planted_with_sixth(lambda X: 1.5 * X[:, 5] + noise * X[:, 5].std())
    res = whitened_dmd(X, Y)
    assert spectral_features(res).spectral_radius > 1.3  # the spurious mode is the largest ...
    assert spectral_features(res, reliable_only=True).spectral_radius == pytest.approx(1.0, abs=0.01)  # ... left out


def test_nonlinearity_grows_with_unmodelled_dynamics():
    X = anisotropic_states(2000, 6, seed=5, spread=3.0) - 3.0
    lin = spectral_features(whitened_dmd(X, X * 0.9 + 0.1 * X.roll(1, dims=1))).nonlinearity
    nonlin = spectral_features(whitened_dmd(X, X + torch.sin(3 * X))).nonlinearity
    assert lin < 1e-6 < 0.1 < nonlin < 10


def test_degenerate_update_is_flagged_and_finite():
    X = anisotropic_states(500, 6)
    for kwargs in ({}, {"rank": 4, "randomized": True}):
        f = spectral_features(whitened_dmd(X, X.clone(), **kwargs))
        assert f.degenerate
        for name in FEATURE_NAMES:
            assert not math.isnan(getattr(f, name)), name
        assert f.nonlinearity == 0.0 and f.eigvec_condition == pytest.approx(1.0)
        assert f.kreiss == pytest.approx(1.0, abs=1e-6)  # A = I
    # degenerate_tol can be overridden at feature time
    res = whitened_dmd(X, X * 1.001)
    assert not spectral_features(res).degenerate and spectral_features(res, degenerate_tol=1e-2).degenerate


def test_rank_limited_data_counts_only_identifiable_modes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 20, generator=g, dtype=F64)
    Y = X @ (0.5 * torch.eye(20, dtype=F64))
    with pytest.warns(UserWarning):
        res = whitened_dmd(X, Y)
    f = spectral_features(res)
    assert f.n_modes == 11  # N - 1; the 9 null-space modes (lambda = 0) are not counted
    assert f.contractive_mass == pytest.approx(1.0)  # all identifiable modes are 0.5
    assert f.spectral_radius == pytest.approx(0.5, abs=1e-8)


def test_batched_features_and_to_dict():
    Xs = torch.stack([anisotropic_states(400, 5, seed=s) for s in range(3)])
    Ys = Xs * torch.tensor([0.5, 1.0, 1.3], dtype=F64)[:, None, None]
    feats = spectral_features(whitened_dmd(Xs, Ys))
    assert isinstance(feats, list) and len(feats) == 3
    assert [f.spectral_radius for f in feats] == pytest.approx([0.5, 1.0, 1.3], abs=1e-8)
    assert [f.near_unit_mass for f in feats] == [0.0, 1.0, 0.0]
    d = feats[0].to_dict()
    assert set(LayerFeatures.FIELDS) == set(FEATURE_NAMES) <= set(d)
    assert {"n_modes", "n_reliable", "degenerate"} <= set(d)


def test_eigvec_condition_large_path_agrees_with_svd():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(80, 80, generator=g, dtype=torch.complex128) + 4 * torch.eye(80, dtype=torch.complex128)
    Vn = V / torch.linalg.vector_norm(V, dim=0)
    s = torch.linalg.svdvals(Vn)
    assert eigvec_condition(V) == pytest.approx(float(s[0] / s[-1]), rel=1e-6)
    assert eigvec_condition(torch.eye(3, dtype=torch.complex128)) == pytest.approx(1.0)


def test_threshold_validation():
    res, _, _ = _planted_result()
    with pytest.raises(ValueError, match="contractive_below"):
        spectral_features(res, contractive_below=0.95)
    with pytest.raises(ValueError, match="near_band"):
        spectral_features(res, near_band=(1.05,))
    with pytest.raises(ValueError, match="residual_tol"):
        spectral_features(res, residual_tol=0.0)
    with pytest.raises(TypeError, match="DMDResult"):
        spectral_features(torch.zeros(3))


def test_a_layer_with_no_counted_mode_is_not_measured_and_not_read():
    # reliable_only=True on an output unrelated to its input: no mode passes the residual test, so nothing was
    # measured; masses of 0 and rho = 0 would read as a "safe" layer and pull the aggregates down
    from hf_koopman.koopman import aggregate_features
    from hf_koopman.profiling import profile_from_snapshots
    from hf_koopman.risk import DecisionRule

    g = torch.Generator().manual_seed(0)
    X, noise = torch.randn(1024, 32, generator=g), torch.randn(1024, 32, generator=g)
    f = spectral_features(whitened_dmd(X, noise), reliable_only=True)
    assert f.n_reliable == 0 and math.isnan(f.near_unit_mass) and math.isnan(f.spectral_radius)
    assert not DecisionRule().is_informative(f)
    prof = profile_from_snapshots([("a", X, noise)], progress=False, reliable_only=True)
    assert prof.verdict == "uninformative" and "nan%" not in prof.to_markdown()
    Y = X + 0.1 * X @ torch.randn(32, 32, generator=g) / 32**0.5
    good = spectral_features(whitened_dmd(X, Y), reliable_only=True)
    agg = aggregate_features([good, f])
    assert agg["spectral_radius_mean"] == pytest.approx(good.spectral_radius)  # the unmeasured layer is skipped
