r"""Whitened dynamic mode decomposition of one residual block, exact or randomized rank-r (RKSP Eqs. 4-9, Alg. 1).

Conventions. Snapshots are rows: `X, Y` are `(N, d)` (token states entering / leaving a block) or `(L, N, d)` for `L`
layers handled in one batched call. The operator acts on column state vectors, as in the paper: $\tilde y \approx
\hat A \tilde x$. Write $D = Y - X$ for the block update (the residual branch $f_\ell$ of Eq. 1).

Exact DMD. $\hat A = \tilde Y \tilde X^{+}$ (Eq. 6, Moore-Penrose). Because $\tilde X$ is whitened we never need an
SVD of the `(N, d)` snapshots: its Gram $G_{xx} = \tilde X^\top \tilde X / (N-1)$ has condition number about 1 (it
is $I$ up to the ridge, $Q\,\mathrm{diag}(s/(s+\epsilon))\,Q^\top$), so the normal equations are as accurate as an
SVD and

$$\hat A = \big(G_{xx} + G_{dx}\big)\,G_{xx}^{+},\qquad G_{dx} = \tilde D^\top \tilde X/(N-1).$$

The Grams are formed from the explicitly whitened snapshots (not as $W \hat\Sigma_X W$ from the raw covariance, whose
small eigenvalues carry the round-off of a `cond(X)^2` problem), and $G_{xx}^{+}$ comes from its own `(d, d)` eigh.

This is the pseudo-inverse operator of Algorithm 1, not the ridge-biased cross-covariance $\tilde Y^\top\tilde X/(N-1)$:
with $\epsilon > 0$, $G_{xx} \ne I$ exactly, and dropping $G_{xx}^{+}$ would shift eigenvalues by $O(\epsilon/s)$. With
the pseudo-inverse the eigenvalues equal those of the unwhitened least-squares operator (whitening is a similarity),
which is what makes them invariant to any invertible change of coordinates $X \to XM, Y \to YM$ (when
$N > d$; with fewer samples see `_row_space_coordinates`: only rotations). Writing the operator
through the update $D$ keeps $Y = X$ exactly degenerate: $G_{dx} = 0$ and $\hat A$ is the identity, no NaN.

Rank-r DMD (the paper's default recipe, r = 32, N = 2048). After whitening $\tilde X$ is isotropic, so its POD basis is
meaningless (all singular values are about $\sqrt{N-1}$); the informative low-rank directions are those of the outputs
$\tilde Y$. We therefore take $U_r$ = the top-r left singular vectors of $\tilde Y^\top$ (`(d, r)`) and fit the projected
operator on the compressed snapshots $B_X = \tilde X U_r$, $B_Y = \tilde Y U_r$ (`(N, r)`):

$$\tilde A_r = (B_Y^\top B_X)(B_X^\top B_X)^{+} = (U_r^\top G_{yx} U_r)(U_r^\top G_{xx} U_r)^{+}\quad (r\times r).$$

Because $G_{xx}\approx I$, this equals the Galerkin projection $U_r^\top \hat A U_r$ up to the ridge, and if $\hat A$ has
rank $\le r$ its non-zero eigenvalues are recovered. `randomized=False` computes $U_r$ deterministically (eigh of
$G_{yy}$); `randomized=True` uses a Halko et al. range finder on $\tilde Y$ (Erichson et al. 2019, the recipe of
`pydmd.utils.compute_rqb`):

    Omega ~ N(0, 1) (N, k), k = r + oversample;  Z = Ytil^T Omega
    repeat power_iters times:  Z = Ytil^T qr(Ytil qr(Z).Q).Q
    Q = qr(Z).Q (d, k);  U_r = Q V[:, :r]  with  V = right singular vectors of Ytil Q (N, k)

The randomized path never forms $\tilde X, \tilde Y$ or the `(d, d)` operator. It whitens with the Cholesky factor
$\hat\Sigma_X = LL^\top$ instead of the symmetric square root; the two whitenings differ by an orthogonal rotation
$R$, the range finder is equivariant under it (same Omega), so the `(r, r)` operator, its eigenvalues and every feature are
identical to the ZCA result -- only cheaper (`d^3/3` instead of an eigendecomposition).

Precision. Exact DMD runs in float64. The randomized path runs its `O(N d^2)` Gram and `O(N d k)` range-finder products
and the projections $B_X, B_D$ in float32 when the inputs are float32 or lower (float64 when the inputs are float64,
or with `dtype=torch.float64`); the `(r, r)` Grams and all eigenproblems are float64. fp16/bf16 inputs are up-cast
first.
float32 moves the selected subspace, hence the eigenvalues, by ~1e-4 relative on transformer-like data whose singular
values near rank r are close (measured in `benchmarks/bench_dmd.py`); float64 reproduces PyDMD to round-off.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass

import torch

from .whitening import _inverse_sqrt

__all__ = ["DMDResult", "whitened_dmd"]

logger = logging.getLogger(__name__)

_F64 = torch.float64


@dataclass(frozen=True)
class DMDResult:
    r"""Result of [`whitened_dmd`]. All tensors are float64 / complex128 on CPU or the input's device.

    `m` is the number of modes: `d` for exact DMD (`N` when `N - 1 < d`: the problem is first reduced to the row
    space of the centred X, see `_row_space_coordinates`), `r` for rank-r DMD. A leading `L` axis is present when the input was
    batched `(L, N, d)`.

    Attributes:
        eigenvalues (`(..., m)` complex): eigenvalues of the operator, sorted by decreasing modulus.
        eigenvectors (`(..., m, m)` complex): right eigenvectors as unit-norm columns, same order.
        left_eigenvectors (`(..., m, m)` complex): left eigenvectors $u_j$ ($u_j^* A = \lambda_j u_j^*$) as unit-norm
            columns, same order (rows of $V^{-1}$, normalised).
        operator (`(..., m, m)` float): $\hat A$ in whitened coordinates ($\tilde y \approx \hat A \tilde x$).
        gram_xx, gram_dx, gram_dd (`(..., m, m)` float): second moments of the whitened (and, for rank-r, projected)
            snapshots: $\tilde X^\top\tilde X$, $\tilde D^\top\tilde X$, $\tilde D^\top\tilde D$, all divided by `N - 1`,
            where $\tilde D = \tilde Y - \tilde X$. The features (residuals, $\eta_{nl}$) are computed from these.
        projection (`(..., d, m)` float): maps centred input rows to the `m` whitened coordinates,
            `Z = (X - X.mean(-2)) @ projection` (the ZCA matrix for exact DMD, $W U_r$ for rank-r).
        rank_x (`(...,)` int): numerical rank of $\tilde X$ in those coordinates; `m - rank_x` modes lie in its null
            space, where the pseudo-inverse sets $\lambda = 0$.
        update_ratio (`(...,)` float): $\|\tilde Y - \tilde X\|_F / \|\tilde X\|_F$, the relative size of the update.
        degenerate (`(...,)` bool): `update_ratio <= degenerate_tol` (e.g. Fixup / ReZero at init, App. J) or
            `rank_x == 0`; the spectrum is then uninformative.
        n_samples (`int`): N.  dim (`int`): d.  randomized (`bool`).  eps (`float`).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    left_eigenvectors: torch.Tensor
    operator: torch.Tensor
    gram_xx: torch.Tensor
    gram_dx: torch.Tensor
    gram_dd: torch.Tensor
    projection: torch.Tensor
    rank_x: torch.Tensor
    update_ratio: torch.Tensor
    degenerate: torch.Tensor
    n_samples: int
    dim: int
    randomized: bool
    eps: float

    @property
    def rank(self) -> int:
        """Number of modes `m`."""
        return self.eigenvalues.shape[-1]

    @property
    def batched(self) -> bool:
        """Whether there is a leading layer axis."""
        return self.eigenvalues.ndim == 2

    @property
    def num_layers(self) -> int:
        return self.eigenvalues.shape[0] if self.batched else 1

    def layer(self, index: int) -> DMDResult:
        """The unbatched result of layer `index` of a batched result."""
        if not self.batched:
            raise ValueError("layer() needs a batched (L, ...) result; this one is unbatched")
        fields = {}
        for name in ("eigenvalues", "eigenvectors", "left_eigenvectors", "operator", "gram_xx", "gram_dx",
                     "gram_dd", "projection", "rank_x", "update_ratio", "degenerate"):
            fields[name] = getattr(self, name)[index]
        return DMDResult(**fields, n_samples=self.n_samples, dim=self.dim, randomized=self.randomized, eps=self.eps)


