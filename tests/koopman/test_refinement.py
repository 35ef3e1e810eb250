"""Float32 eigenproblems of float64 operators (the default above 256 modes), refined against the float64 operator."""

from __future__ import annotations

import math

import pytest
import torch

import hf_koopman.koopman.dmd as dmd_module
from hf_koopman.koopman import resdmd_residuals, spectral_features, whitened_dmd

from _planted import anisotropic_states, wide_float64_pairs

F64 = torch.float64


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance from an eigenvalue of either set to the nearest of the other (the matching error for
    well-separated spectra)."""
    gap = (a.to(torch.complex128)[:, None] - b.to(torch.complex128)[None, :]).abs()
    return max(float(gap.amin(1).max()), float(gap.amin(0).max()))


def _operator(m: int, eigenvalues: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """`(m, m)` float64: a random non-normal matrix (well-separated eigenvalues in a disk of radius ~0.9, with conjugate
    pairs), or `V diag(eigenvalues) V^-1` for a random basis `V`."""
    g = torch.Generator().manual_seed(seed)
    if eigenvalues is None:
        return 0.9 * torch.randn(m, m, generator=g, dtype=F64) / math.sqrt(m)
    V = torch.randn(m, m, generator=g, dtype=F64)
    return V @ torch.diag(eigenvalues) @ torch.linalg.inv(V)


def _check_eigenpairs(A: torch.Tensor, lam, vec, left, atol: float) -> None:
    A_c = A.to(torch.complex128)
    vec, left = vec.to(torch.complex128), left.to(torch.complex128)
    torch.testing.assert_close(A_c @ vec, vec * lam, atol=atol, rtol=0)
    torch.testing.assert_close(left.mH @ A_c, lam[:, None] * left.mH, atol=atol, rtol=0)


def test_float32_eigenproblem_of_a_float64_operator_has_float64_eigenvalues():
    A = _operator(300)
    reference = torch.linalg.eigvals(A)
    lam, vec, left, kappa = dmd_module._eigen(A)  # 300 modes: float32 eigenproblem, refined
    assert vec.dtype == torch.complex64
    unrefined = dmd_module._eigen(A.float())[0]  # a float32 operator is not refined
    assert _distance(unrefined, reference) > 1e-7
    assert _distance(lam, reference) < 1e-10
    # the output contract of `_eigen`: sorted by modulus, conjugate pairs exact and adjacent, eigenvectors that match
    assert bool((lam.abs().diff() <= 0).all())
    assert dmd_module._conjugate_pairs(lam) is not None and bool((lam.imag != 0).any())
    _check_eigenpairs(A, lam, vec, left, atol=1e-4)
    s = torch.linalg.svdvals(vec.to(torch.complex128))
    assert float(kappa) == pytest.approx(float(s[0] / s[-1]), rel=1e-3)


def test_refinement_keeps_eigenvectors_in_the_order_of_the_refined_moduli():
    # moduli 1e-6 apart: the float32 eigenproblem (errors ~3e-5 here) puts 1.2 first, the refined values put
    # -(1.2 + 1e-6) first; every output is permuted alike. The basis V is random (kappa ~1e3): errors 4e-10 against
    # the planted eigenvalues (float64 eig: 2e-13)
    ev = torch.linspace(0.2, 1.1, 300, dtype=F64)
    ev[-1], ev[-2] = 1.2, -(1.2 + 1e-6)
    A = _operator(300, ev, seed=1)
    assert float(dmd_module._eigen(A.float())[0][0].real) > 0
    lam, vec, left, _ = dmd_module._eigen(A)
    assert _distance(lam, ev) < 1e-8
    assert float(lam[0].real) == pytest.approx(-(1.2 + 1e-6), abs=1e-8)
    assert bool((lam.abs().diff() <= 0).all())
    _check_eigenpairs(A, lam, vec, left, atol=1e-3)


def test_clustered_eigenvalues_are_solved_in_float64():
    # eigenvalues 1e-4 apart: float32 eigenvectors carry no second-order information, the estimate says so and the
    # layer is solved with a float64 eig (bit-equal to the float64 path)
    g = torch.Generator().manual_seed(2)
    A = _operator(300, 1.0 + 1e-4 * torch.randn(300, generator=g, dtype=F64), seed=3)
    lam = dmd_module._eigen(A)[0]
    assert torch.equal(lam, dmd_module._eigen(A, dtype=F64)[0])


def _with_pair(b: float) -> torch.Tensor:
    """A 300-mode operator whose spectrum includes the pair 0.95 +- ib, in a basis with condition number 10."""
    g = torch.Generator().manual_seed(5)
    B = torch.block_diag(torch.diag(torch.linspace(0.2, 0.9, 298, dtype=F64)),
                         torch.tensor([[0.95, b], [-b, 0.95]], dtype=F64))
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=F64))
    V = Q * torch.logspace(0, 1, 300, dtype=F64)
    return V @ B @ torch.linalg.inv(V)


def test_complex_pairs_are_refined_or_solved_in_float64():
    A = _with_pair(1e-3)  # a well-separated pair: refined
    lam, reference = dmd_module._eigen(A)[0], torch.linalg.eigvals(A)
    assert not torch.equal(lam, dmd_module._eigen(A, dtype=F64)[0]) and _distance(lam, reference) < 1e-9
    A = _with_pair(1e-7)  # a nearly real pair: float32 eigenvectors cannot separate it, the series is not trusted
    assert torch.equal(dmd_module._eigen(A)[0], dmd_module._eigen(A, dtype=F64)[0])


def test_the_estimate_sees_coupling_through_a_cycle_of_modes():
    # E_jk E_kj = 0 for every pair of modes, but the eigenvalues move by ~1e-4 through the cycle 0 -> 1 -> 2 -> 0:
    # a second-order-only estimate would accept the diagonal
    A = torch.diag(torch.tensor([0.9, 0.8, 0.7], dtype=F64))
    A[0, 1] = A[1, 2] = A[2, 0] = 1e-2
    eye = torch.eye(3, dtype=F64)
    assert dmd_module._refined_eigenvalues(A, eye, eye, torch.zeros(3, dtype=torch.bool)) is None
    A[2, 0] = 1e-9  # the cycle broken: third order ~1e-13, accepted and within 1e-10 of the eigenvalues
    lam, _ = dmd_module._refined_eigenvalues(A, eye, eye, torch.zeros(3, dtype=torch.bool))
    assert _distance(lam, torch.linalg.eigvals(A)) < 1e-10


def test_eigenvalues_only_fall_back_to_a_float64_eigvals(monkeypatch):
    g = torch.Generator().manual_seed(2)
    A = _operator(300, 1.0 + 1e-4 * torch.randn(300, generator=g, dtype=F64), seed=3)  # falls back
    calls = []
    eig = torch.linalg.eig
    monkeypatch.setattr(torch.linalg, "eig", lambda a: calls.append(a.dtype) or eig(a))
    lam, vec, left, kappa = dmd_module._eigen(A, vectors=False)
    assert calls == [torch.float32]  # the float32 attempt only; the fallback takes eigvals
    assert vec is None and left is None and bool(torch.isnan(kappa).all())
    assert torch.equal(lam, dmd_module._eigen(A, vectors=False, dtype=F64)[0])


def test_refinement_declines_beyond_its_tolerance(monkeypatch):
    A = _operator(300, seed=4)
    refined = dmd_module._eigen(A)[0]
    exact = dmd_module._eigen(A, dtype=F64)[0]
    assert not torch.equal(refined, exact)  # refined, within 1e-10 but not bit-equal
    monkeypatch.setattr(dmd_module, "_REFINE_TOL", 0.0)
    assert torch.equal(dmd_module._eigen(A)[0], exact)


def test_whitened_dmd_of_float64_snapshots_matches_the_float64_eigenproblem():
    X, Y = wide_float64_pairs()
    fast, ref = whitened_dmd(X, Y), whitened_dmd(X, Y, eig_dtype=F64)
    assert fast.eigenvectors.dtype == torch.complex64
    for b in range(2):
        assert _distance(fast.eigenvalues[b], ref.eigenvalues[b]) < 1e-9
    torch.testing.assert_close(resdmd_residuals(fast).sort(-1).values, resdmd_residuals(ref).sort(-1).values,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.eigvec_condition, ref.eigvec_condition, atol=0, rtol=5e-2)
    for f, r in zip(spectral_features(fast), spectral_features(ref)):
        assert (f.n_reliable, f.near_unit_mass, f.unstable_mass) == (r.n_reliable, r.near_unit_mass, r.unstable_mass)
    right = whitened_dmd(X, Y, left_eigenvectors=False)  # the reference library's outputs: also refined
    torch.testing.assert_close(right.eigenvalues, fast.eigenvalues, atol=0, rtol=0)
    only = whitened_dmd(X, Y, eigenvectors=False)  # eigenvalues only: refined as well, no eigenvectors returned
    torch.testing.assert_close(only.eigenvalues, fast.eigenvalues, atol=0, rtol=0)
    assert only.eigenvectors is None and only.left_eigenvectors is None
    assert bool(torch.isnan(only.eigvec_condition).all())


def test_float32_inputs_are_not_refined_when_the_operator_is_float64_internally(monkeypatch):
    # a float32 covariance too ill-conditioned for float32 moments makes a float64 operator from float32 snapshots; the
    # float32 eigenproblem's precision is what the caller asked for, so no refinement cost (it added 17 % to the
    # analysis of a LLaMA-2-7B layer at init, whose operator is float64 internally)
    calls = []
    refine = dmd_module._refined_eigenvalues
    monkeypatch.setattr(dmd_module, "_refined_eigenvalues", lambda *a: calls.append(1) or refine(*a))
    X = anisotropic_states(1500, 300, seed=3, spread=1e3)
    Y = X + 0.1 * torch.tanh(X @ torch.randn(300, 300, generator=torch.Generator().manual_seed(7), dtype=F64) / 20)
    op = dmd_module._fit_operator(X.float()[None], Y.float()[None], rank=None, randomized=False, eps=1e-5)[0]
    assert op.dtype == F64
    whitened_dmd(X.float(), Y.float())
    assert calls == []
    whitened_dmd(X, Y)
    assert calls == [1]


def test_the_estimate_covers_the_whole_remainder_of_a_two_mode_problem():
    # two real modes g apart coupled with E_12 E_21 < 0 (x = 4 E_12 E_21 / g^2 = -0.49): the remainder after second
    # order is 0.020 g, above x^2 g / 16 = 0.015 g; here 1.1e-7, over the tolerance, so the layer must be declined
    g, x = 5.5e-6, -0.49
    e = math.sqrt(-x) * g / 2
    T = torch.tensor([[0.93 + g, e], [-e, 0.93]], dtype=F64)
    eye, real = torch.eye(2, dtype=F64), torch.zeros(2, dtype=torch.bool)
    exact = torch.linalg.eigvals(T)
    second_order = torch.tensor([0.93 + g - e * e / g, 0.93 + e * e / g], dtype=F64)
    assert _distance(second_order, exact) > dmd_module._REFINE_TOL
    assert dmd_module._refined_eigenvalues(T, eye, eye, real) is None
    for x in (-0.45, -0.2, 0.2, 0.45):  # weaker coupling: accepted only within the tolerance
        e = math.sqrt(abs(x)) * g / 2
        T = torch.tensor([[0.93 + g, e], [math.copysign(e, x), 0.93]], dtype=F64)
        out = dmd_module._refined_eigenvalues(T, eye, eye, real)
        assert out is None or _distance(out[0], torch.linalg.eigvals(T)) <= dmd_module._REFINE_TOL
