"""Koopman Spectral Shaping (KSS): the differentiable spectral penalty of the paper's Sec. 3.3 (Eqs. 14-15).

Pure torch (never imports `transformers`). The training glue (`hf_koopman.training.KSSTrainer`) captures the residual
stream entering and leaving a block during the ordinary training forward pass, calls
[`differentiable_dmd_eigenvalues`] on those snapshots and adds `alpha * kss_penalty(...)` to the task loss.

Design choices where the paper is silent (each one covered by the test suite):

* **Operator.** The RKSP operator itself (`hf_koopman.koopman.dmd._fit_operator`, the code `whitened_dmd` uses):
  both snapshot matrices centred on their own mean, whitened with the Cholesky factor of `Sigma_X + eps I` (a
  rotation of the paper's ZCA), `A = (Gxx + Gdx) Gxx^+` (Eq. 6). By default all identifiable modes (the full
  spectrum, as the profile); `rank=r` uses the profile's rank-r approximation (the same range finder on the whitened
  outputs and the same projected operator). For equal snapshots and settings the eigenvalues equal the profile's, so
  the penalty shapes exactly the spectrum that `RKSPCallback` reports (tested).
* **What is detached, and why.** The coordinates are computed from detached snapshots: the whitening `W`, the
  row-space basis (when `N - 1 < d`), the rank-r subspace, and the input Gram `Gxx` (about `I` after whitening);
  gradients flow through the cross moment `Gdx = W Sdx W^T` of the update and the input, i.e. through what the block
  does to its input.
  - `W`, `Gxx`: differentiating the inverse square root (or Cholesky factor) of a d x d covariance costs another
    `O(d^3)` and is ill-conditioned for the nearly singular covariances seen at initialisation. KSS shapes the
    *transition* `h_l -> h_{l+1}`, not the input covariance; with the input geometry fixed, the gradient asks the
    block to shrink (or rotate) its output, which is the intended effect.
  - The rank-r subspace: for an invariant subspace, first-order changes of the Ritz values do not depend on the change
    of the basis (Rayleigh-Ritz is stationary), so detaching it drops only a second-order term.
* **Fewer samples than features (N - 1 < d).** As in the profile, X and Y are first expressed in an orthonormal
  basis of the row space of the centred X; the null-space modes (`lambda = 0`) are dropped from the output, as the
  profile does not count them. Typical for large models: d = 4096 with N = 2048 token states per micro-batch.
* **Guards.** The r x r eigendecomposition runs in float64. A layer whose operator is non-finite, or whose eigenvector
  basis has a condition number above `max_condition` (near-defective: the `eig` backward `V^{-H} diag(g) V^H` would
  blow up), raises [`SpectralShapingError`]; the trainer skips that layer with a logged warning. A backward hook on the
  operator replaces any non-finite gradient by zero and logs a warning, so the penalty can never turn the parameter
  gradients NaN. `|lambda|` is computed as `sqrt(re^2 + im^2 + tiny)` so the gradient is defined at `lambda = 0`.
* **Gradient scale.** Eq. 14 as written has a large gradient even for a healthy spectrum: `softplus(x)^2` is
  `(ln 2)^2` at `x = 0`, so a mode at `|lambda| = 1` costs `sigma(-1) * softplus(-0.05)^2 ≈ 0.12` with slope `≈ 1.9`,
  and the unstable term is a *sum* over the modes. On a No-Norm GPT at initialisation the parameter gradient of
  `0.15 * L_KSS` is about 100x the task gradient on the rank-32 operator (`results/kss_gradient_scale.md`).
  The trainer therefore caps the size of the KSS gradient relative to the task gradient
  (`KSSConfig.max_grad_ratio`, default 0.5, direction unchanged; `None` gives the paper-literal gradient); the
  default `grad_cap="activations"` measures both norms on the residual stream inside the ordinary backward pass.
* **beta.** The paper gives no default for the near-unit weight. `beta = 10` puts a No-Norm-like spectrum
  (`m_soft` ≈ 0.8, target 0.4, term 1.6) on the scale of a spectrum with a few clearly expanding modes, so neither
  term of the ablation (Table 6) is negligible.
"""