# --------------------------------------------------------------------------------------------------------------------
# input validation


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            import numpy as np

            if not isinstance(value, np.ndarray):
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be a torch.Tensor (or numpy array) of shape (N, d) or (L, N, d), "
                            f"got {type(value).__name__}") from None
        tensor = torch.from_numpy(value)
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {tensor.dtype}")
    if tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(_F64)
    return tensor.detach()


def _first_non_finite(tensor: torch.Tensor, name: str) -> None:
    # fast path: one reduction in the input dtype (NaN/Inf propagate into the sum). A float32 sum of 1e7 values is ~10x
    # faster than one accumulated in float64; if it overflows on finite data, the exact scan below finds nothing bad.
    half = tensor.dtype in (torch.float16, torch.bfloat16)  # an fp16 sum overflows at 65504: accumulate in float32
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32) if half else tensor.sum())):
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        labels = ["layer", "sample", "feature"][-len(idx):]
        where = ", ".join(f"{lab} {i}" for lab, i in zip(labels, idx))
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/Inf); the first is at {where}. "
                         "Check the activations of that block (overflow in fp16?) or drop those samples.")


def _check_snapshots(X, Y) -> tuple[torch.Tensor, torch.Tensor, bool]:
    X = _as_tensor(X, "X")
    Y = _as_tensor(Y, "Y")
    if X.ndim not in (2, 3):
        raise ValueError(f"X must have shape (N, d) or (L, N, d) with rows as samples, got shape {tuple(X.shape)}")
    if X.shape != Y.shape:
        raise ValueError(f"X and Y must have the same shape (row i of Y is the block output for row i of X), "
                         f"got {tuple(X.shape)} and {tuple(Y.shape)}")
    batched = X.ndim == 3
    if not batched:
        X, Y = X.unsqueeze(0), Y.unsqueeze(0)
    L, N, d = X.shape
    if L == 0 or d == 0:
        raise ValueError(f"empty snapshots: shape {tuple(X.shape)}")
    if N < 2:
        raise ValueError(f"need at least N=2 snapshot pairs to estimate a covariance, got N={N}")
    _first_non_finite(X, "X")
    _first_non_finite(Y, "Y")
    if X.dtype != Y.dtype:
        dtype = torch.promote_types(X.dtype, Y.dtype)
        X, Y = X.to(dtype), Y.to(dtype)
    if X.dtype in (torch.float16, torch.bfloat16):
        X, Y = X.float(), Y.float()
    return X, Y, batched


