"""`hf_koopman.curvature`: Lanczos against known spectra, the Adam preconditioner, a tiny transformers model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_koopman.curvature import (
    adam_preconditioned_sharpness,
    adam_second_moment,
    adam_stability_threshold,
    hessian_vector_product,
    sharpness,
    top_hessian_eigenvalue,
)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return torch.tensor(q @ np.diag(eigenvalues) @ q.T, dtype=torch.float64)


class Quadratic(nn.Module):
    """loss = 0.5 x^T A x + b^T x: Hessian A everywhere."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a
        self.x = nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64))
        self.b = torch.randn(a.shape[0], dtype=torch.float64)

    def forward(self, labels=None, **_):
        loss = 0.5 * self.x @ self.a @ self.x + self.b @ self.x
        return {"loss": loss}


def test_quadratic_top_eigenvalue_matches_known():
    eig = [7.5, 3.0, 1.0, 0.5, -2.0, 0.1]
    model = Quadratic(_symmetric(eig))
    res = top_hessian_eigenvalue(lambda: model()["loss"], [model.x], num_iterations=500, tol=1e-10)
    assert res.converged
    assert res.eigenvalue == pytest.approx(7.5, rel=1e-6)
    assert res.critical_lr == pytest.approx(2 / 7.5, rel=1e-6)


def test_negative_dominant_direction_still_gives_algebraic_max():
    # |-10| dominates: plain power iteration would return -10; the top eigenvalue is +3
    eig = [-10.0, 3.0, 1.0, -0.5]
    model = Quadratic(_symmetric(eig, seed=1))
    res = top_hessian_eigenvalue(lambda: model()["loss"], [model.x], num_iterations=2000, tol=1e-12)
    assert res.dominant_eigenvalue == pytest.approx(-10.0, rel=1e-6)
    assert res.eigenvalue == pytest.approx(3.0, rel=1e-4)


def test_negative_definite_gives_infinite_critical_lr():
    model = Quadratic(_symmetric([-1.0, -2.0, -3.0], seed=2))
    res = top_hessian_eigenvalue(lambda: model()["loss"], [model.x], num_iterations=2000, tol=1e-12)
    assert res.eigenvalue == pytest.approx(-1.0, rel=1e-4)
    assert math.isinf(res.critical_lr)


def test_preconditioned_eigenvalue_matches_dense_computation():
    a = _symmetric([4.0, 2.0, 1.0, 0.3], seed=3)
    d = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    model = Quadratic(a)
    res = top_hessian_eigenvalue(lambda: model()["loss"], [model.x], preconditioner=[d], num_iterations=1000,
                                 tol=1e-12, threshold=38.0)
    expected = float(np.linalg.eigvals(np.diag(1 / d.numpy()) @ a.numpy()).real.max())
    assert res.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert res.critical_lr == pytest.approx(38.0 / expected, rel=1e-6)


def test_hvp_matches_matrix_product_over_several_parameters():
    a = _symmetric([3.0, 1.0, 2.0, 5.0], seed=4)
    p1 = nn.Parameter(torch.randn(2, dtype=torch.float64))
    p2 = nn.Parameter(torch.randn(2, dtype=torch.float64))

    def loss():
        x = torch.cat([p1, p2])
        return 0.5 * x @ a @ x

    v = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    hv = hessian_vector_product(loss, [p1, p2], v)
    expected = a @ torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.allclose(torch.cat(hv), expected)


def test_adam_second_moment_is_bias_corrected_ema():
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    scales = [1.0, 3.0, -2.0]
    fns = [lambda s=s: s * (p**2).sum() / 2 for s in scales]  # gradient s * p
    v = adam_second_moment(fns, [p], beta2=0.9)
    ema = torch.zeros(2, dtype=torch.float64)
    for s in scales:
        ema = 0.9 * ema + 0.1 * (s * p.detach()) ** 2
    assert torch.allclose(v[0], ema / (1 - 0.9**3))


def test_adam_threshold_constant():
    assert adam_stability_threshold(0.9) == pytest.approx(38.0)
    assert adam_stability_threshold(0.0) == pytest.approx(2.0)