from __future__ import annotations

import torch

from hf_koopman.koopman.features import NEAR_BAND
from hf_koopman.logging_utils import get_logger


__all__ = [
    "DEFAULT_BETA",
    "SpectralShapingError",
    "differentiable_dmd_eigenvalues",
    "eigenvalue_modulus",
    "kss_penalty",
    "soft_near_unit_mass",
]

logger = get_logger(__name__)

#: Weight of the near-unit target term of Eq. 14 (the paper gives none; see the module docstring for the reasoning).
DEFAULT_BETA = 10.0


class SpectralShapingError(ValueError):
    """The differentiable DMD of one or more layers failed (non-finite or near-defective operator, or no identifiable
    mode: an input that does not vary across its token states).

    `layers` lists the offending indices along the leading batch dimension (`[0]` for an unbatched call).
    """

    def __init__(self, message: str, layers: list[int] | None = None) -> None:
        super().__init__(message)
        self.layers = list(layers or [0])


def eigenvalue_modulus(eigenvalues: torch.Tensor, *, tiny: float = 1e-12) -> torch.Tensor:
    """`|lambda|` with a gradient that is defined everywhere (`sqrt(re^2 + im^2 + tiny)`), real tensors accepted."""
    if eigenvalues.is_complex():
        sq = eigenvalues.real.square() + eigenvalues.imag.square()
    else:
        sq = eigenvalues.square()
    return torch.sqrt(sq + tiny)


