r"""The Kreiss constant of a square matrix, computed (not bounded) -- RKSP App. B.3, Eq. 29.

$$\mathcal K(A) = \sup_{|z|>1}\,(|z|-1)\,\|(zI-A)^{-1}\|_2 = \sup_{|z|>1}\frac{|z|-1}{\sigma_{\min}(zI-A)}$$

Facts used by the search: $\mathcal K(A) \ge 1$ for every $A$ (the ratio tends to 1 as $|z|\to\infty$);
$\mathcal K(A) = \infty$ when $\rho(A) > 1$ (take $z \to \lambda$ with $|\lambda|>1$); $\mathcal K(A) = 1$ for a normal
$A$ with $\rho(A) \le 1$; and $\mathcal K(\bar A) = \mathcal K(A)$, so for a real $A$ only the upper
half-plane is searched.

Search. Write $z = (1+t)e^{i\theta}$. We evaluate the ratio on a grid of log-spaced $t \in [t_{\min}, 10^3]$ and
uniform angles, plus the angles of the eigenvalues of largest modulus (where peaks sit), then refine the best grid
points by a pattern search in $(\log t, \theta)$ with halving steps. The result is a lower bound on the supremum that
is tight to the refinement tolerance (the tests check it against a closed-form value).

Cost. $\sigma_{\min}$ comes from batched `torch.linalg.svdvals` for $m \le 64$ (about a thousand `(m, m)` SVDs: ~0.1 s
for the `32 x 32` operators of the default recipe). For larger, exact operators each $\sigma_{\min}$ is obtained by
inverse power iteration on an LU factorisation, on a coarser grid (seconds per `768 x 768` operator); when
$\rho(A) > 1$, which is the common case for transformers at initialisation, the answer is $\infty$ with no search.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kreiss_constant"]

_SMALL = 64


def _sigma_min_small(A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.svdvals(z[:, None, None] * eye - A).amin(dim=-1)


def _sigma_min_large(A: torch.Tensor, z: torch.Tensor, iters: int = 25) -> torch.Tensor:
    m = A.shape[-1]
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(z.shape[0], dtype=torch.float64)
    for i, zi in enumerate(z):
        lu, piv = torch.linalg.lu_factor(zi * eye - A)
        v = torch.randn(m, 1, generator=gen, dtype=torch.float64).to(A.dtype)
        v = v / torch.linalg.vector_norm(v)
        norm = torch.tensor(0.0, dtype=torch.float64)
        for _ in range(iters):  # power iteration on (zI-A)^{-H}(zI-A)^{-1}
            x = torch.linalg.lu_solve(lu, piv, v)
            norm = torch.linalg.vector_norm(x)
            y = torch.linalg.lu_solve(lu, piv, x / norm, adjoint=True)
            v = y / torch.linalg.vector_norm(y)
        out[i] = 1.0 / norm if norm > 0 else 0.0
    return out


def _ratio(A: torch.Tensor, log_t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    t = log_t.exp()
    z = torch.polar(1.0 + t, theta).to(A.dtype)
    smin = _sigma_min_small(A, z) if A.shape[-1] <= _SMALL else _sigma_min_large(A, z)
    return torch.where(smin > 0, t / smin.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(t, math.inf))


def kreiss_constant(
    A: torch.Tensor,
    *,
    n_angles: int | None = None,
    n_radii: int | None = None,
    refine_iters: int | None = None,
    rho_tol: float = 1e-9,
    eigenvalues: torch.Tensor | None = None,
) -> float:
    r"""Kreiss constant $\mathcal K(A) = \sup_{|z|>1}(|z|-1)\|(zI-A)^{-1}\|_2$ (Eq. 29).

    Args:
        A (`torch.Tensor` of shape `(m, m)`): real or complex square matrix (computed in float64 / complex128).
        n_angles (`int`, *optional*): angular grid size (default 48 for `m <= 64`, 12 above).
        n_radii (`int`, *optional*): radial grid size over $|z| - 1 \in [t_{\min}, 10^3]$ (default 20, or 8).
        refine_iters (`int`, *optional*): pattern-search iterations of the local refinement (default 40, or 12).
        rho_tol (`float`, *optional*, defaults to `1e-9`): $\rho(A) > 1 + $ `rho_tol` returns `inf` directly.
        eigenvalues (`torch.Tensor` of shape `(m,)`, *optional*): the eigenvalues of `A` if already known.

    Returns:
        `float`: $\mathcal K(A) \in [1, \infty]$; `inf` when $A$ has an eigenvalue outside the unit disc.

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman.koopman import kreiss_constant
    >>> kreiss_constant(torch.diag(torch.tensor([0.5, -0.9])))  # normal, rho <= 1
    1.0
    ```
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"A must be a non-empty square matrix (m, m), got shape {tuple(A.shape)}")
    if not (bool(torch.isfinite(A.sum())) or bool(torch.isfinite(A).all())):  # one sum first: NaN/Inf propagate
        raise ValueError("A contains NaN/Inf; the Kreiss constant is undefined")
    A = A.detach().to(torch.complex128 if A.is_complex() else torch.float64)
    real = not A.is_complex()
    m = A.shape[0]
    small = m <= _SMALL
    n_angles = n_angles or (48 if small else 12)
    n_radii = n_radii or (20 if small else 8)
    refine_iters = refine_iters if refine_iters is not None else (40 if small else 12)

    lam = torch.linalg.eigvals(A) if eigenvalues is None else eigenvalues.detach().to(torch.complex128)
    rho = float(lam.abs().max())
    if rho > 1.0 + rho_tol:
        return math.inf
    Ac = A.to(torch.complex128)

    # grid: t = |z| - 1 log-spaced; angles uniform (half circle for real A) plus those of the leading eigenvalues
    t_min = max(min(1e-6, 0.1 * (1.0 - rho)), 1e-12) if rho < 1.0 else 1e-6
    log_t = torch.linspace(math.log(t_min), math.log(1e3), n_radii, dtype=torch.float64)
    span = math.pi if real else 2 * math.pi
    if real:
        angles = torch.linspace(0.0, math.pi, max(n_angles, 2), dtype=torch.float64)
    else:
        angles = torch.linspace(0.0, 2 * math.pi, n_angles + 1, dtype=torch.float64)[:-1]
    lead = lam[torch.argsort(lam.abs(), descending=True)[: min(m, 8)]].angle().to(torch.float64)
    if real:
        lead = lead.abs()
    angles = torch.cat([angles, lead]).unique()
    grid_t, grid_a = torch.meshgrid(log_t, angles, indexing="ij")
    grid_t, grid_a = grid_t.reshape(-1), grid_a.reshape(-1)
    values = _ratio(Ac, grid_t, grid_a)
    best = float(values.max())
    if math.isinf(best):
        return math.inf

    # local refinement from the best grid points: pattern search in (log t, theta), steps halve on failure
    d_lt = float(log_t[1] - log_t[0]) if n_radii > 1 else 1.0
    d_a = span / max(n_angles, 1)
    starts = torch.argsort(values, descending=True)[: (3 if small else 1)]
    for s in starts.tolist():
        cur_t, cur_a, cur_v = float(grid_t[s]), float(grid_a[s]), float(values[s])
        step_t, step_a = d_lt, d_a
        for _ in range(refine_iters):
            cand_t = torch.tensor([cur_t + step_t, cur_t - step_t, cur_t, cur_t], dtype=torch.float64)
            cand_a = torch.tensor([cur_a, cur_a, cur_a + step_a, cur_a - step_a], dtype=torch.float64)
            cand_t = cand_t.clamp(max=math.log(1e6))
            vals = _ratio(Ac, cand_t, cand_a)
            j = int(vals.argmax())
            if float(vals[j]) > cur_v:
                cur_t, cur_a, cur_v = float(cand_t[j]), float(cand_a[j]), float(vals[j])
            else:
                step_t, step_a = step_t / 2, step_a / 2
            if math.isinf(cur_v):
                return math.inf
        best = max(best, cur_v)
    return max(1.0, best)
