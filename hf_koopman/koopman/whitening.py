r"""ZCA whitening of residual-stream snapshots (RKSP Eqs. 7-9).

Snapshots are rows: `X, Y` have shape `(N, d)` (or `(L, N, d)` for `L` layers at once). The paper writes columns
(`d x N`); we convert once, here, and everything downstream uses rows.

$$\hat\Sigma_X = \tfrac{1}{N-1}(X-\bar X)^\top(X-\bar X) + \epsilon I,\qquad
\tilde X = (X-\bar X)\,\hat\Sigma_X^{-1/2},\qquad \tilde Y = (Y-\bar Y)\,\hat\Sigma_X^{-1/2}$$

Each matrix is centred on its own mean; both use the whitening matrix of X (Eq. 8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Whitening", "zca_whitening", "whiten"]


class Whitening(NamedTuple):
    """ZCA whitening fitted on X.

    Shapes:
        - `mean`: `(..., d)`, the sample mean of X.
        - `matrix`: `(..., d, d)`, the symmetric $W = (\\hat\\Sigma_X + \\epsilon I)^{-1/2}$ (pseudo-inverse square root
          on directions where $\\hat\\Sigma_X + \\epsilon I$ vanishes, which only happens for `eps=0`).
        - `variances`: `(..., d)`, eigenvalues of the *unregularised* covariance $\\hat\\Sigma_X$ (ascending, clamped at 0).
        - `basis`: `(..., d, d)`, its orthonormal eigenvectors (columns).
    """

    mean: torch.Tensor
    matrix: torch.Tensor
    variances: torch.Tensor
    basis: torch.Tensor


def _inverse_sqrt(values: torch.Tensor, eps: float) -> torch.Tensor:
    # (s + eps)^(-1/2), with a pseudo-inverse on directions that carry nothing (possible only for eps = 0)
    shifted = values + eps
    tol = shifted.amax(dim=-1, keepdim=True) * values.shape[-1] * torch.finfo(values.dtype).eps
    safe = shifted.clamp_min(torch.finfo(values.dtype).tiny)
    return torch.where(shifted > tol, safe.rsqrt(), torch.zeros_like(shifted))


def zca_whitening(X: torch.Tensor, eps: float = 1e-5) -> Whitening:
    """Fit ZCA whitening $(\\hat\\Sigma_X + \\epsilon I)^{-1/2}$ on X (Eq. 9), in the dtype of `X`.

    Args:
        X (`torch.Tensor` of shape `(..., N, d)`): snapshots as rows, floating point.
        eps (`float`, *optional*, defaults to `1e-5`): ridge added to the covariance (paper default, App. D).

    Returns:
        [`Whitening`]: mean, whitening matrix and the eigendecomposition of the covariance.
    """
    n = X.shape[-2]
    mean = X.mean(dim=-2)
    Xc = X - mean.unsqueeze(-2)
    cov = Xc.mT @ Xc / (n - 1)
    cov = 0.5 * (cov + cov.mT)
    variances, basis = torch.linalg.eigh(cov)
    variances = variances.clamp_min(0.0)
    w = _inverse_sqrt(variances, eps)
    matrix = (basis * w.unsqueeze(-2)) @ basis.mT
    return Whitening(mean=mean, matrix=matrix, variances=variances, basis=basis)


def whiten(X: torch.Tensor, Y: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened snapshots $(\\tilde X, \\tilde Y)$ of Eq. 7-8: X-based ZCA, each matrix centred on its own mean.

    Computed in float64 (the inputs are up-cast). Useful to inspect the coordinates in which [`whitened_dmd`] works
    or to feed another DMD implementation the very same data.

    Args:
        X (`torch.Tensor` of shape `(..., N, d)`): states entering the block (rows are samples).
        Y (`torch.Tensor` of shape `(..., N, d)`): states leaving the block, same rows.
        eps (`float`, *optional*, defaults to `1e-5`): covariance ridge.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: $\\tilde X, \\tilde Y$, both `(..., N, d)` float64.
    """
    X = X.to(torch.float64)
    Y = Y.to(torch.float64)
    wh = zca_whitening(X, eps)
    Xt = (X - wh.mean.unsqueeze(-2)) @ wh.matrix
    Yt = (Y - Y.mean(dim=-2, keepdim=True)) @ wh.matrix
    return Xt, Yt
