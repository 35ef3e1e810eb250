"""Known-answer tests for whitened DMD (exact, deterministic rank-r, randomized rank-r)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hf_koopman.koopman.dmd as dmd_module
from hf_koopman.koopman import DMDResult, whiten, whitened_dmd, zca_whitening
from _planted import anisotropic_states, planted_operator, sort_eigs, wide_float64_pairs

F64 = torch.float64


def _system(n=3000, seed=0):
    A, lam = planted_operator([1.2, 1.0, 0.95, 0.85, 0.5, -0.3], pair=(0.9, 0.6), seed=seed)
    X = anisotropic_states(n, A.shape[0], seed=seed + 1)
    Y = X @ A.T + 0.7  # y = A x + c: the offset is removed by centring Y on its own mean
    return A, lam, X, Y


def test_exact_recovers_planted_real_and_complex_eigenvalues():
    _, lam, X, Y = _system()
    res = whitened_dmd(X, Y)
    assert isinstance(res, DMDResult) and not res.batched
    assert res.eigenvalues.dtype == torch.complex128 and res.eigenvalues.shape == (8,)
    torch.testing.assert_close(sort_eigs(res.eigenvalues), lam, rtol=0, atol=1e-9)
    # sorted by decreasing modulus, unit-norm right and left eigenvectors that diagonalise the operator
    assert torch.all(res.eigenvalues.abs()[:-1] >= res.eigenvalues.abs()[1:] - 1e-12)
    torch.testing.assert_close(torch.linalg.vector_norm(res.eigenvectors, dim=0), torch.ones(8, dtype=F64))
    A = res.operator.to(torch.complex128)
    torch.testing.assert_close(A @ res.eigenvectors, res.eigenvectors * res.eigenvalues, atol=1e-9, rtol=0)
    u = res.left_eigenvectors
    torch.testing.assert_close(u.mH @ A, res.eigenvalues[:, None] * u.mH, atol=1e-9, rtol=0)
    # randomized and deterministic rank-r DMD with r = d span everything: the same planted spectrum
    for randomized in (True, False):
        res_r = whitened_dmd(X, Y, rank=8, randomized=randomized)
        torch.testing.assert_close(sort_eigs(res_r.eigenvalues), lam, rtol=0, atol=1e-9)


def test_operator_is_a_rotation_of_the_zca_operator():
    A, _, X, Y = _system()
    res = whitened_dmd(X, Y)
    wh = zca_whitening(X, 1e-5)
    # the Cholesky coordinates differ from the paper's ZCA coordinates by an orthogonal rotation R
    R = torch.linalg.solve(res.projection, wh.matrix)
    torch.testing.assert_close(R.T @ R, torch.eye(8, dtype=F64), atol=1e-8, rtol=0)
    # ZCA-whitened operator = W A W^{-1} (pseudo-inverse DMD of exact linear data is exact) = R^T A_chol R
    zca_op = wh.matrix @ A @ torch.linalg.inv(wh.matrix)
    torch.testing.assert_close(R.T @ res.operator @ R, zca_op, atol=1e-8, rtol=1e-8)
    Xt, Yt = whiten(X, Y)
    torch.testing.assert_close(R.T @ res.gram_xx @ R, Xt.T @ Xt / (X.shape[0] - 1), atol=1e-10, rtol=0)
    assert float((Xt.T @ Xt / (X.shape[0] - 1) - torch.eye(8, dtype=F64)).abs().max()) < 1e-3  # whitened ~ I


def test_eigenvalues_invariant_to_change_of_coordinates():
    _, lam, X, Y = _system()
    M = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=F64) + 3 * torch.eye(8, dtype=F64)
    base = sort_eigs(whitened_dmd(X, Y).eigenvalues)
    moved = sort_eigs(whitened_dmd(X @ M, Y @ M).eigenvalues)
    torch.testing.assert_close(moved, base, atol=1e-8, rtol=0)
    # the randomized recipe too (tiny ridge: the eps*I ridge itself is not coordinate-covariant)
    r1 = sort_eigs(whitened_dmd(X, Y, rank=8, randomized=True, eps=1e-12).eigenvalues)
    r2 = sort_eigs(whitened_dmd(X @ M, Y @ M, rank=8, randomized=True, eps=1e-12).eigenvalues)
    torch.testing.assert_close(r2, r1, atol=1e-7, rtol=0)


def test_randomized_matches_exact_when_operator_is_low_rank():
    d, r, n = 40, 5, 2000
    g = torch.Generator().manual_seed(3)
    V = torch.randn(d, d, generator=g, dtype=F64)
    lam_r = torch.tensor([1.1, 0.97, -0.9, 0.6, 0.3], dtype=F64)
    A = V[:, :r] @ torch.diag(lam_r) @ torch.linalg.inv(V)[:r, :]  # rank r
    X = anisotropic_states(n, d, seed=4, spread=10.0)
    Y = X @ A.T
    exact = whitened_dmd(X, Y, eps=1e-12)
    top = exact.eigenvalues[:r]
    torch.testing.assert_close(sort_eigs(top), sort_eigs(lam_r.to(torch.complex128)), atol=1e-8, rtol=0)
    assert float(exact.eigenvalues[r:].abs().max()) < 1e-8
    for randomized in (True, False):
        res = whitened_dmd(X, Y, rank=r, randomized=randomized, eps=1e-12)
        assert res.eigenvalues.shape == (r,) and res.randomized is randomized
        torch.testing.assert_close(sort_eigs(res.eigenvalues), sort_eigs(top), atol=1e-8, rtol=0)
    # with the paper's ridge the match is to O(eps / variance)
    res = whitened_dmd(X, Y, rank=r, randomized=True)
    torch.testing.assert_close(sort_eigs(res.eigenvalues), sort_eigs(top), atol=1e-4, rtol=0)


def _reference_randomized(X, Y, rank, oversample, power_iters, seed=0, eps=1e-5):
    """Independent numpy implementation of the documented recipe on ZCA-whitened snapshots (pydmd.compute_rqb style)."""
    Xt, Yt = (t.numpy() for t in whiten(X, Y, eps))
    n = Xt.shape[0]
    k = rank + oversample
    omega = torch.randn(1, n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)[0].numpy()
    Yc = Yt.T  # (d, N) columns, as in the paper
    Z = Yc @ omega
    for _ in range(power_iters):
        Q = np.linalg.qr(Z)[0]
        S = np.linalg.qr(Yc.T @ Q)[0]
        Z = Yc @ S
    Q = np.linalg.qr(Z)[0]
    Ub = np.linalg.svd(Q.T @ Yc, full_matrices=False)[0]
    U = Q @ Ub[:, :rank]
    bx, by = U.T @ Xt.T, U.T @ Yt.T
    return np.linalg.eigvals(by @ np.linalg.pinv(bx))


def test_randomized_equals_reference_recipe_on_zca_snapshots():
    # the Cholesky-whitened fast path must give exactly the ZCA result (rotation equivariance, see dmd.py)
    X = anisotropic_states(1500, 30, seed=7, spread=20.0)
    W = torch.randn(30, 30, generator=torch.Generator().manual_seed(8), dtype=F64) / 30**0.5
    Y = X + torch.tanh(X @ W) * 2.0
    res = whitened_dmd(X, Y, rank=8, randomized=True, oversample=5, power_iters=1)
    ref = torch.from_numpy(_reference_randomized(X, Y, 8, 5, 1))
    torch.testing.assert_close(sort_eigs(res.eigenvalues), sort_eigs(ref), atol=1e-9, rtol=1e-9)


def test_randomized_is_reproducible_and_seeded():
    X = anisotropic_states(800, 20, seed=2)
    Y = X + torch.sin(X) * 0.5
    a = whitened_dmd(X, Y, rank=6, randomized=True)
    b = whitened_dmd(X, Y, rank=6, randomized=True)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    c = whitened_dmd(X, Y, rank=6, randomized=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.eigenvalues, c.eigenvalues, rtol=0, atol=0)
    e = whitened_dmd(X, Y, rank=6, randomized=True, generator=torch.Generator().manual_seed(1), power_iters=0)
    assert not torch.equal(a.eigenvalues, e.eigenvalues)


def test_batched_equals_per_layer():
    Xs, Ys = [], []
    for s in range(3):
        A, _ = planted_operator([1.1, 0.9, 0.5, -0.2], pair=(0.95, 0.3), seed=s)
        X = anisotropic_states(600, 6, seed=10 + s)
        Xs.append(X)
        Ys.append(X @ A.T + 0.01 * torch.tanh(X))
    X, Y = torch.stack(Xs), torch.stack(Ys)
    for kwargs in ({}, {"rank": 4}, {"rank": 4, "randomized": True}):
        batched = whitened_dmd(X, Y, **kwargs)
        assert batched.batched and batched.num_layers == 3 and batched.eigenvalues.shape[0] == 3
        for i in range(3):
            single = whitened_dmd(X[i], Y[i], **kwargs)
            if kwargs.get("randomized"):  # the batched sketch draws all layers at once: compare to a same-seed draw
                continue
            torch.testing.assert_close(batched.eigenvalues[i], single.eigenvalues, atol=1e-10, rtol=0)
            torch.testing.assert_close(batched.layer(i).operator, single.operator, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    A, lam = planted_operator([1.05, 0.95, 0.7, 0.4], seed=1)
    X = anisotropic_states(2000, 4, seed=3, spread=4.0) - 3.0
    Y = X @ A.T
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for kwargs in ({}, {"rank": 4, "randomized": True}):
        res = whitened_dmd(X.to(dtype), Y.to(dtype), **kwargs)
        assert res.eigenvalues.dtype == torch.complex128 and res.operator.dtype == F64
        assert torch.isfinite(res.eigenvalues).all()
        torch.testing.assert_close(sort_eigs(res.eigenvalues), lam, atol=tol, rtol=0)


def test_numpy_input_accepted():
    X = anisotropic_states(300, 5)
    res = whitened_dmd(X.numpy(), (X * 0.5).numpy())
    torch.testing.assert_close(res.eigenvalues.real, torch.full((5,), 0.5, dtype=F64), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------------ bad / edge input


def test_nan_and_inf_are_reported_with_location():
    X = torch.randn(2, 50, 4, dtype=F64)
    Y = X.clone()
    Y[1, 7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"Y contains 1 non-finite.*layer 1, sample 7, feature 2"):
        whitened_dmd(X, Y)
    X2 = torch.randn(50, 4)
    X2[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"X contains .*sample 3, feature 0"):
        whitened_dmd(X2, X2 * 2)


def test_finite_data_whose_sum_overflows_is_accepted():
    """The NaN/Inf check sums in the input dtype first; an overflowing sum of finite values must not be an error."""
    X = torch.randn(64, 4) * 1e37  # float32 max is 3.4e38: the sum of these values overflows to +-inf
    X[:, 0] = torch.linspace(1e38, 3e38, 64)  # all positive, non-constant
    assert not torch.isfinite(X.sum())
    res = whitened_dmd(X, X * 0.5)  # exact DMD computes in float64 once the check has passed
    torch.testing.assert_close(res.eigenvalues.real, torch.full((4,), 0.5, dtype=F64), atol=1e-6, rtol=0)
    H = torch.full((64, 4), 6e4, dtype=torch.float16) * torch.randn(64, 4).sign().half()
    whitened_dmd(H, H)  # fp16 max is 65504: summed in float32, no false alarm
    H[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"X contains 1 non-finite.*sample 5, feature 1"):
        whitened_dmd(H, H.float().half())


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least N=2"):
        whitened_dmd(torch.randn(1, 4), torch.randn(1, 4))


def test_fewer_samples_than_features_warns_and_works():
    X = torch.randn(10, 30, dtype=F64)
    Y = X @ torch.randn(30, 30, dtype=F64) * 0.1
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y)
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.operator).all()
    assert int(res.rank_x) == 9  # N - 1 after centring
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y, rank=5, randomized=True)
    assert torch.isfinite(res.eigenvalues).all()


def _wide_system(n=48, d=96, seed=0):
    """N < d snapshots of y = A x with a generic A: A maps the N-1 dimensional span of the centred X out of itself."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(0, -2, d, dtype=F64)  # anisotropic
    A = 0.9 * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q + 0.1 * torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    return X, X @ A.T


