r"""Koopman spectral features of one whitened-DMD fit (RKSP Definition 1, Eqs. 5, 10-13, 29).

Per layer: spectral masses $M_{\approx 1}, M_{>1}, M_{<1}, M_{mid}$ (Eqs. 11-13), spectral radius $\rho$, eigenvector
condition number $\kappa(V)$ (unit-norm eigenvectors), nonlinearity ratio $\eta_{nl}$ (Eq. 5), Kreiss constant
(Eq. 29), the number of modes and of ResDMD-reliable modes (Eq. 10, left eigenvectors, $\tau = 0.1$), and a
`degenerate` flag for a ~zero update (Fixup / ReZero at init, App. J).

Choices where the paper is silent (each one covered by the test suite):

* Masses are computed over **all identifiable modes** by default (`reliable_only=False`), as for the paper's headline
  numbers; `reliable_only=True` counts only modes that pass the ResDMD filter. Modes in the null space of $\tilde X$
  (rank-limited data, `N < d` or constant features), which the pseudo-inverse sets to $\lambda = 0$, are never counted.
  When no mode is left to count, all four masses are 0.
* $\rho$ is over the counted modes; $\kappa(V)$ is over all `m` modes of the operator.
* ResDMD: $r_j = \|u_j^*(\tilde Y - \lambda_j\tilde X)\|_2 / (\|u_j^*\tilde X\|_2 + \varepsilon_r)$ with
  $\varepsilon_r = 10^{-12}$ (relative: the snapshots are whitened). For rank-r DMD the residual is evaluated in the
  retained subspace, i.e. for the lifted left vector $U_r u_j$, which is exactly the full-space residual of that vector.
* $\eta_{nl} = \|\tilde Y - \hat A\tilde X\|_F / (\|\tilde Y - \tilde X\|_F + \varepsilon_{nl}\|\tilde X\|_F)$ with
  $\varepsilon_{nl} = 10^{-8}$, so a zero update gives a finite value (0 when the fit is exact), never inf/NaN. For
  rank-r DMD both norms are taken in the retained r-dimensional subspace (the discarded directions are not modelled).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from .dmd import DMDResult, _condition, _inverse, _single_thread, _whitened_quads
from .kreiss import kreiss_constant

__all__ = ["FEATURE_NAMES", "NEAR_BAND", "CONTRACTIVE_BELOW", "LayerFeatures", "spectral_features", "resdmd_residuals",
           "eigvec_condition", "nonlinearity_ratio", "spectral_masses"]

FEATURE_NAMES: tuple[str, ...] = (
    "near_unit_mass",
    "unstable_mass",
    "contractive_mass",
    "mid_mass",
    "spectral_radius",
    "eigvec_condition",
    "nonlinearity",
    "kreiss",
)

#: the near-unit band $[1-\epsilon_n, 1+\epsilon_u]$ of Definition 1 (the paper's values), shared by the profile's
#: masses, its report and plots, and KSS's band `[tau_l, tau_u]`
NEAR_BAND: tuple[float, float] = (0.90, 1.05)
#: $1 - \delta_c$: modes below this modulus count as contractive (Eq. 13)
CONTRACTIVE_BELOW: float = 0.80

_SMALL = 64


@dataclass
class LayerFeatures:
    r"""Spectral features of one layer transition $h_\ell \to h_{\ell+1}$ (Python scalars).

    Attributes:
        near_unit_mass (`float`): $M_{\approx 1}$, fraction of modes with $0.90 \le |\lambda| \le 1.05$ (Eq. 12).
        unstable_mass (`float`): $M_{>1}$, fraction with $|\lambda| > 1.05$ (Eq. 11).
        contractive_mass (`float`): $M_{<1}$, fraction with $|\lambda| < 0.80$ (Eq. 13).
        mid_mass (`float`): $1 - M_{>1} - M_{\approx 1} - M_{<1}$, i.e. $0.80 \le |\lambda| < 0.90$.
        spectral_radius (`float`): $\rho = \max_j |\lambda_j|$.
        eigvec_condition (`float`): $\kappa(V) = \|V\|_2\|V^{-1}\|_2$ with unit-norm eigenvectors (`inf` if singular).
        nonlinearity (`float`): $\eta_{nl}$ (Eq. 5).
        kreiss (`float`): Kreiss constant of the operator (Eq. 29), `inf` when $\rho > 1$.
        n_modes (`int`): number of counted (identifiable) modes.
        n_reliable (`int`): how many of them pass the ResDMD filter $r_j \le \tau$.
        degenerate (`bool`): the update is ~0 (Y ~ X); the other numbers are then uninformative.
    """

    near_unit_mass: float
    unstable_mass: float
    contractive_mass: float
    mid_mass: float
    spectral_radius: float
    eigvec_condition: float
    nonlinearity: float
    kreiss: float
    n_modes: int
    n_reliable: int
    degenerate: bool

    FIELDS: ClassVar[tuple[str, ...]] = FEATURE_NAMES

    def to_dict(self) -> dict[str, float | int | bool]:
        """Plain dict of all fields (JSON-friendly apart from `inf`, which `json` writes as `Infinity`)."""
        return asdict(self)


def resdmd_residuals(result: DMDResult, eps_residual: float = 1e-12) -> torch.Tensor:
    r"""ResDMD residual of every mode (Eq. 10), from the left eigenvectors and the whitened second moments.

    $$r_j = \frac{\|u_j^*(\tilde Y - \lambda_j \tilde X)\|_2}{\|u_j^*\tilde X\|_2 + \varepsilon_r},\qquad
    \tilde Y - \lambda\tilde X = \tilde D + (1-\lambda)\tilde X$$

    For the full spectrum the quadratic forms $u^* G u$ come from the unwhitened moments, computed by [`whitened_dmd`]
    while it inverts the eigenvectors (`dmd._left_quads`): the same numbers without forming the whitened Grams. A
    result whose eigenvectors were left out (`keep_eigenvectors=False`) carries those forms for every path.

    Returns:
        `torch.Tensor` of shape `(..., m)`, float64, in the order of `result.eigenvalues`.
    """
    u = result.left_eigenvectors
    lam = result.eigenvalues.to(torch.complex128)
    mu = 1.0 - lam
    if result.moments.quads is not None:
        q_dd, q_dx, q_xx = result.moments.quads
    elif u is not None and not result.moments.is_raw:
        q_dd, q_dx, q_xx = _whitened_quads(u, result.moments)
    else:
        raise ValueError("resdmd_residuals needs the left eigenvectors; call whitened_dmd with eigenvectors=True "
                         "and left_eigenvectors=True (the defaults)")
    mu = mu.to(q_dx.dtype)
    num = (q_dd + 2.0 * (mu.conj() * q_dx).real + mu.abs() ** 2 * q_xx).clamp_min(0.0).sqrt()
    den = q_xx.clamp_min(0.0).sqrt() + eps_residual
    return (num / den).to(torch.float64)


def eigvec_condition(eigenvectors: torch.Tensor) -> float:
    r"""$\kappa(V) = \|V\|_2 \|V^{-1}\|_2$ of one `(m, m)` eigenvector matrix (columns normalised to unit norm first).

    The same computation [`whitened_dmd`] stores as `DMDResult.eigvec_condition`: exact singular values up to 256
    modes, block power iterations on $V$ and its inverse above. Returns `inf` for a numerically singular $V$.
    """
    V = eigenvectors.to(torch.complex128)
    V = V / torch.linalg.vector_norm(V, dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    value = float(_condition(V, _inverse(V)))
    return value if math.isfinite(value) else math.inf


def nonlinearity_ratio(result: DMDResult, eps_nl: float = 1e-8) -> torch.Tensor:
    r"""$\eta_{nl} = \|\tilde Y - \hat A\tilde X\|_F / (\|\tilde Y - \tilde X\|_F + \varepsilon_{nl}\|\tilde X\|_F)$
    (Eq. 5).

    Computed from the second moments: with $F = \hat A - I$ the residual is $\tilde D - F\tilde X$, so
    $\|\cdot\|_F^2 \propto \mathrm{tr}(G_{dd} - F G_{xd} - G_{dx}F^\top + F G_{xx} F^\top)$, which is
    $\mathrm{tr}\,G_{dd} - \mathrm{tr}(G_{dx}G_{xx}^{-1}G_{xd})$ for the full-rank full spectrum (traces kept by
    [`whitened_dmd`]). Returns `(...,)` float64.
    """
    if result.moments.is_raw:  # full rank: F = G_dx G_xx^-1, so the trace is tr(G_dd) - tr(G_dx G_xx^-1 G_xd)
        tr_xx, tr_dd, tr_fit = result.moments.traces
        res = tr_dd - tr_fit
    else:
        F = result.operator - torch.eye(result.rank, dtype=result.operator.dtype, device=result.operator.device)
        gxx, gdx, gdd = result.gram_xx, result.gram_dx, result.gram_dd
        tr = lambda a: torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        # tr(A B^T) = sum(A * B): one (m, m) product instead of three
        res = tr(gdd) - 2.0 * (F * gdx).sum((-2, -1)) + ((F @ gxx) * F).sum((-2, -1))
        tr_xx, tr_dd = tr(gxx), tr(gdd)
    num = res.clamp_min(0.0).sqrt()
    den = tr_dd.clamp_min(0.0).sqrt() + eps_nl * tr_xx.clamp_min(0.0).sqrt()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))


def spectral_masses(
    moduli: torch.Tensor, near_band: tuple[float, float] = NEAR_BAND, contractive_below: float = CONTRACTIVE_BELOW
) -> tuple[float, float, float, float]:
    r"""$(M_{\approx1}, M_{>1}, M_{<1}, M_{mid})$ of a 1-D tensor of $|\lambda|$ (Eqs. 11-13); all 0 if it is empty.

    The four counts partition the modes, so the masses sum to exactly 1 (when non-empty).
    """
    lo, hi = near_band
    n = moduli.numel()
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    unstable = int((moduli > hi).sum())
    near = int(((moduli >= lo) & (moduli <= hi)).sum())
    contractive = int((moduli < contractive_below).sum())
    mid = n - unstable - near - contractive
    return near / n, unstable / n, contractive / n, mid / n


def _check_thresholds(near_band, contractive_below, residual_tol) -> None:
    if not (isinstance(near_band, (tuple, list)) and len(near_band) == 2):
        raise ValueError(f"near_band={near_band!r} must be a pair (low, high), e.g. (0.90, 1.05)")
    lo, hi = (float(v) for v in near_band)
    if not 0.0 <= contractive_below <= lo <= hi:
        raise ValueError(f"need 0 <= contractive_below ({contractive_below}) <= near_band[0] ({lo}) <= near_band[1] "
                         f"({hi}); the paper uses contractive_below=0.80, near_band=(0.90, 1.05)")
    if not residual_tol > 0:
        raise ValueError(f"residual_tol={residual_tol!r} must be > 0 (the paper uses 0.1)")


def spectral_features(
    result: DMDResult,
    *,
    near_band: tuple[float, float] = NEAR_BAND,
    contractive_below: float = CONTRACTIVE_BELOW,
    residual_tol: float = 0.1,
    reliable_only: bool = False,
    degenerate_tol: float | None = None,
    compute_kreiss: bool = True,
    eps_residual: float = 1e-12,
    eps_nl: float = 1e-8,
) -> LayerFeatures | list[LayerFeatures]:
    r"""Per-layer Koopman spectral features of a [`DMDResult`] (RKSP Algorithm 1, line 9).

    Args:
        result ([`DMDResult`]): output of [`whitened_dmd`], unbatched or batched `(L, ...)`.
        near_band (`tuple[float, float]`, *optional*, defaults to `(0.90, 1.05)`): $[1-\epsilon_n, 1+\epsilon_u]$; above
            the upper edge a mode counts as unstable.
        contractive_below (`float`, *optional*, defaults to `0.80`): $1 - \delta_c$; below it a mode is contractive.
        residual_tol (`float`, *optional*, defaults to `0.1`): ResDMD threshold $\tau$; modes with $r_j > \tau$ are
            spurious.
        reliable_only (`bool`, *optional*, defaults to `False`): compute masses and $\rho$ over reliable modes only
            (default: all identifiable modes, as the paper's headline numbers). A layer with no mode to count (none
            reliable, or no identifiable mode) gets NaN masses and $\rho$: nothing was measured, and the decision
            rule does not read it.
        degenerate_tol (`float`, *optional*): re-flag degeneracy with this relative-update threshold instead of the
            one used in [`whitened_dmd`] (default `1e-4` there).
        compute_kreiss (`bool`, *optional*, defaults to `True`): compute the Kreiss constant (set `False` to skip
            it when `m` is large and $\rho \le 1$; `kreiss` is then `nan`).
        eps_residual (`float`, *optional*, defaults to `1e-12`): $\varepsilon_r$ of Eq. 10.
        eps_nl (`float`, *optional*, defaults to `1e-8`): relative $\varepsilon_{nl}$ of Eq. 5.

    Returns:
        [`LayerFeatures`] for an unbatched result, `list[LayerFeatures]` (one per layer) for a batched one.
    """
    if not isinstance(result, DMDResult):
        raise TypeError(f"result must be a DMDResult from whitened_dmd, got {type(result).__name__}")
    _check_thresholds(near_band, contractive_below, residual_tol)
    if result.rank <= _SMALL:  # (m, m) work only: on a busy CPU waking the thread pool costs more than the math
        with _single_thread():
            return _features(result, near_band, contractive_below, residual_tol, reliable_only, degenerate_tol,
                             compute_kreiss, eps_residual, eps_nl)
    return _features(result, near_band, contractive_below, residual_tol, reliable_only, degenerate_tol,
                     compute_kreiss, eps_residual, eps_nl)


def _features(result, near_band, contractive_below, residual_tol, reliable_only, degenerate_tol, compute_kreiss,
              eps_residual, eps_nl):
    if result.moments.quads is None and (result.eigenvectors is None or result.left_eigenvectors is None):
        raise ValueError("spectral_features needs right and left eigenvectors (ResDMD filter, kappa(V)); call "
                         "whitened_dmd with eigenvectors=True and left_eigenvectors=True (the defaults)")
    residuals = resdmd_residuals(result, eps_residual)
    eta = nonlinearity_ratio(result, eps_nl)
    degenerate = result.degenerate if degenerate_tol is None else (
        (result.update_ratio <= degenerate_tol) | (result.rank_x == 0))
    if not result.batched:
        residuals, eta, degenerate = residuals[None], eta[None], degenerate[None]
    out = []
    for i in range(result.num_layers):
        layer = result.layer(i) if result.batched else result
        n_count = int(layer.rank_x)
        lam = layer.eigenvalues[:n_count]  # sorted by modulus: null-space modes (lambda = 0) are the tail
        res = residuals[i, :n_count]
        reliable = res <= residual_tol
        counted = lam[reliable] if reliable_only else lam
        moduli = counted.abs()
        if moduli.numel():
            near, unstable, contractive, mid = spectral_masses(moduli, near_band, contractive_below)
            rho = float(moduli.max())
        else:  # no mode counted (rank_x = 0, or reliable_only with none passing): nothing measured, not "all zero"
            near = unstable = contractive = mid = rho = math.nan
        # no identified mode (an input with no direction: rank_x = 0): the operator is round-off, and so would be the
        # numbers derived from it and its fit; NaN, which the aggregates skip
        kreiss = (kreiss_constant(layer.operator, eigenvalues=layer.eigenvalues) if compute_kreiss and n_count
                  else math.nan)
        kappa = float(layer.eigvec_condition) if n_count else math.nan
        eta_i = float(eta[i]) if n_count else math.nan  # no fit: nothing is explained or left unexplained
        out.append(LayerFeatures(
            near_unit_mass=near, unstable_mass=unstable, contractive_mass=contractive, mid_mass=mid,
            spectral_radius=rho, eigvec_condition=kappa, nonlinearity=eta_i,
            kreiss=kreiss, n_modes=n_count, n_reliable=int(reliable.sum()), degenerate=bool(degenerate[i]),
        ))
    return out if result.batched else out[0]