# --------------------------------------------------------------------------------------------------------------------
# shared linear algebra


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run batched LAPACK calls on tiny matrices (k x k, r x r) in one thread: torch parallelises them over the batch,
    and on a busy CPU the thread hand-offs cost 10-100x the work itself (measured on the 2-core CI machine)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def _rank_tol(values: torch.Tensor, n: int, d: int) -> torch.Tensor:
    # numerical-rank threshold on covariance-like eigenvalues (numpy.linalg.matrix_rank's rule)
    return values.amax(dim=-1, keepdim=True) * max(n, d) * torch.finfo(values.dtype).eps


def _operator_from_grams(
    gxx: torch.Tensor, gdx: torch.Tensor, keep: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """A = (Gxx + Gdx) Gxx^+ = P_x + Gdx Gxx^+ given Gxx = vectors diag(values) vectors^T (Eq. 6)."""
    inv = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
    pinv = (vectors * inv.unsqueeze(-2)) @ vectors.mT
    proj = (vectors * keep.to(values.dtype).unsqueeze(-2)) @ vectors.mT
    # full rank: the projector is exactly I, so a zero update (Y == X) gives exactly A = I
    eye = torch.eye(values.shape[-1], dtype=values.dtype, device=values.device)
    proj = torch.where(keep.all(dim=-1)[..., None, None], eye, proj)
    return proj + gdx @ pinv


def _project_grams(grams: tuple[torch.Tensor, ...], basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(basis.mT @ g @ basis for g in grams)


def _eigen(operator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues sorted by decreasing modulus, unit-norm right and left eigenvectors (Alg. 1 line 8)."""
    lam, vec = torch.linalg.eig(operator)
    order = torch.argsort(lam.abs(), dim=-1, descending=True, stable=True)
    lam = torch.gather(lam, -1, order)
    vec = torch.gather(vec, -1, order.unsqueeze(-2).expand_as(vec))
    vec = vec / torch.linalg.vector_norm(vec, dim=-2, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
    left = _left_eigenvectors(vec)  # columns u_j with u_j^* A = lambda_j u_j^*
    left = left / torch.linalg.vector_norm(left, dim=-2, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
    return lam, vec, left


def _left_eigenvectors(vec: torch.Tensor) -> torch.Tensor:
    """`V^{-H}` matrix by matrix: LU factorisation + triangular solves (getrf/getrs), pseudo-inverse when singular.

    Not `torch.linalg.inv_ex` on the whole batch: with MKL, batched complex `getri` on large eigenvector matrices was
    seen to print "Parameter 6 was incorrect on entry to ZLASWP" and to stall for many minutes (GPT-2 layers, d = 768,
    busy 2-core machine), and some LAPACK builds raise on an exactly singular LU instead of reporting it.
    """
    m = vec.shape[-1]
    eye = torch.eye(m, dtype=vec.dtype, device=vec.device)
    out = []
    for v in vec.reshape(-1, m, m):
        inv = None
        try:
            lu, piv, info = torch.linalg.lu_factor_ex(v)
            if int(info) == 0:
                inv = torch.linalg.lu_solve(lu, piv, eye)
        except RuntimeError:
            inv = None
        if inv is None or not bool(torch.isfinite(inv).all()):  # numerically singular eigenvectors (defective operator)
            inv = torch.linalg.pinv(v)
        out.append(inv.mH)
    return torch.stack(out).reshape(vec.shape)


# --------------------------------------------------------------------------------------------------------------------
# exact and deterministic rank-r path (ZCA via eigh, float64)


def _exact_grams(X: torch.Tensor, Y: torch.Tensor, eps: float, rank: int | None):
    X = X.to(_F64)
    Y = Y.to(_F64)
    L, N, d = X.shape
    n1 = N - 1
    Xc = X - X.mean(dim=-2, keepdim=True)
    D = Y - X
    Dc = D - D.mean(dim=-2, keepdim=True)  # = Yc - Xc: each matrix centred on its own mean (Eq. 8)
    s, Q = torch.linalg.eigh(_sym(Xc.mT @ Xc) / n1)  # Eq. 9 without the ridge
    w = _inverse_sqrt(s.clamp_min(0.0), eps)
    W = (Q * w.unsqueeze(-2)) @ Q.mT  # ZCA (Sigma_X + eps I)^(-1/2)
    # second moments of the explicitly whitened snapshots: conditioned like Xtil (about 1), not like Sigma_X
    # (cond(X)^2), so ill-conditioned activations keep full float64 accuracy
    Xt = Xc @ W
    Dt = Dc @ W
    gxx = _sym(Xt.mT @ Xt) / n1
    gdx = Dt.mT @ Xt / n1
    gdd = _sym(Dt.mT @ Dt) / n1
    proj = W
    if rank is not None:
        # deterministic rank-r: POD of the whitened outputs Ytil (top-r eigenvectors of Gyy)
        _, U = torch.linalg.eigh(_sym(gdd + gdx + gdx.mT + gxx))
        U = U.flip(-1)[..., :rank]
        gxx, gdx, gdd = _project_grams((gxx, gdx, gdd), U)
        gxx, gdd = _sym(gxx), _sym(gdd)
        proj = W @ U
    op, rank_x = _small_operator(gxx, gdx, N, d)
    return op, gxx, gdx, gdd, proj, rank_x


def _small_operator(gxx: torch.Tensor, gdx: torch.Tensor, n: int, d: int):
    with _single_thread() if gxx.shape[-1] <= 128 else _nullcontext():
        values, vectors = torch.linalg.eigh(gxx)
        values = values.clamp_min(0.0)
        keep = values > _rank_tol(values, n, d)
        op = _operator_from_grams(gxx, gdx, keep, values, vectors)
    return op, keep.sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# randomized rank-r path


class _CholeskyWhitening:
    """W = L^{-1} with Sigma_X + eps I = L L^T: a rotation of ZCA, so all DMD quantities match (see module doc)."""

    def __init__(self, chol: torch.Tensor):
        # explicit triangular inverse (d^3/3 once): later products are plain GEMMs, faster than repeated TRSMs
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        self.matrix = torch.linalg.solve_triangular(chol, eye, upper=False)

    def apply(self, z: torch.Tensor) -> torch.Tensor:  # W z
        return self.matrix @ z

    def apply_t(self, z: torch.Tensor) -> torch.Tensor:  # W^T z
        return self.matrix.mT @ z


class _EighWhitening:
    """Fallback (ridge too small for a Cholesky factorisation): symmetric pseudo-inverse square root."""

    def __init__(self, sigma: torch.Tensor, eps: float):
        s, Q = torch.linalg.eigh(sigma.to(_F64))
        w = _inverse_sqrt((s - eps).clamp_min(0.0), eps).to(sigma.dtype)
        self.matrix = (Q.to(sigma.dtype) * w.unsqueeze(-2)) @ Q.to(sigma.dtype).mT

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return self.matrix @ z

    apply_t = apply


def _whitener(sxx: torch.Tensor, eps: float):
    eye = torch.eye(sxx.shape[-1], dtype=sxx.dtype, device=sxx.device)
    sigma = sxx + eps * eye
    chol, info = torch.linalg.cholesky_ex(sigma)
    if not bool((info > 0).any()):
        return _CholeskyWhitening(chol)
    if sxx.dtype != _F64:  # float32 round-off made a tiny ridge indefinite: factorise in float64
        chol, info = torch.linalg.cholesky_ex(sxx.to(_F64) + eps * eye.to(_F64))
        if not bool((info > 0).any()):
            whitener = _CholeskyWhitening(chol)
            whitener.matrix = whitener.matrix.to(sxx.dtype)
            return whitener
    logger.info("covariance + eps*I is not numerically positive definite; whitening with a pseudo-inverse square root")
    return _EighWhitening(sigma, eps)


def _orth(z: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(z) for tall (..., n, k) z: CholeskyQR2 in float64 (LAPACK QR is needlessly slow for
    these skinny batched matrices on CPU), Householder QR if the Gram matrix is numerically singular."""
    # all of it in one thread: (n, k) x (k, k) products and copies of ~1e5 elements cost less than waking the pool
    with _single_thread():
        q = z.to(_F64)
        for _ in range(2):
            gram = q.mT @ q
            chol, info = torch.linalg.cholesky_ex(gram)
            if bool((info > 0).any()):
                return torch.linalg.qr(z.to(_F64)).Q.to(z.dtype)
            inv = torch.linalg.solve_triangular(chol, torch.eye(chol.shape[-1], dtype=_F64), upper=False)
            q = q @ inv.mT  # q R^{-1} with R = chol^T
        return q.to(z.dtype)


def _randomized_grams(X, Y, eps, rank, oversample, power_iters, generator, work):
    L, N, d = X.shape
    n1 = N - 1
    X = X.to(work)
    Y = Y.to(work)
    Xc = X - X.mean(dim=-2, keepdim=True)
    Dc = Y - X
    Dc -= Dc.mean(dim=-2, keepdim=True)  # in place: one (L, N, d) temporary fewer
    Yc = Xc + Dc
    sxx = _sym(Xc.mT @ Xc) / n1
    wh = _whitener(sxx, eps)
    k = min(rank + oversample, d, N)
    omega = torch.randn(L, N, k, generator=generator, dtype=_F64, device="cpu").to(device=X.device, dtype=work)
    # Ytil = Yc W^T (rows), so Ytil^T V = W (Yc^T V) and Ytil U = Yc (W^T U)
    z = wh.apply(Yc.mT @ omega)
    for _ in range(power_iters):
        s = _orth(Yc @ wh.apply_t(_orth(z)))
        z = wh.apply(Yc.mT @ s)
    q = _orth(z)  # (L, d, k)
    sketch = (Yc @ wh.apply_t(q)).to(_F64)  # Ytil q, (L, N, k)
    # right singular vectors of the sketch = eigenvectors of its (k, k) Gram, in decreasing order
    sketch_gram = sketch.mT @ sketch
    with _single_thread():
        _, vecs = torch.linalg.eigh(sketch_gram)
    basis = q.to(_F64) @ vecs.flip(-1)[..., :rank]  # U_r in whitened coordinates, (L, d, r)
    proj = wh.apply_t(basis.to(work))  # centred X -> whitened r coordinates
    bx = (Xc @ proj).to(_F64)
    bd = (Dc @ proj).to(_F64)
    with _single_thread():  # (r, N) x (N, r): too small to repay the thread hand-off
        proj = proj.to(_F64)
        gxx = _sym(bx.mT @ bx) / n1
        gdx = bd.mT @ bx / n1
        gdd = _sym(bd.mT @ bd) / n1
    op, rank_x = _small_operator(gxx, gdx, N, d)
    return op, gxx, gdx, gdd, proj, rank_x


# --------------------------------------------------------------------------------------------------------------------
# N <= d: reduce to the row space of the centred X


def _row_space_coordinates(
    X: torch.Tensor, Y: torch.Tensor, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Coordinates of X and Y in an orthonormal basis of the row space of the centred X, for `N - 1 < d`.

    With fewer samples than features $\tilde X$ has rank at most `N - 1`, and the ridge-whitening of Eq. 9 multiplies
    every direction outside the span of the centred X by $\epsilon^{-1/2}$ (~316 at the default). Those directions carry
    no input information at all (the least-squares operator $\hat A = \tilde Y\tilde X^{+}$ is zero on them), but the
    part of Y that falls there is blown up, dominates the output energy that the rank-r recipe ranks directions by, and
    the projected operator then divides by an almost-zero input Gram: on LLaMA-7B at N = 2048 this produced spectral
    radii of ~6e5 (session-1 streaming run). We therefore first project both X and Y onto the (at most `N - 1`
    dimensional) row space of the centred X with an isometric basis `V` `(d, N)`, and run whitened DMD on
    `X V, Y V` `(N, N)`; the N-th coordinate is a direction neither centred X nor centred Y has (a null mode).

    This changes nothing that the data identify: the non-zero eigenvalues of the exact pseudo-inverse operator
    $\hat A = \hat A P_X$ are those of $V^\top \hat A V$ (eig(AB) = eig(BA) up to zeros), and the ridge acts on the
    same covariance eigenvalues. Only rotations of the coordinates leave the estimate unchanged: the orthogonal
    projection of Y onto the span of X depends on the metric (so does the unreduced ridge-whitened operator).
    Exact DMD then returns `m = N` modes instead of `d` (`rank_x` <= `N - 1` of them identifiable; the others are
    structural zeros, as the `d - N + 1` were before). Directions
    whose variance is numerically zero (`matrix_rank` rule on the `(N, N)` Gram, at the precision it was formed in) get a
    zero basis column: a null mode with `lambda = 0`, counted out through `rank_x` as before.

    Cost: three `O(N^2 d)` products (the float64 Gram `Xc Xc^T`, `V` and `Yc V` in `work` precision) and an `(N, N)`
    Cholesky factorisation (`_cholesky_row_space`); the DMD that follows runs at width `N < d`, so the whole call costs
    about what the unreduced one did (LLaMA-7B-sized layer, d = 4096, N = 2048: 3.5 s vs 3.7 s CPU). Rank-deficient
    samples fall back to an `(N, N)` eigh (~20x slower).

    Returns `(X V, Y V, V)`: `V` `(L, d, N)` in float64, the coordinates in `work` precision.
    """
    L, N, d = X.shape
    Xw = X.to(work)
    Xc = Xw - Xw.mean(dim=-2, keepdim=True)
    # the Gram in float64 whatever `work` is: exactly duplicated samples (the same token id entering the first block)
    # must come out numerically singular, not as float32 noise that a Cholesky factorisation would happily invert
    K = _sym(Xc.to(_F64) @ Xc.to(_F64).mT)  # (N, N), rank <= N - 1: the all-ones vector is in its null space
    fast = _cholesky_row_space(Xc, Y.to(work), K, work)
    if fast is not None:
        return fast
    logger.info("N < d with (numerically) rank-deficient samples (duplicated tokens?): eigendecomposition fallback")
    s, U = torch.linalg.eigh(K)  # all N pairs (the centring null vector becomes a zero column), as the fast path
    s = s.flip(-1).clamp_min(0.0)
    U = U.flip(-1)
    keep = s > _rank_tol(s, N, d)
    safe = torch.where(keep, s, torch.ones_like(s))
    inv = torch.where(keep, safe.rsqrt(), torch.zeros_like(s))
    basis = Xc.mT @ (U * inv.unsqueeze(-2)).to(work)  # V = Xc^T U S^(-1/2): orthonormal right singular vectors
    x_red = (U * torch.where(keep, safe.sqrt(), torch.zeros_like(s)).unsqueeze(-2)).to(work)  # Xc V = U S^(1/2)
    y_red = Y.to(work) @ basis
    return x_red, y_red, basis.to(_F64)


def _cholesky_row_space(Xc: torch.Tensor, Yw: torch.Tensor, K: torch.Tensor, work: torch.dtype):
    """Fast path of `_row_space_coordinates` (an `(N, N)` eigh costs ~20x a Cholesky factorisation): Cholesky-QR.

    Append the constant feature `sqrt(tau) e` (`e` = ones / sqrt(N)) to the centred samples, which fills exactly the
    one null direction that centring creates, so `K + tau e e^T = L L^T` is positive definite when the centred samples
    have rank N - 1. `Q = [Xc, sqrt(tau) e]^T L^(-T)` is then orthonormal; its first d rows `V = Xc^T L^(-T)` are an
    isometry on the row space of Xc plus one direction that both the centred X and Y coordinates miss (a null mode).
    Returns `None` (use the eigh path) when a pivot is numerically zero: duplicated or collinear samples.
    """
    N, d = Xc.shape[-2:]
    tau = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1) / max(N - 1, 1)
    ones = torch.full((N, N), 1.0 / N, dtype=_F64, device=K.device)
    chol, info = torch.linalg.cholesky_ex(K + tau[..., None, None] * ones)
    if bool((info > 0).any()):
        return None
    # exact duplicates leave pivots at round-off level, not exactly 0: treat anything within 1e3x of the float64
    # matrix_rank threshold as zero rather than invert it (the eigh path then drops those directions)
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
    if bool((pivots.amin(-1) <= pivots.amax(-1) * max(N, d) * torch.finfo(_F64).eps * 1e3).any()):
        return None
    eye = torch.eye(N, dtype=_F64, device=K.device)
    inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).mT  # L^(-T)
    basis = Xc.mT @ inv_t.to(work)  # V = Xc^T L^(-T), (d, N)
    # Xc V = K L^(-T) = L - tau e (e^T L^(-T)): L itself up to a constant row shift, which the DMD's centring removes
    return chol.to(work), Yw @ basis, basis.to(_F64)


# --------------------------------------------------------------------------------------------------------------------
# public entry point


def whitened_dmd(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    rank: int | None = None,
    randomized: bool = False,
    eps: float = 1e-5,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    degenerate_tol: float = 1e-4,
    dtype: torch.dtype | None = None,
) -> DMDResult:
    r"""Whitened DMD of the map X -> Y of one residual block, or of `L` blocks at once (RKSP Algorithm 1, lines 5-8).

    $$\tilde X = (X-\bar X)\hat\Sigma_X^{-1/2},\quad \tilde Y = (Y-\bar Y)\hat\Sigma_X^{-1/2},\quad
    \hat A = \tilde Y^\top (\tilde X^\top)^{+} = V\Lambda V^{-1}$$

    See the module docstring for the exact and rank-r formulas and the precision used.

    Args:
        X (`torch.Tensor` of shape `(N, d)` or `(L, N, d)`): states entering the block; rows are samples (flattened
            batch x token positions). Any real dtype, including fp16 / bf16; numpy arrays are accepted.
        Y (`torch.Tensor`, same shape as `X`): states leaving the block, row-aligned with `X`.
        rank (`int`, *optional*): number of modes `r`. `None` (default) = exact DMD with `m = d` modes.
        randomized (`bool`, *optional*, defaults to `False`): with `rank`, find the rank-r subspace with a randomized
            range finder (the paper's default recipe is `rank=32, randomized=True` at N = 2048).
        eps (`float`, *optional*, defaults to `1e-5`): ridge $\epsilon$ added to $\hat\Sigma_X$ (Eq. 9, App. D). Absolute,
            as in the paper; it also makes constant features harmless.
        oversample (`int`, *optional*, defaults to `10`): extra sketch columns of the range finder.
        power_iters (`int`, *optional*, defaults to `2`): subspace (power) iterations of the range finder.
        generator (`torch.Generator`, *optional*): CPU generator for the sketch. `None` uses a fresh generator seeded
            with 0, so repeated calls give identical numbers.
        degenerate_tol (`float`, *optional*, defaults to `1e-4`): flag the result `degenerate` when
            $\|\tilde Y - \tilde X\|_F \le$ `degenerate_tol` $\cdot \|\tilde X\|_F$ (zero-initialised residual branches).
        dtype (`torch.dtype`, *optional*): working precision of the randomized path's large products
            (`torch.float32` or `torch.float64`). Default: float64 for float64 inputs, float32 otherwise. float32 is
            ~3x faster; its eigenvalues differ from the float64 ones by ~1e-4 relative on transformer-like data (far
            below the N = 2048 sampling error), float64 agrees with PyDMD to ~1e-12. Exact DMD always uses float64.

    Returns:
        [`DMDResult`]: batched along the first axis when `X` was `(L, N, d)`.

    Raises:
        `TypeError`: complex, boolean or non-array input.
        `ValueError`: wrong shapes, `N < 2`, NaN/Inf (the message names the first bad layer / sample / feature), or an
            invalid `rank` / `eps`.

    Warns:
        `UserWarning`: when `N < d` (or `N <= rank`): the estimate is rank-limited. The snapshots are then reduced to
            the (`N - 1`-dimensional) row space of the centred X before whitening (exact DMD returns `N` modes, at
            most `N - 1` identifiable; a larger `rank` is lowered to `N`), so that directions X never visits are not blown up by the
            $\epsilon^{-1/2}$ of the ridge; the part of Y outside that span does not enter the Grams (nor
            `update_ratio` / $\eta_{nl}$). Numerically null directions get $\lambda = 0$ and are counted out by
            [`spectral_features`].

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman.koopman import whitened_dmd, spectral_features
    >>> X = torch.randn(2048, 64)
    >>> res = whitened_dmd(X, X @ torch.diag(torch.linspace(0.5, 1.2, 64)), rank=32, randomized=True)
    >>> res.eigenvalues.shape
    torch.Size([32])
    ```
    """
    X, Y, batched = _check_snapshots(X, Y)
    L, N, d = X.shape
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps={eps!r} must be a finite float >= 0 (the paper uses 1e-5)")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ValueError(f"rank={rank!r} must be an int in [1, d={d}], or None for exact DMD")
    elif randomized:
        raise ValueError("randomized=True needs a rank, e.g. whitened_dmd(X, Y, rank=32, randomized=True)")
    if randomized:
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample={oversample!r} must be an int >= 0")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"power_iters={power_iters!r} must be an int >= 0")
    if dtype is not None and dtype not in (torch.float32, _F64):
        raise ValueError(f"dtype={dtype} must be torch.float32, torch.float64 or None")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if N < d or (rank is not None and N <= rank):
        warnings.warn(f"N={N} snapshots for d={d} features{'' if rank is None else f' and rank={rank}'}: the DMD "
                      f"estimate is rank-limited (at most N-1={N - 1} identifiable modes); use more samples "
                      "(the paper uses N=2048)", UserWarning, stacklevel=2)

    with torch.no_grad():
        use_randomized = randomized and rank is not None
        work = dtype if dtype is not None else (_F64 if X.dtype == _F64 else torch.float32)
        basis = None
        if N - 1 < d:
            X, Y, basis = _row_space_coordinates(X, Y, work if use_randomized else _F64)
            if rank is not None and rank > basis.shape[-1]:
                rank = basis.shape[-1]  # at most N - 1 identifiable modes (warned above)
        if use_randomized:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            op, gxx, gdx, gdd, proj, rank_x = _randomized_grams(X, Y, eps, rank, oversample, power_iters, gen, work)
        else:
            op, gxx, gdx, gdd, proj, rank_x = _exact_grams(X, Y, eps, rank)
        if basis is not None:
            proj = basis @ proj.to(_F64)  # centred d-dim rows -> the m whitened coordinates
        with _single_thread() if op.shape[-1] <= 128 else _nullcontext():
            lam, vec, left = _eigen(op)
        trace_xx = torch.diagonal(gxx, dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
        trace_dd = torch.diagonal(gdd, dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
        ratio = torch.where(trace_xx > 0, (trace_dd / trace_xx.clamp_min(torch.finfo(_F64).tiny)).sqrt(),
                            torch.zeros_like(trace_xx))
        degenerate = (ratio <= degenerate_tol) | (rank_x == 0)

    out = DMDResult(
        eigenvalues=lam, eigenvectors=vec, left_eigenvectors=left, operator=op, gram_xx=gxx, gram_dx=gdx,
        gram_dd=gdd, projection=proj, rank_x=rank_x, update_ratio=ratio, degenerate=degenerate,
        n_samples=N, dim=d, randomized=bool(randomized and rank is not None), eps=float(eps),
    )
    if int(degenerate.sum()):
        logger.info("%d of %d layer(s) have a ~zero update (Y ~ X): RKSP is uninformative there",
                    int(degenerate.sum()), L)
    return out if batched else out.layer(0)
