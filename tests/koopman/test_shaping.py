"""KSS math: Eqs. 14-15 against hand-written formulas, the differentiable randomized DMD, its guards."""

from __future__ import annotations

import math

import pytest
import torch

from hf_koopman.koopman.shaping import (
    DEFAULT_BETA,
    SpectralShapingError,
    differentiable_dmd_eigenvalues,
    kss_penalty,
    soft_near_unit_mass,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _reference_penalty(mods: list[float], T=20.0, tu=1.05, tl=0.90, gamma=0.4, beta=DEFAULT_BETA) -> float:
    unstable = sum(_sig(T * (m - tu)) * _softplus(m - tu) ** 2 for m in mods)
    m_soft = sum(_sig(T * (m - tl)) * _sig(T * (tu - m)) for m in mods) / len(mods)
    return unstable + beta * (m_soft - gamma) ** 2


def _whitened_dmd_reference(X: torch.Tensor, Y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Full-rank whitened DMD (Eqs. 6-9) in float64, written out independently of the library."""
    X, Y = X.double(), Y.double()
    n, d = X.shape
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    cov = Xc.T @ Xc / (n - 1) + eps * torch.eye(d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    W = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    Xt, Yt = W @ Xc.T, W @ Yc.T  # (d, N)
    A = Yt @ torch.linalg.pinv(Xt)
    return torch.linalg.eigvals(A)


def _planted(n=600, d=24, moduli=(1.4, 1.2, 1.1, 0.95, 0.7, 0.5), seed=0):
    """Y = X M^T with a known spectrum: moduli[:-2] real eigenvalues, a complex pair of modulus moduli[-2], rest 0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    D = torch.zeros(d, d, dtype=torch.float64)
    for i, m in enumerate(moduli[:-2]):
        D[i, i] = m
    c, s = moduli[-2] * math.cos(0.3), moduli[-2] * math.sin(0.3)  # complex pair with modulus moduli[-2]
    k = len(moduli) - 2
    D[k : k + 2, k : k + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    M = U @ D @ U.T
    return X, X @ M.T


def test_penalty_and_soft_mass_match_equations_14_15():
    mods = [0.3, 0.85, 0.95, 1.0, 1.04, 1.06, 1.3, 2.0]
    phases = torch.linspace(0, 3, len(mods), dtype=torch.float64)
    ev = torch.polar(torch.tensor(mods, dtype=torch.float64), phases)
    assert kss_penalty(ev).item() == pytest.approx(_reference_penalty(mods), rel=1e-9)
    expected_m = sum(_sig(20 * (m - 0.9)) * _sig(20 * (1.05 - m)) for m in mods) / len(mods)
    assert soft_near_unit_mass(ev).item() == pytest.approx(expected_m, rel=1e-9)
    # other hyper-parameters are honoured, real eigenvalues accepted, batch dimensions kept
    assert kss_penalty(ev, temperature=5, gamma=0.3, beta=2.0).item() == pytest.approx(
        _reference_penalty(mods, T=5, gamma=0.3, beta=2.0), rel=1e-9
    )
    batch = torch.stack([ev, ev * 0.5])
    assert kss_penalty(batch).shape == (2,)
    assert kss_penalty(torch.tensor([-1.3, 0.5])).item() == pytest.approx(_reference_penalty([1.3, 0.5]), rel=1e-6)


def test_penalty_gradient_pushes_expanding_modes_inwards():
    ev = torch.tensor([1.5 + 0.0j, 0.2 + 0.0j], dtype=torch.complex128, requires_grad=True)
    kss_penalty(ev, beta=0.0).backward()
    # d penalty / d Re(lambda) > 0 for the expanding mode (descent shrinks it); ~0 far inside the unit disc
    assert ev.grad[0].real > 0.1
    assert abs(ev.grad[1].real) < 1e-3
    # the near-unit term alone pushes a spectrum full of near-unit modes out of the band
    near = torch.full((8,), 1.0, dtype=torch.float64, requires_grad=True)
    kss_penalty(near, gamma=0.0, beta=1.0).backward()
    assert torch.isfinite(near.grad).all() and near.grad.abs().sum() > 0


def test_penalty_input_validation():
    ev = torch.ones(4)
    with pytest.raises(ValueError, match="tau_l < tau_u"):
        kss_penalty(ev, tau_l=1.1, tau_u=1.0)
    with pytest.raises(ValueError, match="gamma"):
        kss_penalty(ev, gamma=1.5)
    with pytest.raises(ValueError, match="beta"):
        kss_penalty(ev, beta=-1.0)
    with pytest.raises(ValueError, match="at least one eigenvalue"):
        soft_near_unit_mass(torch.ones(3, 0))


def test_randomized_dmd_recovers_planted_spectrum_and_full_reference():
    moduli = (1.4, 1.2, 1.1, 0.95, 0.7, 0.5)
    X, Y = _planted(moduli=moduli)
    g = torch.Generator().manual_seed(0)
    ev = differentiable_dmd_eigenvalues(X.float(), Y.float(), rank=6, generator=g)
    assert ev.shape == (6,) and ev.dtype == torch.complex128
    got = sorted(ev.abs().tolist())
    ref = sorted(_whitened_dmd_reference(X, Y).abs().tolist())[-6:]
    assert got == pytest.approx(ref, abs=2e-3)
    # whitening is a similarity transform for this linear map, so the planted moduli come back too
    planted = sorted(list(moduli[:-2]) + [moduli[-2]] * 2)
    assert got == pytest.approx(planted, abs=5e-3)


def test_gradients_reach_snapshots_and_lower_the_penalty():
    X, Y = _planted(n=400, d=16, moduli=(1.5, 1.3, 1.2, 1.0, 0.9, 0.8))
    X = X.float()
    Y = Y.float().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    before = kss_penalty(differentiable_dmd_eigenvalues(X, Y, rank=6, generator=g))
    before.backward()
    assert Y.grad is not None and torch.isfinite(Y.grad).all() and Y.grad.abs().sum() > 0
    with torch.no_grad():
        Y2 = Y - 0.5 * Y.grad / Y.grad.norm() * Y.norm() * 0.05
    after = kss_penalty(differentiable_dmd_eigenvalues(X, Y2, rank=6, generator=torch.Generator().manual_seed(1)))
    assert after.item() < before.item()


def test_whitening_is_detached_x_still_gets_gradient():
    X, Y = _planted(n=300, d=12, moduli=(1.3, 1.1, 0.9, 0.6))
    X = X.float().requires_grad_(True)
    ev = differentiable_dmd_eigenvalues(X, Y.float(), rank=4, generator=torch.Generator().manual_seed(0))
    kss_penalty(ev).backward()
    assert X.grad is not None and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0


def test_batched_matches_unbatched_and_rank_is_clipped():
    X1, Y1 = _planted(seed=0)
    X2, Y2 = _planted(seed=1)
    X = torch.stack([X1, X2]).float()
    Y = torch.stack([Y1, Y2]).float()
    batched = differentiable_dmd_eigenvalues(X, Y, rank=6, generator=torch.Generator().manual_seed(3))
    single = differentiable_dmd_eigenvalues(X[1], Y[1], rank=6, generator=torch.Generator().manual_seed(3))
    assert batched.shape == (2, 6)
    assert sorted(batched[1].abs().tolist()) == pytest.approx(sorted(single.abs().tolist()), abs=1e-3)
    small = differentiable_dmd_eigenvalues(X1[:5].float(), Y1[:5].float(), rank=32)
    assert small.shape == (4,)  # min(d, N - 1)


def test_defective_operator_raises_shaping_error_and_never_nan():
    # Y = X J^T with a 2x2 Jordan block: a defective operator whose eig backward is unusable
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 2, generator=g, dtype=torch.float64)
    X = (X - X.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(X.T)).T)  # exactly white
    J = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(SpectralShapingError) as info:
        differentiable_dmd_eigenvalues(X, X @ J.T, rank=2, oversample=0, eps=1e-12, max_condition=1e6)
    assert info.value.layers == [0]


def test_non_finite_grad_through_operator_is_zeroed(caplog):
    X, Y = _planted(n=200, d=8, moduli=(1.2, 0.9, 0.5, 0.4))
    Y = Y.float().requires_grad_(True)
    ev = differentiable_dmd_eigenvalues(X.float(), Y, rank=4, generator=torch.Generator().manual_seed(0))
    (ev.abs().sum() * float("nan")).backward()  # a poisoned upstream gradient
    assert torch.isfinite(Y.grad).all()
    assert "non-finite gradient" in caplog.text


def test_input_validation():
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="share a shape"):
        differentiable_dmd_eigenvalues(X, torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        differentiable_dmd_eigenvalues(X[:1], X[:1])
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite snapshots"):
        differentiable_dmd_eigenvalues(bad, X)
    with pytest.raises(TypeError):
        differentiable_dmd_eigenvalues(X.numpy(), X)
    with pytest.raises(ValueError, match="rank"):
        differentiable_dmd_eigenvalues(X, X, rank=0)


def test_fewer_samples_than_features_uses_the_row_space_of_x():
    """N - 1 < d: the Ritz values over the whole row space of the centred X are the core's (row-space reduced) exact
    nonzero eigenvalues; without the reduction the eps-amplified out-of-span part of Y takes over the sketch and most
    eigenvalues come out as spurious zeros. Gradients still reach X and Y."""
    from hf_koopman.koopman import whitened_dmd

    g = torch.Generator().manual_seed(4)
    n, d = 20, 64
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X + 0.3 * torch.tanh(X @ torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
    with pytest.warns(UserWarning):
        core = whitened_dmd(X, Y).eigenvalues
    ref = sorted(core.abs().tolist())[-(n - 1):]  # the N - 1 identifiable modes
    Yg = Y.clone().requires_grad_(True)
    ev = differentiable_dmd_eigenvalues(X, Yg, rank=32, oversample=0, generator=torch.Generator().manual_seed(0))
    assert ev.shape == (n - 1,)
    # A = W C_yx W equals the least-squares operator of the core up to O(eps / sigma_min) (module docstring)
    assert sorted(ev.abs().tolist()) == pytest.approx(ref, rel=1e-4)
    assert min(ev.abs().tolist()) > 0.05  # no spurious zero modes
    kss_penalty(ev).backward()
    assert torch.isfinite(Yg.grad).all() and Yg.grad.abs().sum() > 0


def test_output_components_outside_the_span_of_x_do_not_pollute_the_spectrum():
    """Pad X with features it never visits and give Y junk there (N - 1 < d after padding). Those directions carry no
    input information, but the ridge-whitening amplifies them ~316x, so without the row-space reduction they take over
    the rank-r subspace and come back as spurious zero eigenvalues. With it, the padded problem gives the spectrum of
    the original one (the sketch covers the whole range, so the result does not depend on the random draw)."""
    X, Y = _planted(n=20, d=12, moduli=(1.4, 1.2, 1.1, 0.95, 0.7, 0.5))
    junk = torch.randn(20, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Xp = torch.cat([X, torch.zeros_like(X)], dim=1)  # (20, 24): N - 1 = 19 < d = 24
    Yp = torch.cat([Y, junk], dim=1)
    kw = dict(rank=6, oversample=30, power_iters=0)
    ref = differentiable_dmd_eigenvalues(X, Y, generator=torch.Generator().manual_seed(0), **kw)
    got = differentiable_dmd_eigenvalues(Xp, Yp, generator=torch.Generator().manual_seed(1), **kw)
    assert sorted(got.abs().tolist()) == pytest.approx(sorted(ref.abs().tolist()), rel=1e-6)
    assert min(got.abs().tolist()) > 0.3


@pytest.mark.parametrize("rank", [None, 8])
def test_kss_and_the_profile_share_one_operator(rank):
    """On the same snapshots KSS's eigenvalues are the profile's, so both report the same spectral masses."""
    from hf_koopman.koopman import spectral_features, whitened_dmd

    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 600, 24, generator=g)
    Y = X + 0.4 * torch.tanh(X @ torch.randn(24, 24, generator=g) / 24**0.5)
    kss = differentiable_dmd_eigenvalues(X, Y.requires_grad_(True), rank=rank,
                                         generator=torch.Generator().manual_seed(0))
    res = whitened_dmd(X, Y.detach(), rank=rank, randomized=rank is not None,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kss.detach(), res.eigenvalues, atol=1e-5, rtol=0)
    feats = spectral_features(res)
    for layer, f in zip(kss.detach(), feats):
        moduli = layer.abs()
        assert float(((moduli >= 0.90) & (moduli <= 1.05)).double().mean()) == pytest.approx(f.near_unit_mass)
        assert float((moduli > 1.05).double().mean()) == pytest.approx(f.unstable_mass)


def test_an_input_that_does_not_vary_across_tokens_is_refused_by_layer():
    g = torch.Generator().manual_seed(0)
    for n, d, dtype in ((64, 8, torch.float64), (16, 32, torch.float64), (64, 8, torch.float32)):
        X = torch.randn(3, n, d, generator=g, dtype=dtype)
        Y = X + 0.1 * torch.randn(3, n, d, generator=g, dtype=dtype)
        X[1] = X[1, :1].expand(n, d)  # one layer's input is the same row for every token (zero-initialised queries)
        with pytest.raises(SpectralShapingError, match=r"no identifiable mode for layer indices \[1\]") as err:
            differentiable_dmd_eigenvalues(X, Y)
        assert err.value.layers == [1]
        assert differentiable_dmd_eigenvalues(X[0], Y[0]).shape == (min(d, n - 1),)  # the others keep their spectrum


def test_a_small_variation_on_a_large_offset_keeps_its_spectrum():
    g = torch.Generator().manual_seed(0)
    X = 1000 + 0.01 * torch.randn(128, 32, generator=g)  # float32: the variation is ~1e-5 of the offset
    A = 0.5 * torch.randn(32, 32, generator=g, dtype=torch.float64) / 32 ** 0.5
    Y = X + ((X - X.mean(0)).double() @ A).float()
    assert differentiable_dmd_eigenvalues(X, Y).shape == (32,)