def _pinv_operator_eigs(X, Y):
    """Non-zero eigenvalues of the unwhitened least-squares operator Yc^T (Xc^T)^+ (numpy, float64 reference)."""
    Xc = (X - X.mean(0)).numpy()
    Yc = (Y - Y.mean(0)).numpy()
    A = Yc.T @ np.linalg.pinv(Xc.T)
    lam = np.linalg.eigvals(A)
    lam = lam[np.abs(lam) > 1e-8 * np.abs(lam).max()]
    return lam[np.argsort(-np.abs(lam))]


def test_fewer_samples_than_features_keeps_the_identifiable_spectrum():
    # N - 1 < d: the exact result is the non-zero spectrum of the least-squares operator (the ridge only), in N - 1
    # modes, not d modes of which d - N + 1 are artefacts of the ridge-whitened out-of-span directions
    X, Y = _wide_system()
    ref = _pinv_operator_eigs(X, Y)
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y, eps=1e-9)
    n = X.shape[0]
    # the N - 1 identifiable modes and no structural null mode: the row space has dimension N - 1
    assert res.rank == n - 1 and int(res.rank_x) == n - 1 == len(ref)
    np.testing.assert_allclose(np.abs(res.eigenvalues.numpy()), np.abs(ref), rtol=1e-4, atol=1e-6)
    # the projection still maps centred d-dim rows to the whitened mode coordinates
    assert res.projection.shape == (X.shape[1], res.rank)
    Z = (X - X.mean(0)) @ res.projection
    torch.testing.assert_close(Z.mT @ Z / (X.shape[0] - 1), res.gram_xx)


