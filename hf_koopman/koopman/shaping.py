"""Koopman Spectral Shaping (KSS): the differentiable spectral penalty of the paper's Sec. 3.3 (Eqs. 14-15).

Pure torch (never imports `transformers`). The training glue (`hf_koopman.training.KSSTrainer`) captures the residual
stream entering and leaving a block during the ordinary training forward pass, calls
[`differentiable_dmd_eigenvalues`] on those snapshots and adds `alpha * kss_penalty(...)` to the task loss.

Design choices where the paper is silent (documented here and tested in `tests/koopman/test_shaping.py`):

* **Operator.** Whitened DMD as in RKSP (Eqs. 6-9): both snapshot matrices are centred on their own mean and whitened
  with the ZCA matrix `W = (Sigma_X + eps I)^(-1/2)` of X. The full operator is the whitened cross-covariance
  `A = W C_yx W` with `C_yx = Yc^T Xc / (N - 1)`; it equals the least-squares operator `Y~ X~^+` of Eq. 6 up to
  `O(eps / sigma_min(Sigma_X))` and stays defined when X is rank deficient (N < d).
* **Rank r (randomized, Rayleigh-Ritz).** A randomized range finder (oversampling + power iterations) gives an
  orthonormal basis `Q` (d, r) of the dominant range of `A`; the eigenvalues of the r x r operator `Q^T A Q` are used.
  `Q^T A Q = (Yc P)^T (Xc P) / (N - 1)` with `P = W Q`, so the graph costs `O(N d r)` and no d x d matrix is formed
  inside autograd.
* **What is detached, and why.** `W` (the whitening matrix) and `Q` (the range-finder basis) are computed from detached
  snapshots; gradients flow through `Xc` and `Yc` in the small operator only.
  - `W`: differentiating the inverse square root of a d x d covariance costs another `O(d^3)` and is ill-conditioned
    for the nearly singular covariances seen at initialisation (the backward of `eigh` divides by eigenvalue gaps).
    KSS shapes the *transition* `h_l -> h_{l+1}`, not the input covariance; with `W` fixed, the gradient asks the block
    to shrink (or rotate) its output relative to a frozen input geometry, which is the intended effect.
  - `Q`: for an invariant subspace, first-order changes of the Ritz values do not depend on the change of the basis
    (Rayleigh-Ritz is stationary), so detaching `Q` drops only a second-order term, and it keeps the random sketch
    (and its QR factorisation) out of the graph.
* **Fewer samples than features (N - 1 < d).** As in the profiling core (`hf_koopman.koopman.dmd`,
  `_row_space_coordinates`), X and Y are first expressed in an orthonormal basis `V` (d, N) of the row space of the
  centred X (detached, like `W`): `Xc V`, `Yc V` are (N, N). Without it the ridge-whitening multiplies the directions
  X never visits by `eps^(-1/2)`; the part of Y there dominates the range of `A`, the Rayleigh-Ritz operator is ~0 on
  it (X has no component to map), and most of the r eigenvalues become spurious zeros that the near-unit term then
  tries to "fix". Typical for large models: d = 4096 with N = 2048 token states per micro-batch.
* **Guards.** The r x r eigendecomposition runs in float64. A layer whose operator is non-finite, or whose eigenvector
  basis has a condition number above `max_condition` (near-defective: the `eig` backward `V^{-H} diag(g) V^H` would
  blow up), raises [`SpectralShapingError`]; the trainer skips that layer with a logged warning. A backward hook on the
  operator replaces any non-finite gradient by zero and logs a warning, so the penalty can never turn the parameter
  gradients NaN. `|lambda|` is computed as `sqrt(re^2 + im^2 + tiny)` so the gradient is defined at `lambda = 0`.
* **Gradient scale (measured; `results/kss_gradient_scale.md`).** Eq. 14 as written has a large gradient even for a
  healthy spectrum: `softplus(x)^2` is `(ln 2)^2` at `x = 0`, so a mode at `|lambda| = 1` (inside the band) costs
  `sigma(-1) * softplus(-0.05)^2 ≈ 0.12` with slope `≈ 1.9` per unit `|lambda|`, and the term is a *sum* over r = 32
  modes: `||dL/dlambda|| ≈ 8.4` per layer for the all-`|lambda|≈1` No-Norm spectrum at init, and the unstable term
  carries ~10x the gradient of the near-unit term. The eig backward is not the cause there
  (`||dL/dop|| ≈ ||dL/dlambda||`, `kappa(V)` 30-110); later in training the whitening of small-variance directions and
  `kappa(V)` up to ~230 amplify it another 2-10x. With alpha = 0.15 the parameter gradient of the KSS term is ~100x
  the task gradient at step 0 on a No-Norm GPT (10.4 vs 0.10) and reaches 10^3-10^4 later, which is the gradient
  spike that labels those runs diverged. The value of Eqs. 14-15 is therefore kept, and the **trainer caps the size
  of its gradient** relative to the task gradient (`KSSConfig.max_grad_ratio`, default 0.5:
  `||grad alpha L_KSS|| <= ratio * ||grad L_task||`, direction unchanged). 0.5 is the largest measured cap that did
  not raise the divergence rate above the control (No-Norm prevention check, 24 trials: raw 24/24 diverged, cap 1.0
  9/24, cap 0.5 5/24, cap 0.25 5/24, control 5/24) while still moving the spectrum (M≈1 after training 0.61 vs
  0.79). A relative ridge does not help at init (the ridge is already ~1% of the mean covariance eigenvalue) and only
  a large one (1e-2 tr(Sigma)/d) tames the later spikes, at the price of changing the spectrum being shaped; the cap
  is scale-free, leaves the eigenvalues as they are, and is measured to remove the KSS-step spikes.
  `max_grad_ratio=None` restores the paper-literal gradient. Measuring the two norms over the parameters costs an extra
  partial backward pass (+5 % step time); the default `KSSConfig.grad_cap = "activations"` measures them on the
  residual stream inside the ordinary backward instead (+0.8 %, `results/bench_kss.md`), with the same 24-trial
  check at least as good (`results/kss_gradient_scale.md` section 6).
* **beta.** The paper gives no default for the near-unit weight. We use `beta = 10`: with r = 32 modes the unstable
  sum of Eq. 14 is ~0.02 r ≈ 0.6 for a healthy contractive spectrum and O(r) once modes expand, while `(m_soft - gamma)^2`
  is at most ~0.36; `beta = 10` puts a No-Norm-like spectrum (`m_soft` ≈ 0.8, target 0.4, term 1.6) on the same scale as a
  spectrum with 3-4 clearly expanding modes, so neither term of the ablation (Table 6) is negligible.
"""