def test_errors_are_clear():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="scalar"):
        top_hessian_eigenvalue(lambda: p * 2, [p])
    with pytest.raises(ValueError, match="no parameters"):
        top_hessian_eigenvalue(lambda: (p**2).sum(), [])
    with pytest.raises(ValueError, match="not finite"):
        top_hessian_eigenvalue(lambda: (p**2).sum() * float("nan"), [p])
    with pytest.raises(ValueError, match="> 0"):
        top_hessian_eigenvalue(lambda: (p**2).sum(), [p], preconditioner=[torch.zeros(3)])
    frozen = torch.randn(3)
    with pytest.raises(ValueError, match="require grad"):
        top_hessian_eigenvalue(lambda: (frozen**2).sum(), [frozen])
    with pytest.raises(ValueError, match="labels"):
        sharpness(nn.Linear(2, 2), {"input_ids": torch.zeros(1, 2)})


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def test_tiny_transformers_model_sharpness_matches_finite_differences():
    model = _tiny_gpt2().double()
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    before = [p.detach().clone() for p in model.parameters()]
    res = sharpness(model, batch, num_iterations=10)  # the run's side effects; the HVP is checked below
    assert res.eigenvalue > 0 and math.isfinite(res.eigenvalue)
    # parameters and .grad untouched, training mode restored
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # an independent check of the Hessian-vector product: central differences of the gradient
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    model.eval()

    def loss_fn() -> torch.Tensor:  # the model's LM loss in float64 (transformers upcasts logits to float32 only)
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))

    hv = hessian_vector_product(loss_fn, params, v)

    def grad_at(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, x in zip(params, v):
                p.add_(sign * 1e-5 * x)
        g = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, x in zip(params, v):
                p.sub_(sign * 1e-5 * x)
        return list(g)

    fd = [(a - b) / 2e-5 for a, b in zip(grad_at(1.0), grad_at(-1.0))]
    num = math.sqrt(sum(float(((h - f) ** 2).sum()) for h, f in zip(hv, fd)))
    den = math.sqrt(sum(float((f**2).sum()) for f in fd))
    assert num / den < 1e-4
    # the top eigenvalue bounds every Rayleigh quotient
    assert sum(float((h * x).sum()) for h, x in zip(hv, v)) <= res.eigenvalue * (1 + 1e-3)


def test_tiny_transformers_model_adam_sharpness():
    model = _tiny_gpt2()
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 32, (4, 16), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    res = adam_preconditioned_sharpness(model, batches, num_iterations=30)
    assert res.threshold == pytest.approx(38.0)
    assert res.eigenvalue > 0 and math.isfinite(res.eigenvalue)
    assert res.critical_lr == pytest.approx(38.0 / res.eigenvalue)
    assert res.details["num_batches"] == 3
    # preconditioning by sqrt(v_hat) (gradients ~1e-2) must raise the curvature above the plain Hessian's
    plain = sharpness(model, batches[0], num_iterations=30)
    assert res.eigenvalue > plain.eigenvalue


def test_a_dominant_saddle_far_larger_than_the_top_eigenvalue_does_not_stall_the_estimate():
    """|mu| = 1000 against lambda_max = 1 and 198 eigenvalues in [0, 0.5]: a shifted power iteration stalls near the
    spectrum's average and stops on its small change; at the default settings the estimate is the top eigenvalue."""
    gen = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([-1000.0, 1.0]), torch.rand(198, generator=gen) * 0.5]).double()
    x = nn.Parameter(torch.randn(200, generator=gen, dtype=torch.float64))
    res = top_hessian_eigenvalue(lambda: 0.5 * (d * x * x).sum(), [x])
    assert res.converged and res.eigenvalue == pytest.approx(1.0, rel=1e-3)
    assert res.dominant_eigenvalue == pytest.approx(-1000.0, rel=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_a_converged_estimate_is_within_its_tolerance(seed):
    """On random spectra with a saddle up to 1000x the top eigenvalue, every estimate that says it converged is within
    `tol` of the top eigenvalue, and every estimate is at most the top eigenvalue (float64 products)."""
    gen = torch.Generator().manual_seed(seed)
    n = 120
    top = float(torch.rand(1, generator=gen)) * 10 + 0.1
    eig = torch.cat([torch.tensor([-top * 10 ** (3 * float(torch.rand(1, generator=gen)))]),
                     torch.tensor([top]), torch.rand(n - 2, generator=gen) * top * 0.9]).tolist()
    model = Quadratic(_symmetric(eig, seed=seed))
    for tol in (1e-2, 1e-3):
        res = top_hessian_eigenvalue(lambda: model()["loss"], [model.x], tol=tol)
        assert res.eigenvalue <= top * (1 + 1e-9)
        if res.converged:
            assert res.eigenvalue == pytest.approx(top, rel=tol)


@pytest.mark.parametrize("seed", range(3))
def test_a_top_estimate_still_below_zero_is_not_called_converged_on_the_saddles_scale(seed):
    """A bulk reaching below zero under a positive top eigenvalue of 1, beside mu = -1000: early Ritz values of the top
    end are negative; their residual is judged against themselves, not against |mu|, so no negative estimate (with an
    infinite critical learning rate) is reported as converged."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.cat([torch.tensor([-1000.0, 1.0]), torch.rand(198, generator=gen) * 2.0 - 1.5]).double()
    x = nn.Parameter(torch.randn(200, generator=gen, dtype=torch.float64))
    res = top_hessian_eigenvalue(lambda: 0.5 * (d * x * x).sum(), [x])
    assert res.eigenvalue == pytest.approx(1.0, rel=1e-3) and res.converged
    assert res.critical_lr == pytest.approx(2.0, rel=1e-3)