@pytest.mark.parametrize("randomized", [False, True])
def test_fewer_samples_than_features_rank_r_is_not_dominated_by_the_ridge(randomized):
    # before the row-space reduction, the eps^(-1/2)-amplified out-of-span part of Y dominated the rank-r subspace and
    # the projected operator divided by an almost-zero input Gram (LLaMA-7B at N=2048: spectral radius ~6e5)
    X, Y = _wide_system()
    rho_exact = float(np.abs(_pinv_operator_eigs(X, Y)).max())
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y, rank=8, randomized=randomized)
    rho = float(res.eigenvalues.abs().max())
    assert torch.isfinite(res.eigenvalues).all()
    assert rho < 2.0 * rho_exact, (rho, rho_exact)
    assert int(res.rank_x) == 8


def test_fewer_samples_than_features_with_duplicated_samples_uses_the_fallback():
    # the same token entering the first block twice: the (N, N) Gram is singular beyond the centring direction
    X, Y = _wide_system()
    X[5] = X[3]
    ref = _pinv_operator_eigs(X, Y)
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y, eps=1e-9)
    assert res.rank == X.shape[0] and int(res.rank_x) == len(ref) == X.shape[0] - 2
    np.testing.assert_allclose(np.abs(res.eigenvalues[: len(ref)].numpy()), np.abs(ref), rtol=1e-4, atol=1e-6)
    with pytest.warns(UserWarning, match="rank-limited"):
        res = whitened_dmd(X, Y, rank=8, randomized=True)
    assert float(res.eigenvalues.abs().max()) < 2.0 * float(np.abs(ref).max())


def test_fewer_samples_than_features_is_rotation_invariant():
    # With N - 1 < d, Y leaves the span of X and "the operator on that span" needs a metric to project Y back: the
    # estimate is invariant under orthogonal changes of coordinates only (a general M changes which part of Y counts as
    # in-span; the unreduced ridge-whitened operator is not invariant either, its eps-ridge does not transform with M).
    X, Y = _wide_system(n=30, d=50, seed=3)
    M = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(9), dtype=F64)).Q
    with pytest.warns(UserWarning):
        a = whitened_dmd(X, Y, eps=1e-10).eigenvalues
    with pytest.warns(UserWarning):
        b = whitened_dmd(X @ M, Y @ M, eps=1e-10).eigenvalues
    torch.testing.assert_close(a.abs(), b.abs(), rtol=1e-5, atol=1e-7)


def test_zero_update_is_degenerate_not_nan():
    X = anisotropic_states(500, 6)
    for kwargs in ({}, {"rank": 3, "randomized": True}, {"rank": 3}):
        res = whitened_dmd(X, X.clone(), **kwargs)
        assert bool(res.degenerate) and float(res.update_ratio) == 0.0
        for t in (res.eigenvalues, res.eigenvectors, res.left_eigenvectors, res.operator):
            assert torch.isfinite(t).all()
        torch.testing.assert_close(res.eigenvalues, torch.ones_like(res.eigenvalues), atol=1e-12, rtol=0)
    # a tiny but non-zero update is degenerate too; a real one is not
    assert bool(whitened_dmd(X, X * (1 + 1e-7)).degenerate)
    assert not bool(whitened_dmd(X, X * 1.1).degenerate)


