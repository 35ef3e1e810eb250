"""The Kreiss constant is computed, and matches closed-form resolvent norms of Jordan-type matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_koopman.koopman import kreiss_constant


def _jordan_kreiss(a: float, c: float) -> float:
    """sup_{|z|>1} (|z|-1) ||(zI - J)^{-1}||_2 for J = [[a, c], [0, a]], 0 <= a < 1, from the closed-form norm.

    (zI - J)^{-1} = [[1/w, c/w^2], [0, 1/w]] with w = z - a, whose 2-norm is (q + sqrt(q^2 + 4)) / (2|w|), q = c/|w|.
    It decreases in |w|, and for |z| = R the smallest |w| is R - a (z = R), so the supremum is 1-D in R.
    """
    def f(R):
        w = R - a
        q = c / w
        return (R - 1) * (q + np.sqrt(q * q + 4)) / (2 * w)

    R = 1 + np.logspace(-8, 4, 200001)
    i = int(np.argmax(f(R)))
    lo, hi = R[max(i - 1, 0)], R[min(i + 1, len(R) - 1)]
    for _ in range(200):  # golden-section refinement of the bracket
        m1, m2 = hi - (hi - lo) / 1.618033988749895, lo + (hi - lo) / 1.618033988749895
        lo, hi = (lo, m2) if f(m1) > f(m2) else (m1, hi)
    return float(max(1.0, f(0.5 * (lo + hi))))


@pytest.mark.parametrize("a, c", [(0.0, 4.0), (0.5, 3.0), (0.9, 0.5), (-0.7, 2.0)])
def test_jordan_block_matches_closed_form(a, c):
    J = torch.tensor([[a, c], [0.0, a]], dtype=torch.float64)
    # for a < 0 the extremal z is -R; the closed form is symmetric under z -> -z, J -> -J
    expected = _jordan_kreiss(abs(a), c)
    assert expected > 1.0
    got = kreiss_constant(J)
    assert got == pytest.approx(expected, rel=1e-7)
    # unitary similarity does not change it; complex input works
    q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(1)))
    assert kreiss_constant(q @ J.to(torch.complex128) @ q.mH) == pytest.approx(expected, rel=1e-6)


def test_large_matrix_path_matches():
    # block-diagonal: the resolvent norm is the max over blocks, a normal contractive block contributes <= 1
    J = torch.tensor([[0.5, 3.0], [0.0, 0.5]], dtype=torch.float64)
    A = torch.block_diag(J, 0.3 * torch.eye(70, dtype=torch.float64))
    expected = _jordan_kreiss(0.5, 3.0)
    assert expected > 1.5
    assert kreiss_constant(A) == pytest.approx(expected, rel=1e-4)


def test_normal_and_scalar_matrices_give_one():
    assert kreiss_constant(torch.diag(torch.tensor([0.5, -0.9, 0.2], dtype=torch.float64))) == pytest.approx(1.0, abs=1e-9)
    assert kreiss_constant(torch.eye(4, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-9)
    th = 0.7
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    assert kreiss_constant(rot) == pytest.approx(1.0, abs=1e-9)
    assert kreiss_constant(torch.tensor([[0.3]])) == pytest.approx(1.0, abs=1e-9)


def test_outside_unit_disc_is_infinite():
    assert kreiss_constant(torch.diag(torch.tensor([1.2, 0.5]))) == math.inf
    assert kreiss_constant(torch.tensor([[0.5, 100.0], [0.0, -1.01]])) == math.inf


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        kreiss_constant(torch.randn(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        kreiss_constant(torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError):
        kreiss_constant(np.eye(2))
