"""Curvature of the training loss at initialisation: the top Hessian eigenvalue and its Adam-preconditioned analogue.

Why: stability theory ties the critical learning rate to curvature. Gradient descent on a quadratic is stable while
`lr * lambda_max(H) < 2`. For Adam, Cohen et al. ("Adaptive Gradient Methods at the Edge of Stability", 2022) show that
the relevant quantity is the *preconditioned sharpness* `lambda_max(P^{-1} H)` with `P = diag(sqrt(v_hat) + eps)`, and
that Adam with momentum `beta1` is stable while `lr * lambda_max(P^{-1} H) < (2 + 2 beta1) / (1 - beta1)`, which is
38 for `beta1 = 0.9`. Both quantities are computed here before any training step, so that they can be compared with
(or combined with) the Koopman spectrum of `hf_koopman.profile` as predictors of divergence.

What:

* `top_hessian_eigenvalue(loss_fn, params)`: the largest (algebraic) eigenvalue of the Hessian of a scalar loss with
  respect to `params`, by Lanczos iteration on Hessian-vector products (double backward; the Hessian is never formed).
  An optional diagonal `preconditioner` `D` gives `lambda_max(D^{-1/2} H D^{-1/2})`, which has the same eigenvalues as
  `D^{-1} H`.
* `adam_second_moment(loss_fns, params)`: Adam's bias-corrected second-moment estimate `v_hat` after `K` gradient
  evaluations at fixed parameters (no optimizer step is taken, hence "optimizer-free").
* `sharpness(model, batch)` and `adam_preconditioned_sharpness(model, batches)`: the two model-level quantities for a
  `transformers` model whose forward returns `.loss` when `labels` are in the batch (or any module with a `loss_fn`).

Definition used for the Adam analogue (our reading of Cohen et al. at step 0): the parameters stay at their
initial values; `v` is accumulated as Adam would over the gradients of `K` mini-batches (`v_t = beta2 v_{t-1} +
(1 - beta2) g_t^2`), bias-corrected (`v_hat = v_K / (1 - beta2^K)`); `P = diag(sqrt(v_hat) + eps)`; the Hessian is
the Hessian of the loss on `hessian_batch` (default: the first mini-batch) at the initial parameters. Coordinates
whose gradient is exactly zero in every mini-batch get `P = eps` and dominate unless the Hessian is zero there too;
pass the same data to both steps (the default) so that every coordinate the Hessian sees also has a gradient.

All functions leave the parameters and their `.grad` untouched and run the model in eval mode (restored afterwards)
so that dropout does not make the Hessian-vector products random. Attention is computed with PyTorch's math SDPA
kernel during the products because the fused CPU/GPU kernels do not all support double backward.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_koopman.eval_mode import eval_mode
from hf_koopman.logging_utils import get_logger

__all__ = [
    "CurvatureResult",
    "hessian_vector_product",
    "top_hessian_eigenvalue",
    "adam_second_moment",
    "sharpness",
    "adam_preconditioned_sharpness",
    "adam_stability_threshold",
]

logger = get_logger(__name__)


@dataclass(frozen=True)
class CurvatureResult:
    """Outcome of a Lanczos iteration on Hessian-vector products.

    Attributes:
        eigenvalue (`float`): the estimate of the largest algebraic eigenvalue (of `H`, or of `D^{-1/2} H D^{-1/2}`).
        dominant_eigenvalue (`float`): the estimate of the eigenvalue of largest magnitude; it differs from
            `eigenvalue` when the most curved direction is negative (a saddle, common at initialisation).
        iterations (`int`): Hessian-vector products used.
        converged (`bool`): the residual of the top estimate fell to `tol` times the estimate, so it is within that of
            an eigenvalue (in practice the top one); when `False`, `eigenvalue` is a lower bound of the top eigenvalue
            up to rounding (about `k * eps * |dominant eigenvalue|` in the parameters' dtype), and `critical_lr` an
            upper bound.
        seconds (`float`): wall time.
        critical_lr (`float`): the learning rate at which the stability threshold is reached, `threshold /
            eigenvalue` (`inf` when `eigenvalue <= 0`): `2 / lambda_max` for gradient descent, `38 / lambda_max` for
            the Adam-preconditioned sharpness with `beta1 = 0.9`.
        threshold (`float`): the constant used for `critical_lr` (2 for plain GD, `(2 + 2 beta1) / (1 - beta1)` for
            Adam).
        details (`dict`): extra numbers (e.g. the preconditioner's range) for reports.
    """

    eigenvalue: float
    dominant_eigenvalue: float
    iterations: int
    converged: bool
    seconds: float
    critical_lr: float
    threshold: float = 2.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the estimate and how it was obtained."""
        return {
            "eigenvalue": self.eigenvalue,
            "dominant_eigenvalue": self.dominant_eigenvalue,
            "iterations": self.iterations,
            "converged": self.converged,
            "seconds": self.seconds,
            "critical_lr": self.critical_lr,
            "threshold": self.threshold,
            **self.details,
        }


def adam_stability_threshold(beta1: float = 0.9) -> float:
    """`(2 + 2 beta1) / (1 - beta1)`: Adam is stable on a quadratic while `lr * lambda_max(P^{-1} H)` stays below it
    (38 for `beta1 = 0.9`; Cohen et al. 2022). `beta1 = 0` gives 2, the gradient-descent value."""
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1={beta1!r} must be in [0, 1).")
    return (2.0 + 2.0 * beta1) / (1.0 - beta1)


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("no parameters given: pass the tensors to differentiate (e.g. [p for p in model.parameters() "
                         "if p.requires_grad]).")
    bad = [i for i, p in enumerate(params) if not (isinstance(p, torch.Tensor) and p.requires_grad)]
    if bad:
        raise ValueError(f"parameters at positions {bad[:5]} do not require grad; pass only trainable tensors.")
    if any(not p.is_floating_point() for p in params):
        raise ValueError("all parameters must be floating point tensors.")
    return params


def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it (e.g. .mean()) first.")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the parameters (requires_grad is False); check that the model "
                         "is not in torch.no_grad() and that its parameters require grad.")
    if not torch.isfinite(loss):
        raise ValueError(f"the loss is not finite ({float(loss.detach())}); curvature is undefined at this point.")
    return loss.reshape(())


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """Force PyTorch's math SDPA kernel, which supports double backward (the fused kernels may not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _grads(loss: torch.Tensor, params: list[torch.Tensor], *, create_graph: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def hessian_vector_product(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`H v` for the Hessian `H` of `loss_fn()` with respect to `params`, by double backward.

    Args:
        loss_fn: closure returning a scalar loss that depends on `params` (called once).
        params: the tensors to differentiate, shapes `(p_i...)`.
        vectors: one tensor per parameter with the same shape.

    Returns:
        `list[torch.Tensor]`: `H v`, one tensor per parameter (detached). Parameters the loss does not reach give zeros.
    """
    params = _check_params(params)
    if len(vectors) != len(params) or any(v.shape != p.shape for v, p in zip(vectors, params)):
        raise ValueError("vectors must hold one tensor per parameter, each of the parameter's shape.")
    with _double_backward_attention():
        loss = _scalar_loss(loss_fn())
        grads = _grads(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors) if g.requires_grad)
        if not isinstance(dot, torch.Tensor):  # every gradient is constant in the parameters: H = 0
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _normalise(vs: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = math.sqrt(_dot(vs, vs))
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError(f"the iteration hit a vector of norm {norm}; the Hessian-vector product is zero or not "
                         "finite (check the loss and the preconditioner).")
    return [v / norm for v in vs]


def _lanczos(
    apply: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    start: list[torch.Tensor],
    *,
    num_iterations: int,
    tol: float,
) -> tuple[float, float, int, bool]:
    """Extreme eigenvalues of the symmetric operator `apply` by the Lanczos three-term recurrence from `start`.

    Returns `(largest algebraic eigenvalue, eigenvalue of largest magnitude, steps, converged)`: the Ritz values of
    the `(k, k)` tridiagonal matrix after `k` products. Converged when the residual `||A y - theta y||` of the top Ritz
    pair, `beta_k |s_k|` (no extra product), is at most `tol |theta|`: `theta` is then within that residual of an
    eigenvalue of `A`, in practice the top one (Lanczos resolves the ends of the spectrum first; an isolated top
    eigenvalue just above a heavy cluster can still be missed while the cluster converges).
    Why not power iteration: with a dominant negative eigenvalue `mu` the top one is found on `A - mu I`, whose leading
    eigenvalues crowd together when `|mu| >> lambda_max`, so the iterate stalls and a stopping rule on its change
    reports convergence far from `lambda_max`. Only the last two Lanczos vectors are kept (memory of three parameter
    copies); without reorthogonalisation converged Ritz values may repeat, which leaves the extreme ones correct.
    """
    v_prev: list[torch.Tensor] | None = None
    v = _normalise(start)
    alphas: list[float] = []
    betas: list[float] = []
    top = dominant = math.nan
    for step in range(1, num_iterations + 1):
        w = apply(v)
        alpha = _dot(v, w)
        if not math.isfinite(alpha):
            raise ValueError("the Hessian-vector product is not finite; curvature is undefined at this point.")
        w = [a - alpha * x for a, x in zip(w, v)]
        if v_prev is not None:
            w = [a - betas[-1] * x for a, x in zip(w, v_prev)]
        alphas.append(alpha)
        beta = math.sqrt(_dot(w, w))
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        theta, vectors = torch.linalg.eigh(tri)
        top, dominant = float(theta[-1]), float(theta[theta.abs().argmax()])
        residual = beta * abs(float(vectors[-1, -1]))
        # relative to the top estimate itself: a top near 0 (or below) never passes on the scale of a dominant saddle
        scale = abs(top)
        breakdown = 10 * math.sqrt(step) * torch.finfo(v[0].dtype).eps * max(float(theta.abs().max()), 1e-30)
        if beta <= breakdown:  # an invariant subspace (to the vectors' rounding): the Ritz values are its eigenvalues
            return top, dominant, step, True
        if step > 1 and residual <= tol * scale:
            return top, dominant, step, True
        betas.append(beta)
        v_prev, v = v, [a / beta for a in w]
    return top, dominant, num_iterations, False


def top_hessian_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    preconditioner: Sequence[torch.Tensor] | None = None,
    num_iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    threshold: float = 2.0,
) -> CurvatureResult:
    """Largest algebraic eigenvalue of the Hessian of `loss_fn()` (optionally preconditioned), by Lanczos iteration.

    The Krylov space of `num_iterations` Hessian-vector products holds both ends of the spectrum, so the top
    eigenvalue is found directly, also when a larger negative eigenvalue dominates (a saddle, common at
    initialisation; `CurvatureResult.dominant_eigenvalue` gives it). With a `preconditioner` `D` (positive, one tensor
    per parameter) the operator is `D^{-1/2} H D^{-1/2}`, symmetric with the eigenvalues of `D^{-1} H`.

    Args:
        loss_fn: closure returning a scalar loss that depends on `params`; called once per Hessian-vector product
            (it must be deterministic: same batch, no dropout).
        params: trainable tensors, shapes `(p_i...)`.
        preconditioner: optional positive tensors of the same shapes, e.g. `sqrt(v_hat) + eps` for Adam.
        num_iterations (`int`, defaults to 20): the most Hessian-vector products (Lanczos steps).
        tol (`float`, defaults to 1e-3): stop when the top estimate's residual `||H y - lambda y||` is at most
            `tol * |lambda|` (the residual bounds the distance of `lambda` to an eigenvalue of `H`).
        seed (`int`, defaults to 0): seed of the random start vector.
        threshold (`float`, defaults to 2): stability constant for `critical_lr = threshold / eigenvalue`.

    Returns:
        `CurvatureResult`.

    Raises:
        ValueError: empty or frozen `params`, a non-scalar or non-finite loss, a preconditioner of the wrong shape or
            with non-positive entries, or a zero / non-finite Hessian-vector product.
    """
    params = _check_params(params)
    if num_iterations < 2:
        raise ValueError(f"num_iterations={num_iterations} must be >= 2 (convergence is judged from the second step).")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be > 0.")
    scale: list[torch.Tensor] | None = None
    if preconditioner is not None:
        preconditioner = list(preconditioner)
        if len(preconditioner) != len(params) or any(d.shape != p.shape for d, p in zip(preconditioner, params)):
            raise ValueError("preconditioner must hold one tensor per parameter, each of the parameter's shape.")
        if any(not bool(torch.all(d > 0)) or not bool(torch.all(torch.isfinite(d))) for d in preconditioner):
            raise ValueError("preconditioner entries must be finite and > 0 (add Adam's eps to sqrt(v_hat)).")
        scale = [d.detach().to(p.dtype).rsqrt() for d, p in zip(preconditioner, params)]

    def apply(v: list[torch.Tensor]) -> list[torch.Tensor]:
        if scale is None:
            return hessian_vector_product(loss_fn, params, v)
        hv = hessian_vector_product(loss_fn, params, [s * x for s, x in zip(scale, v)])
        return [s * h for s, h in zip(scale, hv)]

    start_time = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) for p in params]
    eigenvalue, mu, steps, converged = _lanczos(apply, start, num_iterations=num_iterations, tol=tol)
    if not converged:
        logger.warning("Lanczos did not converge in %d Hessian-vector products (tol %g); the eigenvalue is an "
                       "estimate (a lower bound of the top eigenvalue, up to rounding)", num_iterations, tol)
    return CurvatureResult(
        eigenvalue=float(eigenvalue),
        dominant_eigenvalue=float(mu),
        iterations=steps,
        converged=converged,
        seconds=time.perf_counter() - start_time,
        critical_lr=threshold / eigenvalue if eigenvalue > 0 else math.inf,
        threshold=threshold,
    )