def test_constant_columns_are_handled_by_the_ridge():
    X = anisotropic_states(400, 5)
    X[:, 2] = 4.0  # a dead feature
    A, _ = planted_operator([0.9, 0.8, 0.5, 1.1, 0.3], seed=2)
    Y = X @ A.T
    for kwargs in ({}, {"rank": 3, "randomized": True}):
        res = whitened_dmd(X, Y, **kwargs)
        assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.operator).all()
    assert int(whitened_dmd(X, Y).rank_x) == 4
    res = whitened_dmd(torch.ones(50, 3), torch.ones(50, 3) * 2)  # everything constant
    assert bool(res.degenerate) and int(res.rank_x) == 0 and torch.isfinite(res.eigenvalues).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": 9}, ValueError, "rank=9"),
        ({"rank": 2.5}, ValueError, "rank=2.5"),
        ({"randomized": True}, ValueError, "needs a rank"),
        ({"eps": -1.0}, ValueError, "eps=-1.0"),
        ({"rank": 2, "randomized": True, "oversample": -1}, ValueError, "oversample"),
        ({"rank": 2, "randomized": True, "power_iters": -2}, ValueError, "power_iters"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    X = torch.randn(40, 8, dtype=F64)
    with pytest.raises(error, match=match):
        whitened_dmd(X, X * 0.5, **kwargs)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="same shape"):
        whitened_dmd(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"\(N, d\) or \(L, N, d\)"):
        whitened_dmd(torch.randn(10), torch.randn(10))
    with pytest.raises(TypeError, match="real-valued"):
        whitened_dmd(torch.randn(10, 3, dtype=torch.complex64), torch.randn(10, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        whitened_dmd([[1.0, 2.0]] * 5, [[1.0, 2.0]] * 5)
    assert math.isfinite(float(whitened_dmd(torch.arange(20).reshape(10, 2) ** 2, torch.ones(10, 2)).update_ratio))


def test_working_precision_of_the_randomized_path():
    X = anisotropic_states(1000, 24, seed=11, spread=10.0)
    Y = X + torch.tanh(X @ torch.randn(24, 24, generator=torch.Generator().manual_seed(1), dtype=F64) / 5)
    ref = whitened_dmd(X, Y, rank=6, randomized=True)  # float64 input -> float64 products
    forced = whitened_dmd(X.float(), Y.float(), rank=6, randomized=True, dtype=torch.float64)
    fast = whitened_dmd(X.float(), Y.float(), rank=6, randomized=True)
    torch.testing.assert_close(forced.eigenvalues, ref.eigenvalues, atol=1e-5, rtol=0)  # float32 rounding of the data
    torch.testing.assert_close(fast.eigenvalues, ref.eigenvalues, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        whitened_dmd(X, Y, rank=6, randomized=True, dtype=torch.float16)


def test_widely_scaled_float32_activations_fall_back_to_a_stable_factorisation():
    # variances from 1e-6 to 1e6 ("massive activations"): the float32 Cholesky of Sigma + eps I breaks down and the
    # randomized path must fall back (float64 factorisation) instead of crashing or returning NaN
    X = anisotropic_states(1500, 16, seed=12, spread=1e6) * 1e-3
    A, lam = planted_operator([1.1, 0.99, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1] * 2, seed=4, cond=2.0)
    Y = X @ A.T
    res32 = whitened_dmd(X.float(), Y.float(), rank=16, randomized=True)
    assert torch.isfinite(res32.eigenvalues).all() and torch.isfinite(res32.operator).all()
    # float64: exact and full-rank randomized DMD stay accurate although cond(Sigma_X) ~ 1e12
    for res in (whitened_dmd(X, Y), whitened_dmd(X, Y, rank=16, randomized=True)):
        torch.testing.assert_close(sort_eigs(res.eigenvalues), lam, atol=1e-6, rtol=0)
    assert float((sort_eigs(res32.eigenvalues).abs() - lam.abs()).abs().max()) < 0.05


def test_left_eigenvectors_fall_back_when_lapack_raises(monkeypatch):
    """Some LAPACK builds raise on a singular LU instead of reporting it; the pseudo-inverse fallback must take over."""
    import hf_koopman.koopman.dmd as dmd_module

    def raising_lu(*args, **kwargs):
        raise RuntimeError("Pivots given to lu_solve must all be greater or equal to 1")

    A = torch.tensor([[0.5, 1.0], [0.0, 0.9]], dtype=torch.float64)
    monkeypatch.setattr(dmd_module.torch.linalg, "lu_factor_ex", raising_lu)
    lam, vec, left, _ = dmd_module._eigen(A)
    assert torch.isfinite(left).all()
    # u_j^* A = lambda_j u_j^*
    for j in range(2):
        u = left[:, j]
        assert torch.allclose(u.conj() @ A.to(u.dtype), lam[j] * u.conj(), atol=1e-10)


def test_left_eigenvectors_batched_match_the_inverse():
    import hf_koopman.koopman.dmd as dmd_module

    A = torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lam, vec, left, _ = dmd_module._eigen(A)
    for b in range(3):  # u_j^* A = lambda_j u_j^* for every layer of the batch
        torch.testing.assert_close(left[b].mH @ A[b].to(left.dtype), lam[b][:, None] * left[b].mH)


def test_float32_moments_and_eigenproblem_agree_with_float64():
    # the default for float32 inputs: float32 second moments (float64 retry when ill-conditioned) and, above 256 modes,
    # a float32 eigenproblem; here both are forced at a small width and compared with the all-float64 path
    X = anisotropic_states(3000, 48, seed=21, spread=1e3)
    A, _ = planted_operator(list(np.linspace(0.6, 1.2, 48)), seed=22, cond=3.0)
    Y = X @ A.T + 0.05 * torch.tanh(X)
    X, Y = X.float(), Y.float()
    ref = whitened_dmd(X.double(), Y.double())  # the same (float32-rounded) data, all in float64
    fast = whitened_dmd(X, Y, eig_dtype=torch.float32)
    moduli = lambda res: res.eigenvalues.abs().sort().values  # noqa: E731
    torch.testing.assert_close(moduli(fast), moduli(ref), atol=1e-4, rtol=0)
    assert fast.eigenvectors.dtype == torch.complex64 and ref.eigenvectors.dtype == torch.complex128
    assert float(fast.eigvec_condition) == pytest.approx(float(ref.eigvec_condition), rel=1e-2)


@pytest.mark.parametrize("shape", [(2, 600, 300), (600, 300), (2, 400, 200)])
def test_symmetric_gram_is_the_full_product_and_exactly_symmetric(shape):
    # from 256 columns on, only the upper triangle is multiplied (column blocks, the last one partial) and mirrored
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g = dmd_module._symmetric_gram(a)
    assert torch.equal(g, g.mT)
    torch.testing.assert_close(g, a.mT @ a, atol=1e-3, rtol=1e-5)


def test_default_float32_path_at_a_wide_layer_agrees_with_float64():
    # width 300: blocked Grams, float32 moments, operator, eigenproblem and ResDMD forms (the GPT-2-sized defaults);
    # the all-float64 path on the same float32-rounded data is the reference
    from hf_koopman.koopman import resdmd_residuals, spectral_features

    d = 300
    X = anisotropic_states(3000, d, seed=31, spread=10.0)
    A, _ = planted_operator(list(np.linspace(0.5, 1.3, d)), seed=32, cond=2.0)
    Y = X @ A.T + 0.2 * torch.tanh(X)
    Xs, Ys = torch.stack([X, Y]).float(), torch.stack([Y, Y + 0.3 * torch.sin(Y)]).float()
    fast, ref = whitened_dmd(Xs, Ys), whitened_dmd(Xs.double(), Ys.double())
    assert fast.moments.is_raw and fast.moments.lin == torch.float32 and fast.eigenvectors.dtype == torch.complex64
    moduli = lambda res: res.eigenvalues.abs().sort(-1).values  # noqa: E731
    torch.testing.assert_close(moduli(fast), moduli(ref), atol=1e-4, rtol=0)
    # kappa(V) of float32 eigenvectors depends on the CPU's LAPACK kernels: 0.2-2.6 % off here on one CPU, 26 % on
    # one layer on an Intel Xeon with AVX-512 (GPT-2 small's layers: 3-4 % and 6.4 %); the same order of magnitude
    torch.testing.assert_close(fast.eigvec_condition, ref.eigvec_condition, atol=0, rtol=0.35)
    r_fast, r_ref = resdmd_residuals(fast), resdmd_residuals(ref)
    assert 0 < int((r_ref <= 0.1).sum()) < r_ref.numel()  # the filter has modes on both sides
    # the residuals of the returned (float32) eigenpairs, sorted, where below 1: within 1e-4 of float64 (taking
    # u^* G_dx u = (lambda - 1) u^* G_xx u instead of computing it gave 3.7e-4 here)
    fast_sorted, ref_sorted = r_fast.sort(-1).values, r_ref.sort(-1).values
    keep = ref_sorted < 1
    torch.testing.assert_close(fast_sorted[keep], ref_sorted[keep], atol=1e-4, rtol=0)
    for f, g in zip(spectral_features(fast), spectral_features(ref)):
        assert (f.n_reliable, f.near_unit_mass, f.unstable_mass) == (g.n_reliable, g.near_unit_mass, g.unstable_mass)
        assert f.nonlinearity == pytest.approx(g.nonlinearity, abs=1e-5)


def test_resdmd_residuals_of_float32_eigenvectors_are_computed_not_assumed():
    # float64 data, float32 eigenproblem (the default above 256 modes): the residuals are those of the returned
    # eigenpairs, within 1e-5 of the float64 eigenproblem's (9.5e-7 measured). Taking u^* G_dx u = (lambda - 1)
    # u^* G_xx u, exact only for exact eigenvectors, was 2.4e-4 off here
    from hf_koopman.koopman import resdmd_residuals

    X, Y = wide_float64_pairs()
    fast, ref = whitened_dmd(X, Y), whitened_dmd(X, Y, eig_dtype=F64)
    assert fast.eigenvectors.dtype == torch.complex64 and fast.moments.is_raw
    r_fast, r_ref = resdmd_residuals(fast).sort(-1).values, resdmd_residuals(ref).sort(-1).values
    torch.testing.assert_close(r_fast, r_ref, atol=1e-5, rtol=0)


def test_resdmd_forms_without_the_conjugate_pair_pattern_equal_the_real_form_ones(monkeypatch):
    # when the eigenvalues do not come in LAPACK's adjacent-pair pattern, the left eigenvectors come from the complex
    # inverse of V and the quadratic forms from its [Re; Im] rows; they must equal the real-form ones
    from hf_koopman.koopman import resdmd_residuals

    A, _ = planted_operator([1.1, 0.9, 0.5, -0.4, 0.8, 0.3], pair=(0.9, 0.5), seed=9, cond=3.0)
    X = anisotropic_states(2000, 8, seed=10)
    Y = X @ A.T + 0.2 * torch.tanh(X)
    ref = whitened_dmd(X, Y)
    assert dmd_module._conjugate_pairs(ref.eigenvalues) is not None and bool((ref.eigenvalues.imag != 0).any())
    monkeypatch.setattr(dmd_module, "_conjugate_pairs", lambda lam: None)
    other = whitened_dmd(X, Y)
    for a, b in zip(ref.moments.quads, other.moments.quads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(resdmd_residuals(other), resdmd_residuals(ref), atol=1e-10, rtol=0)


def _planted_pair() -> tuple[torch.Tensor, torch.Tensor]:
    X = anisotropic_states(800, 12, seed=2)
    return X, X @ planted_operator([1.1, 0.95, 0.5] * 4, seed=3, cond=2.0)[0].T


def test_eigenvalues_only_skips_the_eigenvectors():
    X, Y = _planted_pair()
    full = whitened_dmd(X, Y)
    only = whitened_dmd(X, Y, eigenvectors=False)
    torch.testing.assert_close(only.eigenvalues, full.eigenvalues, atol=1e-10, rtol=0)
    assert only.eigenvectors is None and only.left_eigenvectors is None and math.isnan(float(only.eigvec_condition))
    with pytest.raises(ValueError, match="eigenvectors=True and"):
        from hf_koopman.koopman import spectral_features

        spectral_features(only)


def test_right_eigenvectors_only_skip_the_inverse():
    # the outputs of an exact DMD (eigenvalues + modes): the same eigenpairs, no left eigenvectors, no kappa(V)
    X, Y = _planted_pair()
    full = whitened_dmd(X, Y)
    right = whitened_dmd(X, Y, left_eigenvectors=False)
    torch.testing.assert_close(right.eigenvalues, full.eigenvalues, atol=1e-10, rtol=0)
    torch.testing.assert_close(right.eigenvectors, full.eigenvectors, atol=1e-10, rtol=0)
    assert right.left_eigenvectors is None and math.isnan(float(right.eigvec_condition))
    A = right.operator.to(right.eigenvectors.dtype)
    torch.testing.assert_close(A @ right.eigenvectors, right.eigenvectors * right.eigenvalues, atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="left_eigenvectors=True"):
        from hf_koopman.koopman import spectral_features

        spectral_features(right)


@pytest.mark.parametrize("path", ["raw", "raw, float32 eigenproblem", "raw, chained", "refined", "refinement fails",
                                  "no conjugate-pair pattern", "whitened Grams", "rank-r"])
def test_leaving_the_eigenvectors_out_keeps_every_feature(monkeypatch, path):
    # keep_eigenvectors=False (what profile_from_snapshots asks for): kappa(V) and the ResDMD forms are computed,
    # the (L, m, m) eigenvector matrices are not returned, and the features are those of the full result
    from hf_koopman.koopman import resdmd_residuals, spectral_features

    if path in ("raw, float32 eigenproblem", "refined", "refinement fails"):  # m > 256: float32 eig
        X, Y = wide_float64_pairs()  # float64 inputs: the float32 eigenvalues are refined
        if path == "raw, float32 eigenproblem":  # the real form built without the complex copy
            X, Y = X.float(), Y.float()
        if path == "refinement fails":  # the layer is solved again in float64
            monkeypatch.setattr(dmd_module, "_refined_eigenvalues", lambda *args: None)
        tol = {"kappa": 1e-2, "residual": 5e-5}  # float32 eigenvectors: the residuals' own error is ~2e-5
    elif path == "raw, chained":
        X, _ = _planted_pair()
        s = torch.stack([X, X + 0.1 * torch.tanh(X), X + 0.2 * torch.sin(X)])
        X, Y = s[:-1], s[1:]
        assert dmd_module._chained(X, Y)
        tol = {"kappa": 1e-8, "residual": 1e-7}
    else:
        if path == "no conjugate-pair pattern":  # complex eigenvectors inverted as they are
            monkeypatch.setattr(dmd_module, "_conjugate_pairs", lambda lam: None)
        X, Y = _planted_pair()
        X, Y = torch.stack([X, Y]), torch.stack([Y, 0.5 * Y + torch.sin(Y)])
        tol = {"kappa": 1e-8, "residual": 1e-7}  # residuals ~0 are square roots of cancelling float64 terms
    kwargs = {"rank": 6} if path == "rank-r" else {}
    if path == "whitened Grams":
        _force_whitened_path(monkeypatch)
    full = whitened_dmd(X, Y, **kwargs)
    slim = whitened_dmd(X, Y, keep_eigenvectors=False, **kwargs)
    assert full.eigenvectors is not None and full.left_eigenvectors is not None
    assert slim.eigenvectors is None and slim.left_eigenvectors is None
    assert slim.moments.is_raw == (path not in ("whitened Grams", "rank-r"))
    torch.testing.assert_close(slim.eigenvalues, full.eigenvalues, atol=0, rtol=0)
    torch.testing.assert_close(slim.eigvec_condition, full.eigvec_condition, atol=0, rtol=tol["kappa"])
    torch.testing.assert_close(resdmd_residuals(slim), resdmd_residuals(full), atol=tol["residual"], rtol=0)
    f_full, f_slim = spectral_features(full), spectral_features(slim)
    for a, b in zip(f_full if isinstance(f_full, list) else [f_full], f_slim if isinstance(f_slim, list) else [f_slim]):
        a, b = a.to_dict(), b.to_dict()
        assert math.isclose(a.pop("eigvec_condition"), b.pop("eigvec_condition"), rel_tol=tol["kappa"])
        assert a == b
    # without left eigenvectors there is nothing to keep the forms from: the features still refuse
    with pytest.raises(ValueError, match="left_eigenvectors=True"):
        spectral_features(whitened_dmd(X, Y, left_eigenvectors=False, keep_eigenvectors=False, **kwargs))


def _force_whitened_path(monkeypatch):
    """Route the full spectrum through the explicit whitened-Gram path (congruences + pseudo-inverse operator)."""
    import hf_koopman.koopman.dmd as dmd_module

    monkeypatch.setattr(dmd_module, "_raw_fit", lambda *args, **kwargs: None)


def test_raw_moment_path_equals_the_whitened_gram_path(monkeypatch):
    # the full-rank path works on the unwhitened moments (A = I + L^-1 Sdx Sxx^-1 L, features from raw moments);
    # every reported quantity must equal the one computed from the explicitly whitened Grams
    from hf_koopman.koopman import resdmd_residuals, spectral_features
    from hf_koopman.koopman.features import nonlinearity_ratio

    A, _ = planted_operator([1.2, 1.0, 0.95, 0.85, 0.5, -0.3, 0.7, 0.2], pair=(0.9, 0.6), seed=5, cond=3.0)
    X = anisotropic_states(1500, 10, seed=6, spread=30.0)
    Y = X @ A.T + 0.3 * torch.tanh(X @ torch.randn(10, 10, generator=torch.Generator().manual_seed(2), dtype=F64) / 10)
    Xs, Ys = torch.stack([X, Y]), torch.stack([Y, 0.5 * Y + torch.sin(Y)])
    fast = whitened_dmd(Xs, Ys)
    assert fast.moments.is_raw
    with monkeypatch.context() as m:
        _force_whitened_path(m)
        ref = whitened_dmd(Xs, Ys)
    assert not ref.moments.is_raw
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)  # noqa: E731
    close(fast.eigenvalues, ref.eigenvalues)
    close(fast.operator, ref.operator)
    for name in ("gram_xx", "gram_dx", "gram_dd", "projection"):  # formed on demand from the raw moments
        close(getattr(fast, name), getattr(ref, name))
    close(fast.update_ratio, ref.update_ratio)
    close(fast.eigvec_condition, ref.eigvec_condition)
    close(nonlinearity_ratio(fast), nonlinearity_ratio(ref))
    close(resdmd_residuals(fast), resdmd_residuals(ref))
    for f, g in zip(spectral_features(fast), spectral_features(ref)):
        assert f.n_reliable == g.n_reliable and f.near_unit_mass == g.near_unit_mass
        assert f.nonlinearity == pytest.approx(g.nonlinearity, rel=1e-9)
        assert f.eigvec_condition == pytest.approx(g.eigvec_condition, rel=1e-9)


def test_left_eigenvectors_and_condition_from_the_real_form(monkeypatch):
    # real operators: V = R U with R real, U unitary, so kappa(V) = kappa(R) and V^-1 = U^* R^-1; against the complex
    # computation, also above 256 modes where kappa comes from power iterations
    import hf_koopman.koopman.dmd as dmd_module

    for m in (12, 300):
        A = torch.randn(2, m, m, generator=torch.Generator().manual_seed(m), dtype=F64) / m**0.5
        if m > 256:  # a float32 operator: its float32 eigenproblem is not refined (see the refinement tests)
            A = A.float()
        lam, vec, left, kappa = dmd_module._eigen(A)
        assert dmd_module._conjugate_pairs(lam) is not None and bool((lam.imag != 0).any())
        with monkeypatch.context() as mp:
            mp.setattr(dmd_module, "_conjugate_pairs", lambda lam: None)
            lam_c, vec_c, left_c, kappa_c = dmd_module._eigen(A)
        atol = 1e-10 if m <= 256 else 1e-4  # float32 eigenproblem above 256 modes
        torch.testing.assert_close(lam, lam_c, atol=0, rtol=0)
        torch.testing.assert_close(left, left_c, atol=atol, rtol=0)
        for b in range(2):
            torch.testing.assert_close(left[b].mH @ A[b].to(left.dtype), lam[b][:, None].to(left.dtype) * left[b].mH,
                                       atol=atol, rtol=0)
            s = torch.linalg.svdvals(vec[b])
            exact = float(s[0] / s[-1])
            tol = 1e-9 if m <= 256 else 1e-3  # power iterations stop at a relative change of 1e-4
            assert float(kappa[b]) == pytest.approx(exact, rel=tol)
            assert float(kappa_c[b]) == pytest.approx(exact, rel=tol)


def test_chained_float32_small_updates_keep_their_accuracy():
    # a small update on states with a large mean: D = Y - X is formed before centring, so the update's second moments
    # (update_ratio, eta_nl) keep float64 accuracy; D_c = Y_c - X_c would carry eps * |mean| per column (2.5-3x eta)
    from hf_koopman.koopman.features import nonlinearity_ratio

    g = torch.Generator().manual_seed(0)
    states = [(20.0 + torch.randn(1000, 64, generator=g)).float()]
    for _ in range(3):
        h = states[-1]
        states.append(h + 1e-4 * (h - h.mean(0)) @ (torch.randn(64, 64, generator=g) / 8).float())
    s = torch.stack(states)
    assert dmd_module._chained(s[:-1], s[1:])
    r32, r64 = whitened_dmd(s[:-1], s[1:]), whitened_dmd(s[:-1].double(), s[1:].double())
    torch.testing.assert_close(r32.update_ratio, r64.update_ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(nonlinearity_ratio(r32), nonlinearity_ratio(r64), rtol=0.1, atol=0)


def test_condition_estimate_of_a_nearly_constant_feature_with_no_ridge():
    # eps = 0 and a feature of scale 1e-21: ||L^-1||^2 exceeds the float32 range; the estimate (float64) routes the
    # layer to float64 moments instead of failing
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    x[:, -1] *= 1e-21
    s = torch.stack([x, 1.1 * x + 0.05 * torch.tanh(x), 1.2 * x])
    res = whitened_dmd(s[:-1], s[1:], eps=0.0)
    assert torch.isfinite(res.eigenvalues).all()


def test_chained_layers_reuse_the_output_covariance():
    # the profiler passes X, Y as views of one stack of the L + 1 states (Y[l] is X[l + 1]); the input covariance of
    # layer l + 1 is then accumulated from layer l's moments instead of a product: same result as separate copies
    import hf_koopman.koopman.dmd as dmd_module

    g = torch.Generator().manual_seed(11)
    states = [anisotropic_states(1200, 16, seed=12, spread=5.0)]
    for _ in range(4):
        h = states[-1]
        states.append(h + 0.5 * torch.tanh(h @ torch.randn(16, 16, generator=g, dtype=F64) / 4))
    stack = torch.stack(states)
    for dtype, tol in ((F64, 1e-9), (torch.float32, 1e-4)):
        s = stack.to(dtype)
        X, Y = s[:-1], s[1:]
        assert dmd_module._chained(X, Y) and not dmd_module._chained(X.clone(), Y.clone())
        chained = whitened_dmd(X, Y)
        separate = whitened_dmd(X.clone(), Y.clone())
        torch.testing.assert_close(chained.eigenvalues.abs(), separate.eigenvalues.abs(), atol=tol, rtol=0)
        torch.testing.assert_close(chained.gram_xx, separate.gram_xx, atol=tol, rtol=0)
    # an update that cancels the input (Y ~ 0) is too inaccurate to chain: that layer's covariance is computed
    s = torch.stack([stack[0], 1e-6 * stack[1], stack[2]]).float()
    sxx, _, _ = dmd_module._second_moments(s[:-1], s[1:], torch.float32, chained=True)
    direct, _, _ = dmd_module._second_moments(s[:-1].clone(), s[1:].clone(), torch.float32)
    # float32 sums in another order (one or two threads) differ by ~1e-5; an accumulated covariance would be far off
    torch.testing.assert_close(sxx, direct, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chained_half_precision_snapshots_stay_chained_in_float32(dtype):
    # streamed bfloat16 blocks hand the analysis a half-precision stack of the L + 1 states: its float32 copy is one
    # stack too (L + 1 arrays, not 2L), so the chain and the Gram it saves are kept, and the result is the one of the
    # float32 stack itself
    import hf_koopman.koopman.dmd as dmd_module

    g = torch.Generator().manual_seed(5)
    states = [torch.randn(600, 24, generator=g)]
    for _ in range(3):
        states.append(states[-1] + 0.4 * torch.tanh(states[-1] @ torch.randn(24, 24, generator=g) / 5))
    half = torch.stack(states).to(dtype)
    X, Y, _ = dmd_module._check_snapshots(half[:-1], half[1:])
    assert X.dtype == Y.dtype == torch.float32 and dmd_module._chained(X, Y)
    assert X.untyped_storage().nbytes() == half.numel() * 4
    up = half.float()
    torch.testing.assert_close(whitened_dmd(half[:-1], half[1:]).eigenvalues, whitened_dmd(up[:-1], up[1:]).eigenvalues,
                               atol=0, rtol=0)
    # not chained (separate copies): up-cast as they are
    X, Y, _ = dmd_module._check_snapshots(half[:-1].clone(), half[1:].clone())
    assert X.dtype == torch.float32 and not dmd_module._chained(X, Y)


def test_layers_analysed_side_by_side_in_threads_give_the_one_thread_result():
    # `_map_layers` runs one layer per worker thread when torch has more than one thread; the test workers run torch
    # in one thread (tests/conftest.py), so this sets two for the call and restores the count
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(3, 400, 80, generator=gen)  # m > 64: the width at which the layers are mapped in parallel
    Y = X + 0.3 * X @ torch.randn(80, 80, generator=gen) / 80**0.5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = whitened_dmd(X, Y)
        torch.set_num_threads(2)
        calls = []
        original = dmd_module._map_layers

        def spy(fn, count, parallel=True):
            calls.append(min(torch.get_num_threads(), count) if parallel else 1)
            return original(fn, count, parallel)

        dmd_module._map_layers = spy
        try:
            two = whitened_dmd(X, Y)
        finally:
            dmd_module._map_layers = original
        assert torch.get_num_threads() == 2  # `_single_thread` restored the count
    finally:
        torch.set_num_threads(threads)
    assert calls and max(calls) == 2  # the threaded branch ran
    torch.testing.assert_close(two.eigenvalues, one.eigenvalues)
    torch.testing.assert_close(two.eigvec_condition, one.eigvec_condition)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_float32_round_off_does_not_count_as_directions(eps):
    """Repeated states (8 distinct rows, rank 7 once centred) in float32: the rank is that of the float64 data; the
    float32 Gram's round-off (~1e-7 of the trace) is not a direction with its own modes."""
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(8, 32, generator=gen) * 0.02
    X = distinct.repeat(64, 1)
    Y = X + torch.tanh(X @ (torch.randn(32, 32, generator=gen) * 0.5))
    exact = whitened_dmd(X.double(), Y.double(), eps=eps)
    single = whitened_dmd(X, Y, eps=eps)
    assert int(exact.rank_x) == 7 and int(single.rank_x) == 7
    top = lambda eigs: sorted(eigs.abs().tolist(), reverse=True)  # noqa: E731
    assert top(single.eigenvalues)[:7] == pytest.approx(top(exact.eigenvalues)[:7], rel=1e-3)
    assert max(top(single.eigenvalues)[7:]) < 1e-6  # the null directions' zeros, not 25 noise modes


@pytest.mark.parametrize("scale", [1e18, 1e-30])
def test_float32_states_near_the_ends_of_the_range_are_not_read_as_constant(scale):
    # the constant-input check squares the samples: at 1e18 the float32 sums overflowed (at 1e-30 they underflowed)
    # and every layer read as "the same input state for every token", with no mode
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.linspace(0.5, 0.99, 8, dtype=F64))
    X = torch.randn(100, 8, generator=g, dtype=F64)
    Y = X @ A.T
    result = whitened_dmd((X * scale).float(), (Y * scale).float())
    assert int(result.rank_x) == 8 and not bool(result.degenerate)
    torch.testing.assert_close(sort_eigs(result.eigenvalues).abs(), torch.linspace(0.5, 0.99, 8, dtype=F64),
                               atol=1e-4, rtol=0)


def test_numpy_scalars_and_arrays_are_taken_where_numbers_and_tensors_are():
    X = np.random.default_rng(0).normal(size=(200, 8))
    Y = X + 0.1 * X @ np.random.default_rng(1).normal(size=(8, 8))
    ref = whitened_dmd(X, Y, rank=4, eps=1e-5)
    got = whitened_dmd(X, Y, rank=np.int64(4), eps=np.float32(1e-5))
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues)
    torch.testing.assert_close(zca_whitening(X).matrix, zca_whitening(torch.from_numpy(X)).matrix)
    torch.testing.assert_close(whiten(X, Y)[0], whiten(torch.from_numpy(X), torch.from_numpy(Y))[0])
    assert zca_whitening(torch.arange(40).reshape(20, 2) % 7).matrix.dtype == F64  # integers up-cast
    with pytest.raises(TypeError, match="must be a torch.Tensor or NumPy array"):
        zca_whitening("not data")