from __future__ import annotations

import logging

import torch

from hf_koopman.koopman.dmd import _row_space_coordinates


__all__ = [
    "DEFAULT_BETA",
    "SpectralShapingError",
    "differentiable_dmd_eigenvalues",
    "eigenvalue_modulus",
    "kss_penalty",
    "soft_near_unit_mass",
]

logger = logging.getLogger(__name__)

#: Weight of the near-unit target term of Eq. 14 (the paper gives none; see the module docstring for the reasoning).
DEFAULT_BETA = 10.0


class SpectralShapingError(ValueError):
    """The differentiable DMD of one or more layers failed (non-finite or near-defective operator).

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
    tau_l: float = 0.90,
    tau_u: float = 1.05,
) -> torch.Tensor:
    """Soft near-unit mass `m_soft` of Eq. 15, a differentiable stand-in for `M_{≈1}` (Eq. 12).

    Args:
        eigenvalues (`torch.Tensor` of shape `(..., r)`, complex or real): eigenvalues of one or more operators.
        temperature (`float`, defaults to `20.0`): sigmoid sharpness `T`.
        tau_l / tau_u (`float`, default `0.90` / `1.05`): the near-unit band `[tau_l, tau_u]`.

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
    tau_u: float = 1.05,
    tau_l: float = 0.90,
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