def adam_second_moment(
    loss_fns: Iterable[Callable[[], torch.Tensor]],
    params: Sequence[torch.Tensor],
    *,
    beta2: float = 0.999,
) -> list[torch.Tensor]:
    """Adam's bias-corrected second moment `v_hat` after one gradient per closure, parameters held fixed.

    `v_t = beta2 v_{t-1} + (1 - beta2) g_t^2` from `v_0 = 0`, then `v_hat = v_K / (1 - beta2^K)` (for `K` gradients
    this is a weighted mean of the `g_t^2`, close to the plain mean when `K` is small against `1 / (1 - beta2)`).

    Args:
        loss_fns: `K >= 1` closures, each returning the scalar loss of one mini-batch.
        params: trainable tensors, shapes `(p_i...)`.
        beta2 (`float`, defaults to 0.999): Adam's second-moment decay.

    Returns:
        `list[torch.Tensor]`: `v_hat`, one tensor per parameter (detached).
    """
    params = _check_params(params)
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2={beta2!r} must be in [0, 1).")
    v = [torch.zeros_like(p) for p in params]
    k = 0
    for loss_fn in loss_fns:
        grads = _grads(_scalar_loss(loss_fn()), params, create_graph=False)
        if any(not bool(torch.all(torch.isfinite(g))) for g in grads):
            raise ValueError(f"the gradient of mini-batch {k} is not finite; the preconditioner is undefined.")
        v = [beta2 * vi + (1.0 - beta2) * g.detach() ** 2 for vi, g in zip(v, grads)]
        k += 1
    if k == 0:
        raise ValueError("loss_fns is empty: pass at least one mini-batch closure.")
    correction = 1.0 - beta2**k
    return [vi / correction for vi in v]


