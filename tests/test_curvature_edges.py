"""Curvature at init: relative convergence of small eigenvalues, the iteration count, the unconverged flag, the Adam
preconditioner and its batch, the details, and determinism with dropout in train mode (each test fails under a
mutation of curvature.py a review found uncaught)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_koopman import curvature as cv

class _Quad(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.x = nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64))
    def forward(self, **_):
        return {"loss": 0.5 * self.x @ self.a @ self.x}


def _sym(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_a_small_curvature_converges_relatively():
    eigs = [1e-4 * e for e in [1.0, 0.9, 0.5, 0.2, 0.1]]
    m = _Quad(_sym(eigs))
    res = cv.top_hessian_eigenvalue(lambda: m()["loss"], [m.x], num_iterations=200, tol=1e-6)
    assert res.eigenvalue == pytest.approx(1e-4, rel=1e-3)


def test_iterations_count_every_hessian_vector_product():
    calls = []
    m = _Quad(_sym([-3.0, 1.0, 0.5]))
    def loss():
        calls.append(1)
        return m()["loss"]
    res = cv.top_hessian_eigenvalue(loss, [m.x], num_iterations=50)
    assert res.dominant_eigenvalue < 0 and res.iterations == len(calls)


def test_an_unconverged_iteration_is_reported():
    m = _Quad(_sym([1.0, 0.99, 0.98]))
    res = cv.top_hessian_eigenvalue(lambda: m()["loss"], [m.x], num_iterations=2, tol=1e-12)
    assert not res.converged


class _Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.unused = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    def forward(self, x, labels):
        return {"loss": ((x @ self.w).tanh() - labels).pow(2).mean() + 0.0 * self.unused.sum() ** 2}


def _reg_batches():
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 4, generator=g, dtype=torch.float64),
             "labels": torch.randn(8, generator=g, dtype=torch.float64)} for _ in range(3)]


def test_adam_sharpness_matches_a_direct_computation_on_the_first_batch():
    m, bs = _Reg(), _reg_batches()
    res = cv.adam_preconditioned_sharpness(m, bs, num_iterations=100, tol=1e-10)
    params = [m.w, m.unused]
    v = cv.adam_second_moment([(lambda b=b: m(**b)["loss"]) for b in bs], params)
    ref = cv.top_hessian_eigenvalue(lambda: m(**bs[0])["loss"], params,
                                    preconditioner=[x.sqrt() + 1e-8 for x in v], num_iterations=100, tol=1e-10)
    assert res.eigenvalue == pytest.approx(ref.eigenvalue, rel=1e-4)


def test_the_details_count_zero_gradients_as_a_fraction_and_take_the_median():
    m, bs = _Reg(), _reg_batches()
    res = cv.adam_preconditioned_sharpness(m, bs, num_iterations=20)
    v = cv.adam_second_moment([(lambda b=b: m(**b)["loss"]) for b in bs], [m.w, m.unused])
    root = torch.cat([x.sqrt() for x in v])
    assert res.details["zero_gradient_fraction"] == pytest.approx(0.5)
    assert res.details["sqrt_v_hat_median"] == pytest.approx(float(root.median()))


def _dropout_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).train()


def test_sharpness_is_deterministic_with_dropout_and_keeps_train_mode():
    model = _dropout_gpt2()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    a = cv.sharpness(model, {"input_ids": ids, "labels": ids}, num_iterations=4)
    b = cv.sharpness(model, {"input_ids": ids, "labels": ids}, num_iterations=4)
    assert a.eigenvalue == b.eigenvalue and model.training


def test_adam_sharpness_is_deterministic_with_dropout_and_keeps_train_mode():
    model = _dropout_gpt2()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    a = cv.adam_preconditioned_sharpness(model, [{"input_ids": ids, "labels": ids}], num_iterations=4)
    b = cv.adam_preconditioned_sharpness(model, [{"input_ids": ids, "labels": ids}], num_iterations=4)
    assert a.eigenvalue == b.eigenvalue and model.training
