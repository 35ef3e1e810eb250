"""Exactness of the reductive Reynolds operators against the literal sum over all n! permutations."""

from __future__ import annotations

import math

import pytest
import torch

from hf_koopman.models.reynet import (
    all_permutations,
    full_reynolds,
    full_reynolds_k,
    full_reynolds_set,
    graph_design,
    injective_tuple_design,
    pair_blocks,
    reductive_reynolds,
    reductive_reynolds_k,
    reductive_reynolds_set,
    set_design,
)


def _pair_mlp(c_in: int, c_out: int) -> torch.nn.Module:
    # a generic, non-symmetric pair function R^{4C} -> R^{2C'}
    return torch.nn.Sequential(
        torch.nn.Linear(4 * c_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * c_out)
    ).double()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_full_equals_reductive_rank2(n):
    phi = _pair_mlp(2, 3)
    X = torch.randn(2, 2, n, n, dtype=torch.float64)
    full = full_reynolds(phi, X)
    red = reductive_reynolds(phi, X)
    assert full.shape == red.shape == (2, 3, n, n)
    torch.testing.assert_close(full, red, rtol=1e-12, atol=1e-12)


def test_full_reynolds_really_sums_all_permutations():
    """Count φ evaluations: the literal operator calls φ on n! blocks, the reductive one on n² (n(n−1) used)."""
    n, seen = 5, []

    def phi(blocks):
        seen.append(blocks.shape[:-1].numel())
        return torch.cat((blocks[..., :1] * 2.0, blocks[..., 1:2] - blocks[..., 2:3]), dim=-1)

    X = torch.randn(1, 1, n, n, dtype=torch.float64)
    full_reynolds(phi, X)
    assert sum(seen) == math.factorial(n)
    seen.clear()
    reductive_reynolds(phi, X)
    assert sum(seen) == n * n


def test_normalisation_against_averaged_reynolds_operator():
    """reductive = n·R(Φ) on the diagonal and n(n−1)·R(Φ) off it, with R = (1/n!) Σ_g g⁻¹Φ(gX)."""
    n = 4
    phi = _pair_mlp(1, 1)
    X = torch.randn(1, 1, n, n, dtype=torch.float64)
    # the averaged operator, written independently with explicit permutation matrices
    R = torch.zeros(n, n, dtype=torch.float64)
    for sigma in all_permutations(n):
        P = torch.zeros(n, n, dtype=torch.float64)
        P[torch.arange(n), sigma] = 1.0  # (P X Pᵀ)[k,l] = X[σ(k), σ(l)]
        gX = P @ X[0, 0] @ P.T
        block = torch.stack((gX[0, 0], gX[0, 1], gX[1, 0], gX[1, 1]))
        out = phi(block)
        Phi = torch.zeros(n, n, dtype=torch.float64)
        Phi[0, 0], Phi[0, 1] = out[0], out[1]
        R += P.T @ Phi @ P
    R /= math.factorial(n)
    eye = torch.eye(n, dtype=torch.bool)
    expected = torch.where(eye, n * R, n * (n - 1) * R)
    torch.testing.assert_close(reductive_reynolds(phi, X)[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_pair_blocks_layout_is_channel_major():
    X = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(1, 2, 3, 3)
    blocks = pair_blocks(X)
    a, b = 0, 2
    expected = []
    for c in range(2):
        expected += [X[0, c, a, a], X[0, c, a, b], X[0, c, b, a], X[0, c, b, b]]
    torch.testing.assert_close(blocks[0, a, b], torch.stack(expected))


def test_reductive_is_equivariant_and_depends_on_phi_outputs():
    n = 9  # beyond the full operator's reach
    phi = _pair_mlp(3, 2)
    X = torch.randn(2, 3, n, n, dtype=torch.float64)
    perm = torch.randperm(n)
    Y = reductive_reynolds(phi, X)
    Yp = reductive_reynolds(phi, X[:, :, perm][:, :, :, perm])
    torch.testing.assert_close(Y[:, :, perm][:, :, :, perm], Yp)
    # the diagonal is the 1/(n-1) average over partners of φ₀
    d_part = phi(pair_blocks(X))[..., :2]
    manual = (d_part[0, 3].sum(0) - d_part[0, 3, 3]) / (n - 1)
    torch.testing.assert_close(Y[0, :, 3, 3], manual)


@pytest.mark.parametrize("n", [2, 5, 7])
def test_graph_design_hits_every_ordered_pair_once(n):
    design = graph_design(n)
    assert design.shape == (n * (n - 1), n)
    assert sorted(map(tuple, design.tolist())) == sorted(set(map(tuple, design.tolist())))
    assert all(sorted(row) == list(range(n)) for row in design.tolist())  # rows are permutations
    pairs = [tuple(r[:2]) for r in design.tolist()]
    assert sorted(pairs) == sorted((a, b) for a in range(n) for b in range(n) if a != b)
    # σ_{i,j} sends (0, 1) to (j, j+i mod n) in row (i−1)·n + j
    i, j = n - 1, 1
    assert design[(i - 1) * n + j, :2].tolist() == [j, (j + i) % n]


def test_set_design_and_set_operator():
    n = 6
    assert sorted(set_design(n)[:, 0].tolist()) == list(range(n))
    phi = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(2, 2, n, dtype=torch.float64)
    torch.testing.assert_close(full_reynolds_set(phi, x), reductive_reynolds_set(phi, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reductive_reynolds_set(phi, x), phi(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("n,k,rank,out_rank", [(5, 1, 1, 1), (5, 2, 2, 2), (5, 3, 1, 1), (4, 3, 3, 3), (5, 2, 2, 1), (6, 2, 1, 2)])
def test_order_k_design_equals_full(n, k, rank, out_rank):
    lin = torch.nn.Linear(2 * k**rank, 3 * k**out_rank).double()

    def phi(sub):  # (B, T, C, k^r) -> (B, T, C', k^{r'})
        return lin(torch.tanh(sub).flatten(2)).reshape(*sub.shape[:2], 3, k**out_rank)

    X = torch.randn(2, 2, *([n] * rank), dtype=torch.float64)
    full = full_reynolds_k(phi, X, k, out_rank)
    red = reductive_reynolds_k(phi, X, k, out_rank)
    assert red.shape == (2, 3, *([n] * out_rank))
    torch.testing.assert_close(full, red, rtol=1e-11, atol=1e-11)
    assert injective_tuple_design(n, k).shape[0] == math.factorial(n) // math.factorial(n - k)


def test_operator_errors():
    phi = _pair_mlp(1, 1)
    with pytest.raises(ValueError, match="n!"):
        full_reynolds(phi, torch.randn(1, 1, 10, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C, n, n\)"):
        reductive_reynolds(phi, torch.randn(1, 3, 4))
    with pytest.raises(TypeError):
        reductive_reynolds(phi, [[1.0]])
    with pytest.raises(ValueError, match="2·C'"):
        reductive_reynolds(lambda b: b[..., :3], torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="k must be"):
        injective_tuple_design(3, 4)
