"""1-D Gaussian-process regression tasks of the EquivCNP / ConvCNP papers (RBF, Matérn-5/2, periodic).

Protocol (EquivCNP code, `lienp/datasets/gpcurve.py` and `notebooks/make_paper_fig_gp.ipynb`):

* kernels with length scale 1 and output scale 1, jitter 1e-8 (escalated only if Cholesky fails, with a warning);
* training tasks: x ~ U(-2, 2); per batch `num_context ~ randint(3, 50)` and `num_target ~ randint(3, 50)`; the targets
  are the context **plus** the extra points (the context is the first `num_context` of the sampled points);
* evaluation tasks: 400 points on linspace(-4, 4) (extrapolation beyond the training range), a random subset of
  `randint(3, 50)` of them is the context, the targets are all 400 points.
"""

from __future__ import annotations

import logging
import math

import torch

__all__ = ["KERNELS", "kernel_matrix", "sample_gp", "sample_training_batch", "sample_evaluation_batch"]

logger = logging.getLogger(__name__)

KERNELS = ("rbf", "matern", "periodic")


def kernel_matrix(kernel: str, x1: torch.Tensor, x2: torch.Tensor, length_scale: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """Covariance `(..., N1, N2)` between `x1 (..., N1)` and `x2 (..., N2)`."""
    d = (x1[..., :, None] - x2[..., None, :]).abs() / length_scale
    if kernel == "rbf":
        return scale * torch.exp(-0.5 * d * d)
    if kernel == "matern":
        r5 = math.sqrt(5.0) * d
        return scale * (1 + r5 + 5.0 / 3.0 * d * d) * torch.exp(-r5)
    if kernel == "periodic":  # period 1: exp(-(2/ℓ) sin²(π d)) as in gpcurve.py
        return scale * torch.exp(-(2.0 / length_scale) * torch.sin(math.pi * d) ** 2)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def sample_gp(kernel: str, x: torch.Tensor, generator: torch.Generator | None = None, jitter: float = 1e-8) -> torch.Tensor:
    """Draw f ~ GP(0, k) at `x (B, N)` in float64; returns `(B, N)`."""
    x = x.double()
    k = kernel_matrix(kernel, x, x)
    eye = torch.eye(x.shape[-1], dtype=torch.float64)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(k + jitter * eye)
        if not bool(info.any()):
            break
        jitter *= 100
        logger.warning("GP Cholesky failed for the %s kernel; retrying with jitter %.0e", kernel, jitter)
    else:
        raise FloatingPointError(f"GP covariance of the {kernel} kernel is not positive definite even with jitter {jitter:.0e}")
    z = torch.randn(*x.shape, 1, generator=generator, dtype=torch.float64)
    return (chol @ z)[..., 0]


def sample_training_batch(
    kernel: str,
    batch_size: int,
    generator: torch.Generator | None = None,
    x_range: tuple[float, float] = (-2.0, 2.0),
    min_points: int = 3,
    max_points: int = 50,
) -> dict[str, torch.Tensor]:
    """One training batch: `context_x (B, Nc, 1)`, `context_y`, `target_x (B, Nc + Nt, 1)`, `target_y` (float32)."""
    nc = int(torch.randint(min_points, max_points, (1,), generator=generator))
    nt = int(torch.randint(min_points, max_points, (1,), generator=generator))
    lo, hi = x_range
    x = torch.rand(batch_size, nc + nt, generator=generator, dtype=torch.float64) * (hi - lo) + lo
    y = sample_gp(kernel, x, generator)
    x, y = x.float()[..., None], y.float()[..., None]
    return {"context_x": x[:, :nc], "context_y": y[:, :nc], "target_x": x, "target_y": y}


def sample_evaluation_batch(
    kernel: str,
    batch_size: int,
    generator: torch.Generator | None = None,
    x_range: tuple[float, float] = (-4.0, 4.0),
    num_targets: int = 400,
    min_context: int = 3,
    max_context: int = 50,
) -> dict[str, torch.Tensor]:
    """Evaluation tasks: targets = all `num_targets` grid points, context = a random subset of size randint(3, 50)
    (per task; padded with `context_mask`)."""
    x = torch.linspace(x_range[0], x_range[1], num_targets, dtype=torch.float64).expand(batch_size, -1)
    y = sample_gp(kernel, x, generator)
    sizes = torch.randint(min_context, max_context, (batch_size,), generator=generator)
    nc = int(sizes.max())
    cx = torch.zeros(batch_size, nc, 1)
    cy = torch.zeros(batch_size, nc, 1)
    mask = torch.zeros(batch_size, nc, dtype=torch.bool)
    for b in range(batch_size):
        idx = torch.randperm(num_targets, generator=generator)[: int(sizes[b])]
        cx[b, : len(idx), 0] = x[b, idx].float()
        cy[b, : len(idx), 0] = y[b, idx].float()
        mask[b, : len(idx)] = True
    return {
        "context_x": cx,
        "context_y": cy,
        "context_mask": mask,
        "target_x": x.float()[..., None].contiguous(),
        "target_y": y.float()[..., None],
    }
