"""KSS math at its edges: `|lambda|` has a finite gradient at `lambda = 0`, and with fewer snapshots than features
(`N - 1 < d`) the differentiable DMD returns exactly the identifiable modes of the profile's `whitened_dmd`, with the
null-space zero modes of a rank-deficient input dropped."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hf_koopman.koopman import whitened_dmd
from hf_koopman.koopman.shaping import differentiable_dmd_eigenvalues, eigenvalue_modulus, kss_penalty


def _assert_same_multiset(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """`got` and `want` hold the same complex values up to `tol`, in any order (nearest unused partner)."""
    got, want = got.detach().to(torch.complex128).flatten(), want.detach().to(torch.complex128).flatten()
    assert got.numel() == want.numel(), (got, want)
    key = lambda z: (round(abs(z), 9), math.atan2(z.imag, z.real))  # noqa: E731  modulus, then angle
    left = sorted(want.tolist(), key=key)
    for value in sorted(got.tolist(), key=key):
        distances = [abs(value - w) for w in left]
        best = min(range(len(left)), key=distances.__getitem__)
        assert distances[best] <= tol * max(1.0, abs(value)), (value, left)
        left.pop(best)


# ---------------------------------------------------------------------------------------------------------- modulus


@pytest.mark.parametrize(
    "values, dtype",
    [([0.0 + 0.0j, 0.6 + 0.8j, -1.2 + 0.0j], torch.complex128), ([0.0, 0.6, -1.2], torch.float64)],
    ids=["complex", "real"],
)
def test_modulus_gradient_is_finite_at_an_exact_zero_eigenvalue(values, dtype):
    eigenvalues = torch.tensor(values, dtype=dtype, requires_grad=True)
    mods = eigenvalue_modulus(eigenvalues)
    assert mods.detach().tolist() == pytest.approx([abs(v) for v in values], abs=1e-5)
    mods.sum().backward()
    grad = eigenvalues.grad
    assert torch.isfinite(torch.view_as_real(grad) if grad.is_complex() else grad).all(), grad
    # away from zero it is the exact gradient, d|lambda| / d(Re, Im) = lambda / |lambda|
    for i in (1, 2):
        assert complex(grad[i]) == pytest.approx(values[i] / abs(values[i]), abs=1e-9)


def test_penalty_gradient_is_finite_with_an_eigenvalue_at_zero():
    eigenvalues = torch.tensor([0.0 + 0.0j, 1.3 + 0.1j, 0.95 + 0.0j], dtype=torch.complex128, requires_grad=True)
    kss_penalty(eigenvalues).backward()
    assert torch.isfinite(torch.view_as_real(eigenvalues.grad)).all(), eigenvalues.grad


# ------------------------------------------------------------------------------------------- fewer rows than features


def _map(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)


def _profile(X: torch.Tensor, Y: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "N snapshots for d features: rank-limited": expected here
        return whitened_dmd(X, Y)


def test_fewer_snapshots_than_features_gives_the_profiles_n_minus_one_modes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 32, generator=g, dtype=torch.float64)
    Y = X @ _map(32, 1).T + 0.1 * torch.randn(10, 32, generator=g, dtype=torch.float64)
    kss = differentiable_dmd_eigenvalues(X, Y)
    assert kss.shape == (9,)
    _assert_same_multiset(kss, _profile(X, Y).eigenvalues)


@pytest.mark.parametrize("rank_deficiency", ["repeated_rows", "low_rank"])
def test_null_space_zero_modes_of_a_rank_deficient_input_are_dropped(rank_deficiency):
    """Centred X of rank below `N - 1` (repeated token states, a low-rank stream): the profile keeps its `N`-wide
    operator, whose extra modes are structural zeros counted out through `rank_x`; KSS returns the `rank_x`
    identifiable modes only, the profile's non-zero eigenvalues, and no zero mode the penalty would count."""
    g = torch.Generator().manual_seed(2)
    if rank_deficiency == "repeated_rows":
        X = torch.randn(10, 32, generator=g, dtype=torch.float64)
        X[5:] = X[:5]  # five distinct rows: centred rank 4
        expected_rank = 4
    else:
        X = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 32, generator=g, dtype=torch.float64)
        expected_rank = 3
    Y = X @ _map(32, 3).T
    profile = _profile(X, Y)
    assert int(profile.rank_x) == expected_rank
    assert profile.eigenvalues.shape[-1] > expected_rank  # the profile's operator does carry the null modes

    kss = differentiable_dmd_eigenvalues(X, Y)
    assert kss.shape == (expected_rank,), kss
    assert eigenvalue_modulus(kss).min() > 1e-6, kss  # no null-space zero mode
    identifiable = profile.eigenvalues[torch.argsort(profile.eigenvalues.abs(), descending=True)][:expected_rank]
    _assert_same_multiset(kss, identifiable)
    # the rest of the profile's spectrum is the null space: lambda = 0
    assert profile.eigenvalues.abs().sort(descending=True).values[expected_rank:].max() < 1e-6