def _model_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> Callable[[], torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of model inputs (with labels), got {type(batch).__name__}.")
    if "labels" not in batch:
        raise ValueError("batch has no 'labels': the model must return a training loss (e.g. input_ids and labels for "
                         "a causal LM).")

    def loss_fn() -> torch.Tensor:
        out = model(**batch)
        loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"{type(model).__name__} returned no loss for this batch; pass labels it accepts.")
        return loss

    return loss_fn


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere).")
    return params


def sharpness(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    num_iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> CurvatureResult:
    """Top Hessian eigenvalue `lambda_max(H)` of `model`'s loss on `batch` at the current parameters.

    Gradient descent is stable on the local quadratic while `lr < 2 / lambda_max` (`CurvatureResult.critical_lr`).

    Args:
        model: a module whose forward returns `.loss` for `batch` (e.g. a `transformers` causal LM with `labels`).
        batch: model inputs with `labels`, e.g. `input_ids` and `labels` `(B, T)`.
        num_iterations: the most Hessian-vector products (see `top_hessian_eigenvalue`).
        tol: relative tolerance on the top estimate's residual (see `top_hessian_eigenvalue`).
        seed: seed of the random start vector.

    Returns:
        `CurvatureResult` (`threshold = 2`).
    """
    params = _trainable(model)
    with eval_mode(model):
        return top_hessian_eigenvalue(
            _model_loss_fn(model, batch), params, num_iterations=num_iterations, tol=tol, seed=seed, threshold=2.0
        )


def adam_preconditioned_sharpness(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    hessian_batch: Mapping[str, torch.Tensor] | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    num_iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> CurvatureResult:
    """Adam-preconditioned sharpness `lambda_max(P^{-1} H)` at the current parameters (Cohen et al. 2022).

    `P = diag(sqrt(v_hat) + eps)` with `v_hat` from `adam_second_moment` over the gradients of `batches` (the
    parameters are not updated), `H` the Hessian of the loss on `hessian_batch` (default `batches[0]`). Adam with
    momentum `beta1` is stable on the local quadratic while `lr * lambda_max(P^{-1} H) < (2 + 2 beta1) / (1 - beta1)`
    (38 for `beta1 = 0.9`), so `critical_lr = 38 / lambda_max(P^{-1} H)`.

    Args:
        model: a module whose forward returns `.loss` for each batch.
        batches: `K >= 1` mini-batches (dicts with `labels`), e.g. the first `K` training batches.
        hessian_batch: the batch whose loss Hessian is used; defaults to `batches[0]`.
        beta1: Adam's momentum (sets the threshold `(2 + 2 beta1) / (1 - beta1)`).
        beta2: Adam's second-moment decay.
        eps: Adam's epsilon, added to `sqrt(v_hat)`.
        num_iterations: the most Hessian-vector products (see `top_hessian_eigenvalue`).
        tol: relative tolerance on the top estimate's residual (see `top_hessian_eigenvalue`).
        seed: seed of the random start vector.

    Returns:
        `CurvatureResult` (`threshold = (2 + 2 beta1) / (1 - beta1)`), with `details` holding the number of batches
        and the range of `sqrt(v_hat)`.
    """
    params = _trainable(model)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one mini-batch for Adam's second moment.")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0 (it keeps the preconditioner invertible).")
    threshold = adam_stability_threshold(beta1)
    with eval_mode(model):
        start = time.perf_counter()
        v_hat = adam_second_moment((_model_loss_fn(model, b) for b in batches), params, beta2=beta2)
        root = [v.sqrt() for v in v_hat]
        result = top_hessian_eigenvalue(
            _model_loss_fn(model, hessian_batch if hessian_batch is not None else batches[0]),
            params,
            preconditioner=[r + eps for r in root],
            num_iterations=num_iterations,
            tol=tol,
            seed=seed,
            threshold=threshold,
        )
    flat = torch.cat([r.flatten() for r in root])
    details = {
        "num_batches": len(batches),
        "sqrt_v_hat_min": float(flat.min()),
        "sqrt_v_hat_median": float(flat.median()),
        "sqrt_v_hat_max": float(flat.max()),
        "zero_gradient_fraction": float((flat == 0).double().mean()),
    }
    return CurvatureResult(
        eigenvalue=result.eigenvalue,
        dominant_eigenvalue=result.dominant_eigenvalue,
        iterations=result.iterations,
        converged=result.converged,
        seconds=time.perf_counter() - start,
        critical_lr=result.critical_lr,
        threshold=threshold,
        details=details,
    )