def _check_band(temperature: float, tau_l: float, tau_u: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not tau_l < tau_u:
        raise ValueError(f"the near-unit band needs tau_l < tau_u, got tau_l={tau_l}, tau_u={tau_u}")


def soft_near_unit_mass(
    eigenvalues: torch.Tensor,
    *,
    temperature: float = 20.0,
    tau_l: float = NEAR_BAND[0],
    tau_u: float = NEAR_BAND[1],
) -> torch.Tensor:
    """Soft near-unit mass `m_soft` of Eq. 15, a differentiable stand-in for `M_{≈1}` (Eq. 12).

    Args:
        eigenvalues (`torch.Tensor` of shape `(..., r)`, complex or real): eigenvalues of one or more operators.
        temperature (`float`, defaults to `20.0`): sigmoid sharpness `T`.
        tau_l (`float`, defaults to `0.90`): lower edge of the near-unit band `[tau_l, tau_u]`.
        tau_u (`float`, defaults to `1.05`): upper edge of the near-unit band.

    Returns:
        `torch.Tensor` of shape `(...)`: `mean_j sigma(T(|lambda_j| - tau_l)) * sigma(T(tau_u - |lambda_j|))`.
    """
    _check_band(temperature, tau_l, tau_u)
    if eigenvalues.shape[-1] == 0:
        raise ValueError("soft_near_unit_mass needs at least one eigenvalue (last dimension is empty)")
    mod = eigenvalue_modulus(eigenvalues)
    inside = torch.sigmoid(temperature * (mod - tau_l)) * torch.sigmoid(temperature * (tau_u - mod))  # Eq. 15
    return inside.mean(dim=-1)


def kss_penalty(
    eigenvalues: torch.Tensor,
    *,
    temperature: float = 20.0,
    tau_u: float = NEAR_BAND[1],
    tau_l: float = NEAR_BAND[0],
    gamma: float = 0.4,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Per-operator KSS penalty `L_KSS` of Eq. 14.

    `sum_j sigma(T(|lambda_j| - tau_u)) * softplus(|lambda_j| - tau_u)^2 + beta * (m_soft - gamma)^2`; the unstable
    term is a **sum** over the r modes (as in the paper), the near-unit mass `m_soft` (Eq. 15) a mean.

    Args:
        eigenvalues (`torch.Tensor` of shape `(..., r)`, complex or real): e.g. from [`differentiable_dmd_eigenvalues`].
        temperature (`float`, defaults to `20.0`): `T`.
        tau_u (`float`, defaults to `1.05`): upper edge of the near-unit band; modes above it are penalised.
        tau_l (`float`, defaults to `0.90`): lower edge of the near-unit band.
        gamma (`float`, defaults to `0.4`): target near-unit mass (the paper uses a value in `[0.3, 0.5]`).
        beta (`float`, defaults to `DEFAULT_BETA` = `10.0`): weight of the near-unit target term (paper: unspecified).

    Returns:
        `torch.Tensor` of shape `(...)`, differentiable with respect to the eigenvalues.
    """
    _check_band(temperature, tau_l, tau_u)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma is a target mass and must lie in [0, 1], got {gamma}")
    mod = eigenvalue_modulus(eigenvalues)
    excess = mod - tau_u
    unstable = (torch.sigmoid(temperature * excess) * torch.nn.functional.softplus(excess).square()).sum(dim=-1)
    m_soft = soft_near_unit_mass(eigenvalues, temperature=temperature, tau_l=tau_l, tau_u=tau_u)
    return unstable + beta * (m_soft - gamma).square()  # Eq. 14


def _sanitize_grad(grad: torch.Tensor) -> torch.Tensor:
    if torch.isfinite(grad).all():
        return grad
    logger.warning(
        "KSS: non-finite gradient through the r x r DMD operator (near-degenerate eigenvalues); "
        "the offending entries were zeroed so the parameter gradients stay finite."
    )
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def differentiable_dmd_eigenvalues(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    rank: int | None = None,
    eps: float = 1e-5,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    max_condition: float = 1e8,
) -> torch.Tensor:
    """Eigenvalues of the RKSP whitened DMD operator, differentiable with respect to the snapshots.

    The operator is the profile's (`hf_koopman.koopman.dmd._fit_operator`): for the same snapshots and settings these
    eigenvalues equal `whitened_dmd(X, Y, rank=rank, randomized=rank is not None).eigenvalues` (identifiable modes), so
    `kss/near_unit_mass` and the profile's `near_unit_mass` are one estimator.

    Args:
        X (`torch.Tensor` of shape `(N, d)` or `(L, N, d)`): token states entering a block (rows are samples).
        Y (`torch.Tensor`, same shape as `X`): the same tokens leaving the block.
        rank (`int`, *optional*): `None` (default) for the full spectrum; `r` for the rank-r randomized
            approximation (clipped to `min(d, N - 1)`).
        eps (`float`, defaults to `1e-5`): ridge added to the covariance of X before whitening (Eq. 9).
        oversample (`int`, defaults to `10`): oversampling of the rank-r path's range finder.
        power_iters (`int`, defaults to `2`): power iterations of the rank-r path's range finder.
        generator (`torch.Generator`, *optional*): seeds the range finder's sketch (drawn on the
            generator's device, then moved to X's: a CPU generator gives the same sketch on any device).
        max_condition (`float`, defaults to `1e8`): largest eigenvector-basis condition number accepted; beyond it the
            eig backward is unreliable and the layer is rejected.

    Returns:
        `torch.Tensor` of shape `(m,)` or `(L, m)`, complex128, sorted by decreasing modulus, `m` = the number of
        identifiable modes (the smallest over the layers); gradients flow to `X` and `Y` (see the module docstring
        for what is detached).

    Raises:
        TypeError: non-tensor or non-real inputs.
        ValueError: bad shapes or non-finite snapshots.
        SpectralShapingError: (a `ValueError`) the operator of one or more layers is non-finite or near-defective
            (`.layers` lists them).
    """
    from hf_koopman.koopman.dmd import _fit_operator, _operator_from_grams

    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError(f"X and Y must be torch tensors, got {type(X).__name__} and {type(Y).__name__}")
    if X.shape != Y.shape or X.dim() not in (2, 3):
        raise ValueError(
            f"X and Y must share a shape (N, d) or (L, N, d); got {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    if X.is_complex() or not X.is_floating_point():
        raise TypeError(f"X and Y must be real floating tensors, got {X.dtype}")
    unbatched = X.dim() == 2
    if unbatched:
        X, Y = X.unsqueeze(0), Y.unsqueeze(0)
    n, d = X.shape[-2], X.shape[-1]
    if n < 2:
        raise ValueError(f"differentiable DMD needs at least 2 snapshots (rows), got N={n}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None (full spectrum), got {rank}")
    bad = ~(torch.isfinite(X.detach()).flatten(1).all(1) & torch.isfinite(Y.detach()).flatten(1).all(1))
    if bad.any():
        raise ValueError(f"non-finite snapshots for layer indices {bad.nonzero().flatten().tolist()}")
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    if rank is not None:
        rank = min(rank, d, n - 1)
    with torch.no_grad():  # the coordinates (whitening, row space, rank-r subspace) are fixed: module docstring
        _, moments, rank_x = _fit_operator(
            X.detach().to(work), Y.detach().to(work), rank=rank, randomized=rank is not None, eps=eps,
            oversample=oversample, power_iters=power_iters, generator=generator)
        gxx0, proj = moments.gram("xx"), moments.projection()
        values, vectors = torch.linalg.eigh(gxx0)
        keep = torch.arange(values.shape[-1], device=values.device).flip(0) < rank_x[..., None]  # eigh: ascending
    # an input whose rows are all the same (learned query tokens still at their all-zero initialisation) has no
    # spectrum: its rank is 0, or a rounding-noise 1 from centring that would cut the other layers' modes to one
    with torch.no_grad():
        flat_rows = (X.detach() == X.detach()[:, :1]).flatten(1).all(1)
    flat = ((rank_x.reshape(-1) == 0) | flat_rows).nonzero().flatten().tolist()
    if flat:
        raise SpectralShapingError(
            f"no identifiable mode for layer indices {flat}: the input does not vary across its token states "
            "(centred rank 0), so there is no spectrum to shape",
            layers=flat,
        )
    P = proj.to(work)
    Xc = X.to(work) - X.to(work).mean(dim=-2, keepdim=True)
    Dc = Y.to(work) - X.to(work)
    Dc = Dc - Dc.mean(dim=-2, keepdim=True)
    bx, bd = Xc @ P, Dc @ P  # snapshots in the profile's whitened coordinates, (L, N, m)
    gdx = (bd.mT @ bx).to(torch.float64) / (n - 1)
    # A = (Gxx + Gdx) Gxx^+ (Eq. 6) with the input Gram frozen: the pseudo-inverse comes from the detached eigh
    op = _operator_from_grams(gxx0, gdx, keep, values, vectors)
    if op.requires_grad:
        op.register_hook(_sanitize_grad)

    finite = torch.isfinite(op.detach()).flatten(1).all(1)
    if not finite.all():
        raise SpectralShapingError(
            f"non-finite DMD operator for layer indices {(~finite).nonzero().flatten().tolist()}",
            layers=(~finite).nonzero().flatten().tolist(),
        )
    eigenvalues, eigenvectors = torch.linalg.eig(op)  # backward uses V^{-H} diag(g) V^H (eigenvalues only)
    with torch.no_grad():
        cond = torch.linalg.cond(eigenvectors)
        ok = torch.isfinite(cond) & (cond <= max_condition) & torch.isfinite(eigenvalues).all(-1)
    if not ok.all():
        idx = (~ok).nonzero().flatten().tolist()
        raise SpectralShapingError(
            f"near-defective DMD operator for layer indices {idx} (eigenvector condition "
            f"{[float(c) for c in cond[~ok]]} > max_condition={max_condition:g}); "
            "its eigenvalue gradient is unreliable",
            layers=idx,
        )
    order = torch.argsort(eigenvalues.detach().abs(), dim=-1, descending=True, stable=True)
    eigenvalues = torch.gather(eigenvalues, -1, order)[..., : int(rank_x.min())]  # null-space modes (lambda = 0) last
    return eigenvalues[0] if unbatched else eigenvalues
