r"""Whitening of residual-stream snapshots (RKSP Eqs. 7-9): the whitening transforms the library uses.

Snapshots are rows: `X, Y` have shape `(N, d)` (or `(L, N, d)` for `L` layers at once). The paper writes columns
(`d x N`); we convert once, here, and everything downstream uses rows.

$$\hat\Sigma_X = \tfrac{1}{N-1}(X-\bar X)^\top(X-\bar X) + \epsilon I,\qquad
\tilde X = (X-\bar X)\,\hat\Sigma_X^{-1/2},\qquad \tilde Y = (Y-\bar Y)\,\hat\Sigma_X^{-1/2}$$

Each matrix is centred on its own mean; both use the whitening matrix of X (Eq. 8).

* [`zca_whitening`] / [`whiten`]: the paper's symmetric (ZCA) square root, via `eigh`. The reference; the
  benchmarks compare against it.
* [`cholesky_whitening`]: $W = L^{-1}$ from a Cholesky factor. It differs from ZCA by an orthogonal rotation, which
  leaves every spectral quantity unchanged, and costs a fraction of an eigendecomposition. Whitened DMD
  (`dmd.py`) and KSS (`shaping.py`) use it. The full-spectrum path of `dmd.py` never forms whitened snapshots: it
  works on the second moments and factorises the same $\hat\Sigma_X$ there (`_full_grams`, `_raw_fit`), i.e. this
  whitening in factor form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["CholeskyWhitening", "Whitening", "cholesky_whitening", "whiten", "zca_whitening"]


class Whitening(NamedTuple):
    """ZCA whitening fitted on X.

    Shapes:
        - `mean`: `(..., d)`, the sample mean of X.
        - `matrix`: `(..., d, d)`, the symmetric $W = (\\hat\\Sigma_X + \\epsilon I)^{-1/2}$ (pseudo-inverse square root
          on directions where $\\hat\\Sigma_X + \\epsilon I$ vanishes, which only happens for `eps=0`).
        - `variances`: `(..., d)`, eigenvalues of the *unregularised* covariance $\\hat\\Sigma_X$
          (ascending, clamped at 0).
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


def _as_tensor(value: object, name: str, shape: str = "(N, d) or (L, N, d)") -> torch.Tensor:
    """`value` as a real floating tensor of the given `shape` (named in the error only): a torch.Tensor, or a NumPy
    array read without a copy; integers are up-cast to float64. Anything else, complex and bool values are refused,
    naming what is accepted."""
    if not isinstance(value, torch.Tensor):
        try:
            import numpy as np

            if not isinstance(value, np.ndarray):
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be a torch.Tensor or NumPy array of shape {shape}, got "
                            f"{type(value).__name__}") from None
        value = torch.from_numpy(value)
    if value.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}")
    if value.dtype == torch.bool:
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    return value if value.is_floating_point() else value.to(torch.float64)


def zca_whitening(X: torch.Tensor, eps: float = 1e-5) -> Whitening:
    """Fit ZCA whitening $(\\hat\\Sigma_X + \\epsilon I)^{-1/2}$ on X (Eq. 9), in the dtype of `X`.

    Args:
        X (`torch.Tensor` of shape `(..., N, d)`): snapshots as rows, floating point.
        eps (`float`, *optional*, defaults to `1e-5`): ridge added to the covariance (paper default, App. D).

    Returns:
        [`Whitening`]: mean, whitening matrix and the eigendecomposition of the covariance.
    """
    X = _as_tensor(X, "X", "(..., N, d)")
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
    X = _as_tensor(X, "X", "(..., N, d)").to(torch.float64)
    Y = _as_tensor(Y, "Y", "(..., N, d)").to(torch.float64)
    wh = zca_whitening(X, eps)
    Xt = (X - wh.mean.unsqueeze(-2)) @ wh.matrix
    Yt = (Y - Y.mean(dim=-2, keepdim=True)) @ wh.matrix
    return Xt, Yt


# --------------------------------------------------------------------------------------------------------------------
# Cholesky whitening: the fast path used by whitened DMD and KSS


class CholeskyWhitening:
    r"""$W = L^{-1}$ with $\hat\Sigma_X + \epsilon I = LL^\top$: a rotation of ZCA ($W_{zca} = QW$, $Q$ orthogonal).

    Every DMD quantity RKSP reads (eigenvalues, unit-norm eigenvector conditioning, ResDMD residuals, $\eta_{nl}$) is
    invariant under that rotation, so the cheap factor (`d^3/3` flops, no eigendecomposition) replaces the symmetric
    square root. `matrix` is the explicit triangular inverse `(..., d, d)`: later products are plain GEMMs.
    """

    def __init__(self, chol: torch.Tensor):
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        self.chol = chol
        self.matrix = torch.linalg.solve_triangular(chol, eye, upper=False)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """`W z` for `z` of shape `(..., d, k)`."""
        return self.matrix @ z

    def apply_t(self, z: torch.Tensor) -> torch.Tensor:
        """`W^T z` for `z` of shape `(..., d, k)`."""
        return self.matrix.mT @ z

    def congruence(self, gram: torch.Tensor) -> torch.Tensor:
        """$W G W^\\top = L^{-1} G L^{-\\top}$: a second moment of raw snapshots in whitened coordinates (two
        triangular solves, half the flops of two general products)."""
        half = torch.linalg.solve_triangular(self.chol, gram.to(self.chol.dtype), upper=False)  # L^-1 G
        return torch.linalg.solve_triangular(self.chol, half.mT, upper=False).mT  # (L^-1 (L^-1 G)^T)^T


class _EighWhitening(CholeskyWhitening):
    """Fallback when `Sigma_X + eps I` is not numerically positive definite (eps = 0): pseudo-inverse square root."""

    def __init__(self, sigma: torch.Tensor, eps: float):  # noqa: D107 -- no super().__init__: no Cholesky factor
        s, Q = torch.linalg.eigh(sigma.to(torch.float64))
        w = _inverse_sqrt((s - eps).clamp_min(0.0), eps).to(sigma.dtype)
        self.matrix = (Q.to(sigma.dtype) * w.unsqueeze(-2)) @ Q.to(sigma.dtype).mT

    def congruence(self, gram: torch.Tensor) -> torch.Tensor:
        return self.matrix @ gram.to(self.matrix.dtype) @ self.matrix.mT


def cholesky_whitening(cov: torch.Tensor, eps: float = 1e-5) -> CholeskyWhitening:
    r"""Whitening of Eq. 9 from the covariance `cov` `(..., d, d)` of X (no ridge in it): $W = L^{-1}$, $LL^\top =
    \mathrm{cov} + \epsilon I$.

    Factorises in the dtype of `cov`; a float32 factorisation that fails (round-off made a tiny ridge indefinite) is
    retried in float64, and a float64 one that fails (e.g. `eps=0` on rank-deficient data) falls back to the symmetric
    pseudo-inverse square root.
    """
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov + eps * eye)
    if not bool((info > 0).any()):
        return CholeskyWhitening(chol)
    if cov.dtype != torch.float64:
        chol, info = torch.linalg.cholesky_ex(cov.to(torch.float64) + eps * eye.to(torch.float64))
        if not bool((info > 0).any()):
            whitener = CholeskyWhitening(chol)
            whitener.matrix = whitener.matrix.to(cov.dtype)
            return whitener
    return _EighWhitening(cov + eps * eye, eps)