def _inverse_sqrt_psd(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """`(cov + eps I)^(-1/2)` of a batch of symmetric PSD matrices `(..., d, d)` via `eigh` (float64)."""
    evals, evecs = torch.linalg.eigh(cov)
    inv_sqrt = (evals.clamp_min(0.0) + eps).rsqrt()
    return (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m, mode="reduced").Q


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
    rank: int = 32,
    eps: float = 1e-5,
    oversample: int = 10,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
    max_condition: float = 1e8,
) -> torch.Tensor:
    """Eigenvalues of the rank-r randomized whitened DMD operator, differentiable through the small r x r operator.

    Args:
        X (`torch.Tensor` of shape `(N, d)` or `(L, N, d)`): token states entering a block (rows are samples).
        Y (`torch.Tensor`, same shape as `X`): the same tokens leaving the block.
        rank (`int`, defaults to `32`): `r`; clipped to `min(d, N - 1)`.
        eps (`float`, defaults to `1e-5`): ridge added to the covariance of X before whitening (Eq. 9).
        oversample (`int`, defaults to `10`): extra columns of the random sketch.
        power_iters (`int`, defaults to `1`): power iterations of the range finder.
        generator (`torch.Generator`, *optional*): seeds the Gaussian sketch (on the device of `X`).
        max_condition (`float`, defaults to `1e8`): largest eigenvector-basis condition number accepted; beyond it the
            eig backward is unreliable and the layer is rejected.

    Returns:
        `torch.Tensor` of shape `(r,)` or `(L, r)`, complex128; gradients flow to `X` and `Y` (see the module docstring
        for what is detached).

    Raises:
        `ValueError` for bad shapes or non-finite snapshots; [`SpectralShapingError`] (a `ValueError`) when the operator
        of one or more layers is non-finite or near-defective (`.layers` lists them).
    """
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
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    bad = ~(torch.isfinite(X.detach()).flatten(1).all(1) & torch.isfinite(Y.detach()).flatten(1).all(1))
    if bad.any():
        raise ValueError(f"non-finite snapshots for layer indices {bad.nonzero().flatten().tolist()}")
    # float32 for the O(N d^2) / O(N d r) products (bf16/fp16 inputs are upcast), float64 for the small factorisations
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xc = X.to(work) - X.to(work).mean(dim=-2, keepdim=True)
    Yc = Y.to(work) - Y.to(work).mean(dim=-2, keepdim=True)
    if n - 1 < d:  # work in the row space of the centred X (module docstring); the basis is detached like W
        with torch.no_grad():
            # only the basis is used: a one-row Y keeps the helper's `Y V` product out of the cost
            _, _, basis = _row_space_coordinates(X.detach(), X.detach()[..., :1, :], work)
        basis = basis.to(work)
        Xc, Yc = Xc @ basis, Yc @ basis  # (L, N, N), differentiable in X and Y
        d = n
    r = min(rank, d, n - 1)
    k = min(r + max(oversample, 0), d)
    scale = 1.0 / (n - 1)

    with torch.no_grad():  # detached: whitening W and range-finder basis Q (see module docstring)
        xd, yd = Xc.detach(), Yc.detach()
        cov = (xd.transpose(-1, -2) @ xd).to(torch.float64) * scale  # Eq. 9, (L, d, d)
        W = _inverse_sqrt_psd(cov, eps).to(work)  # ZCA, Eqs. 7-8

        def apply_a(v: torch.Tensor) -> torch.Tensor:  # A v = W Yc^T Xc W v / (N-1), never forming A
            return W @ (yd.transpose(-1, -2) @ (xd @ (W @ v))) * scale

        def apply_at(v: torch.Tensor) -> torch.Tensor:
            return W @ (xd.transpose(-1, -2) @ (yd @ (W @ v))) * scale

        omega = torch.randn(X.shape[0], d, k, generator=generator, device=X.device, dtype=torch.float64).to(work)
        Q = _orthonormal(apply_a(omega))
        for _ in range(max(power_iters, 0)):
            Q = _orthonormal(apply_a(_orthonormal(apply_at(Q))))
        if k > r:  # keep the dominant r directions of the sketched range
            u, _, _ = torch.linalg.svd(Q.transpose(-1, -2) @ apply_a(Q), full_matrices=False)
            Q = Q @ u[..., :r]
        P = W @ Q  # (L, d, r)

    # Rayleigh-Ritz operator Q^T A Q = (Yc P)^T (Xc P) / (N-1): the only part of the graph, O(N d r)
    op = ((Yc @ P).transpose(-1, -2) @ (Xc @ P)).to(torch.float64) * scale
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
            f"{[float(c) for c in cond[~ok]]} > max_condition={max_condition:g}); its eigenvalue gradient is unreliable",
            layers=idx,
        )
    return eigenvalues[0] if unbatched else eigenvalues

