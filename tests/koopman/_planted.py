"""Planted linear systems shared by the koopman tests (float64, rows are samples)."""

from __future__ import annotations

import math

import torch


def planted_operator(moduli, pair=None, *, seed: int = 0, cond: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = V diag(lambda) V^{-1} (real) with real eigenvalues `moduli` (signed) and optionally one complex pair
    `pair = (modulus, angle)`. Returns (A (d, d), sorted eigenvalues (d,) complex)."""
    g = torch.Generator().manual_seed(seed)
    blocks, eigs = [], []
    for lam in moduli:
        blocks.append(torch.tensor([[float(lam)]], dtype=torch.float64))
        eigs.append(complex(lam))
    if pair is not None:
        r, th = pair
        blocks.append(r * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64))
        eigs += [complex(r * math.cos(th), r * math.sin(th)), complex(r * math.cos(th), -r * math.sin(th))]
    B = torch.block_diag(*blocks)
    d = B.shape[0]
    # eigenvector basis with a controlled condition number
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    V = q1 @ torch.diag(s) @ q2
    A = V @ B @ torch.linalg.inv(V)
    lam = torch.tensor(eigs, dtype=torch.complex128)
    return A, sort_eigs(lam)


def anisotropic_states(n: int, d: int, *, seed: int = 1, spread: float = 100.0) -> torch.Tensor:
    """(n, d) non-isotropic states: random rotation, standard deviations log-spaced over `spread`, non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, math.log10(spread), d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z * scales) @ q.T + 3.0


def sort_eigs(lam: torch.Tensor) -> torch.Tensor:
    """Deterministic order for comparisons: by modulus, then by imaginary part."""
    lam = lam.to(torch.complex128)
    key = torch.round(lam.abs() * 1e6) * 10 + torch.sign(lam.imag)
    return lam[torch.argsort(key)]


def wide_float64_pairs(d: int = 300, n: int = 1500) -> tuple[torch.Tensor, torch.Tensor]:
    """`(2, n, d)` float64 snapshots X and Y = 0.9 X Q^T + 0.3 tanh(X) (Q a random rotation): wide enough for the
    float32 eigenproblem (more than 256 modes), nonlinear enough for ResDMD residuals on both sides of the filter."""
    X = torch.randn(2, n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(10), dtype=torch.float64))
    return X, X @ (0.9 * Q).T + 0.3 * torch.tanh(X)
