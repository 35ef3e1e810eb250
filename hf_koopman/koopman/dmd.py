r"""Whitened dynamic mode decomposition of one residual block: the full spectrum, or a rank-r approximation (RKSP
Eqs. 4-9, Alg. 1).

Conventions. Snapshots are rows: `X, Y` are `(N, d)` (token states entering / leaving a block) or `(L, N, d)` for `L`
layers handled in one batched call. The operator acts on column state vectors, as in the paper: $\tilde y \approx
\hat A \tilde x$. Write $D = Y - X$ for the block update (the residual branch $f_\ell$ of Eq. 1).

Full spectrum (the default, `rank=None`). $\hat A = \tilde Y \tilde X^{+}$ (Eq. 6, Moore-Penrose) has all
`m = min(N - 1, d)` modes. With the second moments $S_{xx}, S_{dx}, S_{dd}$ of the centred snapshots and a whitening
$W$ of $S_{xx} + \epsilon I$ (Eq. 9), the whitened Grams are $G = W S W^\top$ and

$$\hat A = \big(G_{xx} + G_{dx}\big)\,G_{xx}^{+} = I + G_{dx} G_{xx}^{-1}\quad(\text{full rank}).$$

Its eigenvalues are those of the unwhitened least-squares operator $S_{yx}S_{xx}^{-1}$ (whitening is a similarity),
so any whitening gives the same spectrum; we use the Cholesky factor $W = L^{-1}$ (`whitening.cholesky_whitening`),
which differs from the paper's ZCA $\hat\Sigma_X^{-1/2}$ by an orthogonal rotation. Eigenvector conditioning (unit-norm
columns), ResDMD residuals and $\eta_{nl}$ are invariant under that rotation too. With $LL^\top = S_{xx} + \epsilon I$
the ridge cancels from the full-rank operator,

$$\hat A = I + L^{-1}\big(S_{dx}S_{xx}^{-1}\big)L = I + \big(L^{-1}S_{dx}R^{-\top}\big)R^{-1}L
\quad(RR^\top = S_{xx}),$$

so the whitened Grams are never formed: cost per layer, three `O(N d^2)` Gram products (two when consecutive layers
share storage and the input covariance is the previous layer's output covariance; symmetric ones from the blocks of
their upper triangle, `_symmetric_gram`), two Cholesky factorisations (of $S_{xx}$ and $S_{xx} + \epsilon I$), three
triangular solves and one product, then one non-symmetric eigenproblem -- no symmetric eigendecomposition. Every
solve is right-sided ($XT = B$; on CPU torch ran those 1.3-1.9x faster than left-sided ones across runs at
768 x 768). The features read the raw moments too (`features.resdmd_residuals`, `features.nonlinearity_ratio`);
`DMDResult.gram_*` and `projection` are formed on first access. Writing the operator through the update $D$ keeps
$Y = X$ exactly degenerate: $S_{dx} = 0$ and $\hat A = I$. Directions X never visits (constant features) make
$S_{xx}$ singular; those layers take the pseudo-inverse of the whitened $G_{xx}$ through an eigendecomposition and the
null modes get $\lambda = 0$.

Rank-r approximation (`rank=r`, the paper's "default recipe" r = 32 with `randomized=True`). After whitening $\tilde X$
is isotropic, so the low-rank directions are taken from the outputs: $U_r$ = the top-r left singular vectors of
$\tilde Y^\top$ (`(d, r)`), and the projected operator is

$$\tilde A_r = (U_r^\top G_{yx} U_r)(U_r^\top G_{xx} U_r)^{+}\quad (r\times r).$$

**This is a different quantity from the spectrum of $\hat A$**: the r directions of largest whitened output energy
are the ones the block expands, so the rank-r eigenvalues are biased toward $|\lambda| > 1$ and the near-unit mass
toward 0 (research GPT, d = 128, Pre-LN: M≈1 0.01 at r = 32 against 0.16 for the full spectrum and 0.16 in the
paper's Table 1; `results/rank_vs_exact.md`). It is exact only when $\hat A$ has rank at most r. `randomized=False`
computes $U_r$ deterministically (eigh of $G_{yy}$); `randomized=True` uses a Halko et al. range finder on $\tilde Y$
(Erichson et al. 2019, the recipe of `pydmd.utils.compute_rqb`) and never forms the `(d, d)` operator:

    Omega ~ N(0, 1) (N, k), k = r + oversample;  Z = Ytil^T Omega
    repeat power_iters times:  Z = Ytil^T qr(Ytil qr(Z).Q).Q
    Q = qr(Z).Q (d, k);  U_r = Q V[:, :r]  with  V = right singular vectors of Ytil Q (N, k)

Precision. The `O(N d^2)` products run in float32 for float32 (and fp16 / bf16, up-cast) inputs and in float64 for
float64 inputs (`dtype=` overrides). A float32 covariance whose ridge-whitened condition number exceeds
`_FLOAT32_GRAM_MAX_CONDITION` is recomputed in float64. The Cholesky factorisations are float64. The eigenproblem
runs in float64 up to `_EIG_FLOAT64_MAX` modes and in float32 above (`eig_dtype=` overrides); when both the second
moments and the eigenproblem are float32, the `(m, m)` solves and products that form the operator and the features run
in float32 as well (`_full_grams`). With float64 inputs (or `dtype=torch.float64`) and a float32 eigenproblem, the
eigenvalues are refined against the float64 operator (`_refined_eigenvalues`: second-order perturbation in the
float32 eigenbasis, ~0.6x the time of a float64 `eig` at 768 modes); on GPT-2 small's float64 snapshots they agree
with the float64 `eig` to 2e-9, and a layer where the estimated error of some eigenvalue exceeds `_REFINE_TOL` x
max(1, spectral radius), or where two modes couple too strongly for the series, is solved in float64. The estimate
bounds the next terms of the perturbation series, not the whole error. The eigenvectors stay float32. An operator
that is float64 only internally (for instance from a float32 covariance too ill-conditioned for float32 moments) is
not refined: float32 inputs get float32-accurate eigenvalues. Whatever the precision of the computation, the returned
eigenvalues are complex128 and the operator float64; only the eigenvectors keep complex64 where the eigenproblem ran
in float32.

On GPT-2 small snapshots at init (d = 768, N = 2048) the float32 default agrees with the all-float64 path to 7e-5 in
the moduli, 3e-5 in the ResDMD residuals below 1 and 2e-7 in $\eta_{nl}$; every spectral mass and ResDMD count is
identical. kappa(V) is sensitive to the float32 eigenvectors of clustered eigenvalues, and these depend on the
LAPACK kernels the CPU selects: within 3 % of float64 on GPT-2 small (0.2-2.6 % on planted width-300 data) on one
CPU, within 6.4 % (26 % on one planted width-300 layer) on an Intel Xeon with AVX-512; `eig_dtype=torch.float64`
gives the float64 value.
"""

from __future__ import annotations

from hf_koopman.logging_utils import get_logger
import math
import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field

import torch

from .whitening import CholeskyWhitening, _as_tensor, _EighWhitening, cholesky_whitening

__all__ = ["DMDResult", "whitened_dmd"]

logger = get_logger(__name__)

_F64 = torch.float64

#: Operators with at most this many modes are eigendecomposed in float64, larger ones in float32 (on GPT-2 small
#: snapshots: moduli within 7e-5 of the all-float64 path, masses identical; `eig` 2.6x faster).
_EIG_FLOAT64_MAX = 256
#: A float32 eigenproblem of a float64 operator is refined (`_refined_eigenvalues`) when the estimated error of every
#: refined eigenvalue is at most this times max(1, spectral radius); otherwise that layer is solved in float64.
_REFINE_TOL = 1e-7
#: Above this estimated condition number of the ridge-whitened covariance, float32 second moments are recomputed in
#: float64. The float32 error of the moduli grows like 7e-10 x the condition number on planted anisotropic data
#: (1e-7 at 1e2, 9e-6 at 1e4, 7e-4 at 1e6), so 1e4 keeps it near 1e-5.
_FLOAT32_GRAM_MAX_CONDITION = 1e4
#: A whitened Gram whose smallest Cholesky pivot is within this factor of the null tolerance is checked by `eigh`.
_NULL_PIVOT_MARGIN = 1e3
#: A layer whose input varies across samples by at most this many units of round-off, relative to its size, is constant
#: (`_constant_input`). One repeated token entering tiny LLaMA and Mamba models varied by <= 4.4 float32 units, by up
#: to 212 with TF32 attention products; the real variation of the states of ten tiny architectures is > 6.7e6 units,
#: of the pretrained MiniLM-L6's on WikiText-2 > 4e6 (its flattest feature 1.4e6).
_CONSTANT_INPUT_ROUNDOFF = 1024.0
#: Samples `_constant_input` checks first (evenly spaced); only what looks constant there is checked on all of them.
_CONSTANT_INPUT_ROWS = 256
#: Above this estimated condition number (float64 second moments), the whitened Grams are formed from explicitly
#: whitened snapshots: a congruence W S W^T of the raw covariance loses cond(Sigma_X) * 1e-16 to round-off.
_FLOAT64_GRAM_MAX_CONDITION = 1e9


class _Moments:
    r"""Second moments of one (batched) fit and the coordinates they live in; private to the spectral core.

    Two forms. *Raw* (the full-rank full-spectrum path): the second moments $S_{xx}, S_{dx}, S_{dd}$ `(L, m, m)` of the
    centred snapshots and the Cholesky factor $L$ of $S_{xx} + \epsilon I$; the whitened Grams
    $G = L^{-1} S L^{-\top}$ and the projection $L^{-\top}$ are formed only when asked for (the spectral features read
    the raw moments directly), and `traces` holds $\mathrm{tr}\,G_{xx}$, $\mathrm{tr}\,G_{dd}$ and
    $\mathrm{tr}(G_{dx} G_{xx}^{-1} G_{xd})$ per layer. *Whitened* (rank-r, pseudo-inverse and very ill-conditioned
    paths): the whitened Grams and the projection themselves.
    """

    def __init__(self, *, grams=None, projection=None, raw=None, chol=None, basis=None, traces=None, lin=_F64):
        self._grams = dict(zip(("xx", "dx", "dd"), grams)) if grams is not None else {}
        self.lin = lin  # precision of the (m, m) products and solves of the raw form (`_raw_fit`)
        self.raw_lin = raw  # the raw moments in that precision
        self._projection = projection
        self.raw = raw  # (sxx, sdx, sdd) or None
        self.chol = chol  # L with L L^T = sxx + eps I (raw form)
        self.chol_lin = chol  # L in the precision `lin`
        self.basis = basis  # row-space basis (d, m) applied before the whitening, or None
        self.traces = traces  # (tr Gxx, tr Gdd, tr Gdx Gxx^-1 Gxd), each (L,), raw form
        # (q_dd, q_dx, q_xx) (L, m) of the unit-norm left eigenvectors: raw form (`_left_quads`), or whitened form
        # when `whitened_dmd` leaves the eigenvectors out (`_quad`)
        self.quads = None

    @property
    def is_raw(self) -> bool:
        return self.raw is not None

    def gram(self, name: str) -> torch.Tensor:
        """Whitened Gram `name` in ("xx", "dx", "dd"); a congruence $L^{-1} S L^{-\top}$ on first use (raw form)."""
        if name not in self._grams:
            raw = self.raw[("xx", "dx", "dd").index(name)]
            half = torch.linalg.solve_triangular(self.chol, raw, upper=False)  # L^-1 S
            g = torch.linalg.solve_triangular(self.chol, half.mT, upper=False).mT  # (L^-1 (L^-1 S)^T)^T
            self._grams[name] = g if name == "dx" else _sym(g)
        return self._grams[name]

    def projection(self) -> torch.Tensor:
        """`(..., d, m)`: centred input rows -> whitened coordinates (`basis @ L^-T` in raw form)."""
        if self._projection is None:
            eye = torch.eye(self.chol.shape[-1], dtype=self.chol.dtype, device=self.chol.device)
            proj = torch.linalg.solve_triangular(self.chol, eye, upper=False).mT
            self._projection = proj if self.basis is None else self.basis @ proj
        return self._projection

    def layer(self, index: int) -> _Moments:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        out = _Moments(projection=pick(self._projection), basis=pick(self.basis), chol=pick(self.chol),
                       raw=None if self.raw is None else tuple(t[index] for t in self.raw),
                       traces=None if self.traces is None else tuple(t[index] for t in self.traces), lin=self.lin)
        out._grams = {k: v[index] for k, v in self._grams.items()}
        out.raw_lin = None if self.raw_lin is None else tuple(t[index] for t in self.raw_lin)
        out.chol_lin = pick(self.chol_lin)
        out.quads = None if self.quads is None else tuple(t[index] for t in self.quads)
        return out


@dataclass(frozen=True)
class DMDResult:
    r"""Result of [`whitened_dmd`], on the input's device. Dtypes follow the module's precision rules (its docstring,
    "Precision"): eigenvalues complex128 and the operator float64 whatever precision they were computed in (float32
    moments and eigenproblem give float32-accurate values); eigenvectors complex64 when the eigenproblem ran in
    float32 (more than 256 modes by default), else complex128.

    `m` is the number of modes: `d` for the full spectrum (`N - 1` when `N - 1 < d`: the problem is first reduced to the
    row space of the centred X, see `_row_space_coordinates`), `r` for rank-r DMD. A leading `L` axis is present when
    the input was batched `(L, N, d)`. Coordinates are whitened with the Cholesky factor (a rotation of the paper's
    ZCA coordinates, which leaves every spectral quantity unchanged).

    Attributes:
        eigenvalues (`(..., m)` complex): eigenvalues of the operator, sorted by decreasing modulus.
        eigenvectors (`(..., m, m)` complex or `None`): right eigenvectors as unit-norm columns, same order; complex64
            when the eigenproblem ran in float32. `None` with `eigenvectors=False` or `keep_eigenvectors=False`.
        left_eigenvectors (`(..., m, m)` complex or `None`): left eigenvectors $u_j$ ($u_j^* A = \lambda_j u_j^*$) as
            unit-norm columns, same order (rows of $V^{-1}$, normalised). `None` with `eigenvectors=False`,
            `left_eigenvectors=False` or `keep_eigenvectors=False`.
        operator (`(..., m, m)` float): $\hat A$ in whitened coordinates ($\tilde y \approx \hat A \tilde x$).
        gram_xx, gram_dx, gram_dd (`(..., m, m)` float): second moments of the whitened (and, for rank-r, projected)
            snapshots: $\tilde X^\top\tilde X$, $\tilde D^\top\tilde X$, $\tilde D^\top\tilde D$, all divided by
            `N - 1`, where $\tilde D = \tilde Y - \tilde X$. For the full spectrum these are formed on first access (the
            features use the equivalent unwhitened moments, see `hf_koopman.koopman.features`).
        projection (`(..., d, m)` float): maps centred input rows to the `m` whitened coordinates,
            `Z = (X - X.mean(-2)) @ projection` (the Cholesky whitening $L^{-\top}$ for exact DMD, $W U_r$ for
            rank-r); formed on first access for the full spectrum.
        rank_x (`(...,)` int): numerical rank of $\tilde X$ in those coordinates; `m - rank_x` modes lie in its null
            space, where the pseudo-inverse sets $\lambda = 0$.
        update_ratio (`(...,)` float): $\|\tilde Y - \tilde X\|_F / \|\tilde X\|_F$, the relative size of the update.
        degenerate (`(...,)` bool): `update_ratio <= degenerate_tol` (e.g. Fixup / ReZero at init, App. J) or
            `rank_x == 0`; the spectrum is then uninformative.
        eigvec_condition (`(...,)` float64): $\kappa(V) = \|V\|_2\|V^{-1}\|_2$ of the unit-norm eigenvectors (`inf`
            for a singular basis, `nan` without eigenvectors).
        n_samples (`int`): N, the snapshot pairs.
        dim (`int`): d, the width of a snapshot.
        randomized (`bool`): whether a rank-r range was found by the randomized range finder.
        eps (`float`): the whitening ridge.
        moments (`_Moments`): the snapshot moments the Grams above are formed from on first access (internal).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    left_eigenvectors: torch.Tensor | None
    operator: torch.Tensor
    rank_x: torch.Tensor
    update_ratio: torch.Tensor
    degenerate: torch.Tensor
    eigvec_condition: torch.Tensor
    n_samples: int
    dim: int
    randomized: bool
    eps: float
    moments: _Moments = field(repr=False, compare=False)

    @property
    def gram_xx(self) -> torch.Tensor:
        """`(..., m, m)`: the whitened Gram of the inputs (the identity up to the ridge), formed on first use."""
        return self.moments.gram("xx")

    @property
    def gram_dx(self) -> torch.Tensor:
        """`(..., m, m)`: the whitened cross Gram of the updates `D = Y - X` against the inputs, formed on first use."""
        return self.moments.gram("dx")

    @property
    def gram_dd(self) -> torch.Tensor:
        """`(..., m, m)`: the whitened Gram of the updates `D = Y - X`, formed on first use."""
        return self.moments.gram("dd")

    @property
    def projection(self) -> torch.Tensor:
        """`(..., d, m)`: maps centred input rows to whitened coordinates."""
        return self.moments.projection()

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
        """Number of layers `L` (1 for an unbatched result)."""
        return self.eigenvalues.shape[0] if self.batched else 1

    def layer(self, index: int) -> DMDResult:
        """The unbatched result of layer `index` of a batched result."""
        if not self.batched:
            raise ValueError("layer() needs a batched (L, ...) result; this one is unbatched")
        fields = {}
        for name in ("eigenvalues", "eigenvectors", "left_eigenvectors", "operator", "rank_x", "update_ratio",
                     "degenerate", "eigvec_condition"):
            value = getattr(self, name)
            fields[name] = None if value is None else value[index]
        return DMDResult(**fields, n_samples=self.n_samples, dim=self.dim, randomized=self.randomized, eps=self.eps,
                         moments=self.moments.layer(index))


# --------------------------------------------------------------------------------------------------------------------
# input validation


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
    """`(X, Y, batched)`: `(L, N, d)` snapshots, half precision up-cast to float32 (chained snapshots, `Y[l]` stored
    as `X[l + 1]`, stay chained: `_chained`)."""
    X = _as_tensor(X, "X").detach()
    Y = _as_tensor(Y, "Y").detach()
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
        if _chained(X, Y):
            # one float32 copy of the L + 1 states with X and Y views of it (L + 1 arrays, not 2L): the chain, and the
            # Gram per layer it saves (`_second_moments`), are kept
            states = torch.empty((L + 1, N, d), dtype=torch.float32, device=X.device)
            states[:-1].copy_(X)
            states[-1].copy_(Y[-1])
            X, Y = states[:-1], states[1:]
        else:
            X, Y = X.float(), Y.float()
    return X, Y, batched


def _constant_input(X: torch.Tensor, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(layers, columns)`, `(L,)` and `(L, d)` bool: the layers and the features whose samples `(L, N, d)` differ by
    round-off only, `||x_c|| <= _CONSTANT_INPUT_ROUNDOFF x unit x ||x||` over the layer or the column (`unit`: the
    round-off of the precision of X). A constant layer input (one token repeated, without position
    information, enters every block as the same state up to the round-off of the computation) has a centred
    covariance of round-off, which no relative rank rule can tell from a direction, so the fit would invert it."""
    L, N, _ = X.shape
    layers = torch.zeros(L, dtype=torch.bool)
    columns = torch.zeros(L, X.shape[-1], dtype=torch.bool)
    bound = (_CONSTANT_INPUT_ROUNDOFF * unit) ** 2

    def flat(x: torch.Tensor) -> tuple[bool, torch.Tensor]:
        # the test is a ratio, so the samples are scaled to at most 1 first: squares of values near the float32
        # range (or below its smallest normal) would overflow (underflow) and read as constant
        scale = x.abs().amax()
        if bool(torch.isfinite(scale)) and float(scale) > 0 and not 2**-32 <= float(scale) <= 2**32:
            x = x / scale
        centred, raw = (x - x.mean(dim=0, keepdim=True)).square().sum(0), x.square().sum(0)
        return bool(centred.sum() <= bound * raw.sum()), (centred <= bound * raw).cpu()

    step = max(1, N // _CONSTANT_INPUT_ROWS)
    for i in range(L):
        # ~256 evenly spaced samples settle the usual case (states that vary) at a tenth of the cost; what looks
        # constant there is confirmed on every sample (a feature may vary on a few tokens only)
        layer, cols = flat(X[i, ::step])
        if step > 1 and (layer or bool(cols.any())):
            layer, cols = flat(X[i])
        layers[i], columns[i] = layer, cols
    return layers, columns


# --------------------------------------------------------------------------------------------------------------------
# shared linear algebra


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run batched LAPACK calls on tiny matrices (k x k, r x r) in one thread: torch parallelises them over the batch,
    and on a busy CPU the thread hand-offs cost 10-100x the work itself (on a 2-core machine)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _map_layers(fn, count: int, parallel: bool = True) -> list:
    """`[fn(i) for i in range(count)]`, layers side by side in worker threads that each run single-threaded torch.

    Batched LAPACK calls on `(L, m, m)` stacks thread poorly here: a batched `cholesky_inverse` with 2 threads was
    measured 15x slower (CPU time) than with one. One layer per worker uses the cores without that overhead.
    """
    workers = min(torch.get_num_threads(), count) if parallel else 1
    with _single_thread():
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(fn, range(count)))
        return [fn(i) for i in range(count)]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


#: Grams `a^T a` at least this wide are formed from the blocks of their upper triangle (`_symmetric_gram`).
_GRAM_BLOCKED_MIN = 256


def _symmetric_gram(a: torch.Tensor) -> torch.Tensor:
    """`a^T a` `(..., m, m)` of `(..., N, m)` `a`, exactly symmetric.

    From `m = 256` on, only the upper triangle is multiplied, in column blocks of `max(128, m / 8)` (about 6 at
    m = 768) and mirrored: 0.6-0.7x the CPU time of the full product on GPT-2 small's snapshots (torch exposes no BLAS
    `syrk`). The entries equal those of `a.mT @ a` up to round-off (the blocks' GEMMs may sum in another order).
    """
    m = a.shape[-1]
    if m < _GRAM_BLOCKED_MIN:
        return _sym(a.mT @ a)
    out = torch.empty(*a.shape[:-2], m, m, dtype=a.dtype, device=a.device)
    step = max(128, -(-m // 8))
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        block = a[..., lo:hi].mT @ a[..., lo:]  # rows lo:hi, columns lo:
        out[..., lo:hi, lo:hi] = _sym(block[..., :, : hi - lo])
        out[..., lo:hi, hi:] = block[..., :, hi - lo:]
        out[..., hi:, lo:hi] = block[..., :, hi - lo:].mT
    return out


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


def _operator(
    gxx: torch.Tensor, gdx: torch.Tensor, null_tol: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\hat A = (G_{xx} + G_{dx})G_{xx}^{+}$ (Eq. 6) and the numerical rank of $\tilde X$, for `(L, m, m)` Grams.

    After whitening $G_{xx} \preceq I$ is symmetric positive definite whenever $\hat\Sigma_X$ has full rank, so
    $\hat A = I + G_{dx}G_{xx}^{-1}$ comes from one Cholesky solve. A layer whose factor has a pivot within
    `_NULL_PIVOT_MARGIN` of `null_tol` (`(L,)`, the whitened variance below which a direction counts as not visited
    by X: constant features, duplicated samples, the spare row-space coordinate) takes the pseudo-inverse through an
    eigendecomposition of $G_{xx}$ instead, which counts those directions out of `rank_x`.
    """
    m = gxx.shape[-1]
    with _single_thread() if m <= 128 else _nullcontext():
        chol, info = torch.linalg.cholesky_ex(gxx)
        pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
        fast = (info == 0) & (pivots.amin(-1) > _NULL_PIVOT_MARGIN * null_tol)
        eye = torch.eye(m, dtype=gxx.dtype, device=gxx.device)
        op = eye + torch.cholesky_solve(gdx.mT, torch.where(fast[..., None, None], chol, eye)).mT
        rank_x = torch.full(gxx.shape[:-2], m, dtype=torch.long, device=gxx.device)
        if not bool(fast.all()):
            slow = (~fast).nonzero().flatten()
            values, vectors = torch.linalg.eigh(gxx[slow])
            values = values.clamp_min(0.0)
            keep = values > torch.maximum(null_tol[slow, None], _rank_tol(values, m, m))
            op[slow] = _operator_from_grams(gxx[slow], gdx[slow], keep, values, vectors)
            rank_x[slow] = keep.sum(-1)
    return op, rank_x


def _null_tolerance(sxx: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """Whitened variance `s / (s + eps)` of a direction whose raw variance `s` is round-off: `(L,)` float64."""
    d = sxx.shape[-1]
    trace = torch.diagonal(sxx, dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
    s = trace * max(n, d) * torch.finfo(_F64).eps
    return torch.where(s > 0, s / (s + eps), torch.zeros_like(s)).clamp_max(0.5)


# --------------------------------------------------------------------------------------------------------------------
# eigendecomposition


def _eig_dtype(m: int, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return _F64 if m <= _EIG_FLOAT64_MAX else torch.float32


def _column_norms(vec: torch.Tensor) -> torch.Tensor:
    """`(..., 1, m)` Euclidean norms of the columns of a complex matrix (`vector_norm` of complex64 is ~10x slower)."""
    return (vec.real.square() + vec.imag.square()).sum(-2, keepdim=True).sqrt()


def _conjugate_pairs(lam: torch.Tensor) -> torch.Tensor | None:
    """`(..., m)` bool, True at the first member of each complex-conjugate pair, for eigenvalues of real matrices
    sorted by decreasing modulus with a stable sort.

    LAPACK returns a pair as adjacent entries (positive imaginary part first) and a stable sort by modulus keeps them
    adjacent, since both members have the same modulus. `None` when the eigenvalues do not follow that pattern.
    """
    im = lam.imag
    start = im > 0
    follows = torch.zeros_like(start)
    follows[..., 1:] = start[..., :-1]
    if not bool(((im < 0) == follows).all()) or bool(start[..., -1].any()):
        return None
    first, second = lam[..., :-1][start[..., :-1]], lam[..., 1:][start[..., :-1]]
    if not bool((second == first.conj()).all()):
        return None
    return start


def _to_real_form(vec: torch.Tensor, start: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Real `(..., m, m)` matrix of the columns of `vec`, each conjugate pair `v, conj(v)` (`start` marks `v`) replaced
    by `scale * (Re v, Im v)`."""
    real = vec.real.clone()
    if start.ndim == 1:
        idx = start.nonzero().flatten()
        real[..., :, idx] *= scale
        real[..., :, idx + 1] = scale * vec.imag[..., :, idx]
        return real
    mask = start.unsqueeze(-2).expand_as(real)
    shifted = torch.zeros_like(mask)
    shifted[..., 1:] = mask[..., :-1]  # the partner column of each pair
    real = torch.where(mask, scale * vec.real, real)
    imag_prev = torch.zeros_like(real)
    imag_prev[..., 1:] = vec.imag[..., :-1]
    return torch.where(shifted, scale * imag_prev, real)


def _left_quads(rows: torch.Tensor, sums, cross, raw: tuple[torch.Tensor, ...]):
    r"""ResDMD quadratic forms $u_j^* G u_j$ of the unit-norm left eigenvectors of one raw-form layer for
    $G = G_{dd}, G_{dx}, G_{xx}$: `(q_dd, q_dx, q_xx)` `(m,)`, float64 / complex128 / float64.

    The eigenvectors come as real rows `rows` `(k, m)`: `sums(x)` `(k,) -> (m,)` adds the rows that make one
    eigenvector ($a^\top G a + b^\top G b$, the real part of $u^* G u$ for $u = a + ib$) and `cross(w, g)` gives the
    imaginary part $a^\top G b - b^\top G a$ from the rows `w` and the rows `g` of $(G w)^\top$.
    `raw = (L, S_dd, S_dx, eps)` with $LL^\top = S_{xx} + \epsilon I$. With $w = L^{-\top}u$ (the left eigenvector of
    the unwhitened operator): $u^* G u = w^* S w$, and $u^* G_{xx} u = \|u\|^2 - \epsilon\|w\|^2$ because
    $w^*(S_{xx} + \epsilon I)w = \|u\|^2$. One right-sided triangular solve and two products per layer. The forms with
    $G_{dx}$ are computed, not taken from $u^* G_{dx} = (\lambda - 1)\,u^* G_{xx}$: that identity holds for exact
    eigenvectors only, and the residual, a difference of nearly equal terms, would then carry the float32 eigenvector
    error (3.7e-4 against the float64 residuals on planted width-300 data, 2.5e-6 computed).
    """
    chol, sdd, sdx, eps = raw
    rows = rows.to(sdd.dtype)
    w = torch.linalg.solve_triangular(chol, rows, upper=False, left=False)  # rows w_j^T = z_j^T L^-1
    norm2 = sums(rows.square().sum(-1)).to(_F64).clamp_min(torch.finfo(_F64).tiny)  # ||u||^2 before normalising
    g_dd, g_dx = w @ sdd, w @ sdx.mT  # rows (S w_j)^T
    q_dd = sums((g_dd * w).sum(-1)).to(_F64) / norm2
    q_dx = torch.complex(sums((g_dx * w).sum(-1)).to(_F64), cross(w, g_dx).to(_F64)) / norm2
    q_xx = 1.0 - eps * sums(w.square().sum(-1)).to(_F64) / norm2
    return q_dd, q_dx, q_xx


def _pair_cross(w: torch.Tensor, g: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Imaginary parts of `u^* G u` for the rows of a real form (`_left_quads`): `a^T G b - b^T G a` at the first member
    of each conjugate pair `u = a + ib` (rows `j, j + 1`, `start[j]`), its negative at the second, 0 for real modes."""
    out = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    idx = start.nonzero().flatten()
    out[idx] = (w[idx] * g[idx + 1]).sum(-1) - (w[idx + 1] * g[idx]).sum(-1)
    out[idx + 1] = -out[idx]
    return out


def _quad(u: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`u_j^* G u_j` for every column j of complex `u` `(..., m, m)` and real `G` `(..., m, m)`: `(..., m)` complex.

    One real product `G [Re u, Im u]` (half the flops of a complex one):
    `u^* G u = a^T G a + b^T G b + i (a^T G b - b^T G a)` for `u = a + i b`.
    """
    real = u.real
    m = u.shape[-1]
    Gab = G.to(real.dtype) @ torch.cat([real, u.imag], dim=-1)
    Ga, Gb = Gab[..., :m], Gab[..., m:]
    a, b = real, u.imag
    re = (a * Ga).sum(-2) + (b * Gb).sum(-2)
    im = (a * Gb).sum(-2) - (b * Ga).sum(-2)
    return torch.complex(re, im)


def _whitened_quads(left: torch.Tensor, moments: _Moments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ResDMD forms `(q_dd, q_dx, q_xx)` `(..., m)` of the unit-norm left eigenvectors `left` `(..., m, m)` from the
    whitened Grams of `moments` (the whitened form; the raw form gets them from `_left_quads`)."""
    return (_quad(left, moments.gram("dd")).real, _quad(left, moments.gram("dx")),
            _quad(left, moments.gram("xx")).real)


def _eigen_one(operator: torch.Tensor, vectors: bool, left_vectors: bool = True, raw=None,
               exact: torch.Tensor | None = None, keep_left: bool = True):
    r"""Eigen-analysis of one `(m, m)` operator: sorted eigenvalues, unit-norm right / left eigenvectors, kappa(V), and
    with `raw` (see `_left_quads`) the ResDMD quadratic forms of the left eigenvectors (else `None`).

    Without `keep_left` (with `raw` only) the left eigenvectors serve kappa(V) and the ResDMD forms and are returned
    as `None` (not normalised and assembled as a complex matrix); the right eigenvectors are then `None` too where
    only their real form is needed (no refinement), which is built straight from LAPACK's columns.

    With `exact` (the float64 operator of which `operator` is the float32 copy), the eigenvalues are refined against it
    (`_refined_eigenvalues`; the eigenvectors are computed for that even without `vectors`) and the left eigenvectors,
    kappa(V) and the ResDMD forms come from the float64 inverse of the eigenvectors' real form; where the refinement
    cannot vouch for its result, the layer is solved again in float64 (`eig`, or `eigvals` without `vectors`).

    For a real operator the eigenvector matrix factors as $V = R\,U$ with $R$ real (the real eigenvectors and, for
    each conjugate pair $a \pm ib$, the columns $\sqrt 2 a, \sqrt 2 b$) and $U$ unitary (blocks
    $\frac{1}{\sqrt 2}\begin{psmallmatrix}1 & 1\\ i & -i\end{psmallmatrix}$). So $\kappa(V) = \kappa(R)$ and
    $V^{-1} = U^* R^{-1}$: the inverse and the norms are taken of a real matrix, a quarter of the complex work, and
    the rows of $R^{-1}$ are the real and imaginary parts of the left eigenvectors.
    """
    nan = torch.tensor(math.nan, dtype=_F64)
    if not vectors and exact is None:
        lam = torch.linalg.eigvals(operator)
        order = torch.argsort(lam.abs(), descending=True, stable=True)
        return lam[order].to(torch.complex128), None, None, nan, None
    lam, vec = torch.linalg.eig(operator)
    order = torch.argsort(lam.abs(), descending=True, stable=True)
    tiny = torch.finfo(operator.dtype).tiny
    lam, norms = lam[order], _column_norms(vec)[..., order].clamp_min(tiny)
    start = _conjugate_pairs(lam) if not operator.is_complex() else None
    R = rinv = None
    if start is not None and raw is not None and not keep_left and exact is None and left_vectors:
        # only the real form is used (kappa(V), ResDMD forms): built from the real and imaginary parts directly,
        # without the sorted, normalised complex matrix
        idx = start.nonzero().flatten()
        R = vec.real[:, order] / norms
        R[:, idx + 1] = vec.imag[:, order[idx]] / norms[..., idx]
        R[:, idx] *= math.sqrt(2.0)
        R[:, idx + 1] *= math.sqrt(2.0)
        rinv, vec = _inverse(R), None
    else:
        vec = vec[:, order] / norms
    if exact is not None:
        refined = None
        if start is not None:
            R = _to_real_form(vec, start, math.sqrt(2.0)).to(_F64)
            rinv = _inverse(R)
            refined = _refined_eigenvalues(exact, R, rinv, start)
        if refined is None:
            logger.debug("float32 eigenvectors too inaccurate to refine; this layer is solved with a float64 eig")
            return _eigen_one(exact, vectors, left_vectors, raw, keep_left=keep_left)
        lam, order = refined
        if order is not None:  # the refinement reordered near-equal moduli: keep the sort, pairs stay adjacent
            vec, R, rinv = vec[:, order], R[:, order], rinv[order]
            start = _conjugate_pairs(lam)
    if not vectors:  # the eigenvectors served the refinement only
        return lam.to(torch.complex128), None, None, nan, None
    if not left_vectors:
        return lam.to(torch.complex128), vec, None, nan, None
    quads = None
    if start is None:
        # rows of V^-1; its conjugate transpose holds the left eigenvectors u_j^* A = lambda_j u_j^*
        inv = _inverse(vec)
        kappa = _condition(vec, inv)
        left = inv.mH
        if raw is not None:  # rows [Re; Im] of V^-1, i.e. [a; -b] for u = a + ib
            m = inv.shape[-1]
            quads = _left_quads(torch.cat([inv.real, inv.imag]), lambda x: x[:m] + x[m:],
                                lambda w, g: (w[m:] * g[:m]).sum(-1) - (w[:m] * g[m:]).sum(-1), raw)
    else:
        if R is None:
            R = _to_real_form(vec, start, math.sqrt(2.0))
            rinv = _inverse(R)
        kappa = _condition(R, rinv)
        if raw is not None:
            quads = _left_quads(rinv, lambda x: _pair_sums(x, start), lambda w, g: _pair_cross(w, g, start), raw)
            if not keep_left:
                return lam.to(torch.complex128), vec, None, kappa, quads
        # rows of V^-1 = U^* R^-1: (r_j - i r_j+1) / sqrt(2) and its conjugate for a pair (r_k: row k of R^-1); the
        # left eigenvectors are their conjugates, r_j + i r_j+1 and r_j - i r_j+1, normalised here on the real rows
        rows = rinv / _pair_sums(rinv.square().sum(-1), start).sqrt().clamp_min(tiny).unsqueeze(-1)
        idx = start.nonzero().flatten()
        re, im = rows.clone(), torch.zeros_like(rows)
        re[idx + 1] = rows[idx]
        im[idx] = rows[idx + 1]
        im[idx + 1] = -rows[idx + 1]
        return lam.to(torch.complex128), vec, torch.complex(re, im).mT, kappa, quads
    if raw is not None and not keep_left:
        return lam.to(torch.complex128), vec, None, kappa, quads
    left = left / _column_norms(left).clamp_min(tiny)
    return lam.to(torch.complex128), vec, left, kappa, quads


def _refined_eigenvalues(A: torch.Tensor, R: torch.Tensor, rinv: torch.Tensor, start: torch.Tensor):
    r"""Eigenvalues of the real float64 `(m, m)` operator `A` from approximate (float32) eigenvectors.

    `R` is the real form of the eigenvectors (`_eigen_one`, float64) and `rinv` its float64 inverse, so
    $T = R^{-1} A R$ is similar to $A$; in the complex eigenbasis, $T_c = U^* T U$ (`U` the unitary pair blocks), it is
    $D + E$ with $D$ diagonal and $E$ (zero diagonal) of the order of the eigenvectors' error. Each eigenvalue is taken
    to second order, $\lambda_j = d_j + \sum_{k} E_{jk}E_{kj} / g_{jk}$ with $g_{jk} = d_j - d_k$: $D$ and the
    in-pair part of $E$ are separated in float64, the small rest is carried in complex64.

    The error of $\lambda_j$ is estimated with $\rho_{jk} = |E_{jk}| / |g_{jk}|$ and $x_{jk} = 4E_{jk}E_{kj}/g_{jk}^2$:
    the third-order sum over two other modes, at most $\sum_{k,l} \rho_{jk} |E_{kl}| \rho_{lj}$ (one `(m, m)`
    product), plus, for each other mode, the whole remainder of the two-mode problem after its second-order term, at
    most $|E_{jk}E_{kj}/g_{jk}|\,\rho_{jk}\rho_{kj} / (1 - |x_{jk}|)$. The series is not trusted at all when some
    $\rho_{jk} > 1/2$ or $|x_{jk}| > 1/2$. Not counted: higher-order couplings through three or more other modes (a
    hand-built four-mode cycle with no two- or three-mode coupling goes unseen; the dense errors of float32
    eigenvectors are not of that kind) and float64 round-off in $T$ (about $10^{-16}\kappa(R)$). On GPT-2 snapshots at
    init (d = 768) the estimate is 5-260x the measured error (2e-9 to 4e-12 against a float64 `eig`, from 2e-5 to
    1e-4 before refinement).

    Returns `(lam, order)`: the eigenvalues `(m,)` complex128 sorted by decreasing modulus (conjugate pairs exact and
    adjacent, real eigenvalues real) and the permutation applied to the input order (`None` if none), or `None` when
    some estimate exceeds `_REFINE_TOL` * max(1, spectral radius), is not finite, or the series is not trusted
    (clustered, repeated or nearly defective eigenvalues).
    """
    T = rinv @ (A @ R)
    idx = start.nonzero().flatten()
    # D and the in-pair part of E in float64: a pair block [[t11, t12], [t21, t22]] is a +- ib (a = (t11 + t22) / 2,
    # b = (t12 - t21) / 2) plus [[p, q], [q, -p]], which U^* U takes to the off-diagonal entries p -+ iq
    diag = torch.diagonal(T).to(torch.complex128)
    pair_re = 0.5 * (T[idx, idx] + T[idx + 1, idx + 1])
    pair_im = 0.5 * (T[idx, idx + 1] - T[idx + 1, idx])
    diag[idx] = torch.complex(pair_re, pair_im)
    diag[idx + 1] = torch.complex(pair_re, -pair_im)
    p, q = 0.5 * (T[idx, idx] - T[idx + 1, idx + 1]), 0.5 * (T[idx, idx + 1] + T[idx + 1, idx])
    rest = T.clone()
    rest.diagonal().zero_()
    rest[idx, idx], rest[idx + 1, idx + 1], rest[idx, idx + 1], rest[idx + 1, idx] = p, -p, q, q
    off = rest.to(torch.complex64)  # U^* (T - D) U: columns then rows of each pair combined, (c_j +- i c_j+1) / sqrt2
    half = 0.5 ** 0.5
    cj, cj1 = off[:, idx].clone(), off[:, idx + 1].clone()
    off[:, idx], off[:, idx + 1] = (cj + 1j * cj1) * half, (cj - 1j * cj1) * half
    rj, rj1 = off[idx].clone(), off[idx + 1].clone()
    off[idx], off[idx + 1] = (rj - 1j * rj1) * half, (rj + 1j * rj1) * half
    off.diagonal().zero_()  # zero up to complex64 round-off of the in-pair entries
    gap = (diag.unsqueeze(1) - diag.unsqueeze(0)).to(torch.complex64)  # differences taken in float64
    gap.diagonal().fill_(1.0)
    coupling = off * off.mT / gap
    size = off.abs()
    ratio = size / gap.abs()
    both = ratio * ratio.mT  # rho_jk rho_kj; |x_jk| = 4 rho_jk rho_kj for each two-mode problem
    pair = 4.0 * both
    # third order, plus the remainder of each two-mode problem d_j + (g/2)(sqrt(1 + x) - 1) after its second-order
    # term: at most |g| |x|^2 / (16 (1 - |x|)), the tail of the binomial series
    tail = coupling.abs() * both / (1.0 - pair).clamp_min(0.5)
    estimate = ((ratio @ size) * ratio.mT).sum(1) + tail.sum(1)
    rho = float(diag.abs().max()) if diag.numel() else 0.0
    if not (_all_finite(estimate) and _all_finite(ratio)) or float(ratio.max()) > 0.5 or float(pair.max()) > 0.5 \
            or float(estimate.max()) > _REFINE_TOL * max(1.0, rho):
        return None
    lam = diag + coupling.sum(1).to(torch.complex128)
    real = torch.ones_like(start)
    real[idx] = real[idx + 1] = False
    lam[real] = lam[real].real.to(torch.complex128)
    lam[idx + 1] = lam[idx].conj()
    order = torch.argsort(lam.abs(), descending=True, stable=True)
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return lam, None
    return lam[order], order


def _pair_sums(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`x[j] + x[j + 1]` at both members `j, j + 1` of each conjugate pair (`start` marks `j`), `x[j]` elsewhere."""
    out = x.clone()
    idx = start.nonzero().flatten()
    out[idx] += x[idx + 1]
    out[idx + 1] = out[idx]
    return out


def _eigen(
    operator: torch.Tensor, vectors: bool = True, dtype: torch.dtype | None = None, left_vectors: bool = True,
    moments: _Moments | None = None, eps: float = 0.0, refine: bool = True, keep_vectors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Eigenvalues by decreasing modulus (complex128), unit-norm right and left eigenvectors, and kappa(V)
    (Alg. 1 l. 8).

    With raw-form `moments` (and left eigenvectors), the same pass stores the ResDMD quadratic forms of every mode in
    `moments.quads` (`_left_quads`), while the real form of the left eigenvectors is at hand.

    The decomposition runs in `dtype` (see `_eig_dtype`); the eigenvectors keep its complex counterpart. A float64
    operator decomposed in float32 gets refined eigenvalues with `refine` (`_refined_eigenvalues`; its eigenvectors
    are computed for that even without `vectors`, still faster than a float64 `eigvals`). Without
    `vectors` only the eigenvalues are computed and kappa(V) is NaN; without `left_vectors` the left eigenvectors are
    `None` and kappa(V) is NaN (no inverse of V). Without `keep_vectors`, where the ResDMD forms are computed in the
    same pass (raw-form `moments`), the eigenvectors serve kappa(V) and those forms and are returned as `None` (no
    `(L, m, m)` complex outputs are filled). Layers run side by side in worker threads, each
    with a single-threaded LAPACK: the Hessenberg-QR iteration of `geev` hardly parallelises, and on a busy 2-core
    machine a multi-threaded `geev` is 20-40x slower than a single-threaded one.
    """
    m = operator.shape[-1]
    work = _eig_dtype(m, dtype)
    batch = operator.shape[:-2]
    flat = operator.to(work).reshape(-1, m, m)
    count = flat.shape[0]
    # a float64 operator decomposed in float32: refine the eigenvalues against it (`_refined_eigenvalues`)
    exact = operator.reshape(-1, m, m) if refine and operator.dtype == _F64 and work == torch.float32 else None
    cdtype = torch.complex64 if work == torch.float32 else torch.complex128
    lam = torch.empty(count, m, dtype=torch.complex128, device=flat.device)
    kappa = torch.empty(count, dtype=_F64, device=flat.device)
    raw = moments if moments is not None and moments.is_raw and vectors and left_vectors else None
    store = vectors and (keep_vectors or raw is None)
    vec = torch.empty(count, m, m, dtype=cdtype, device=flat.device) if store else None
    left = torch.empty_like(vec) if store and left_vectors else None
    if raw is not None:
        chol, sdd, sdx = (t.reshape(-1, m, m) for t in (raw.chol_lin, raw.raw_lin[2], raw.raw_lin[1]))
        quads = (torch.empty(count, m, dtype=_F64, device=flat.device),
                 torch.empty(count, m, dtype=torch.complex128, device=flat.device),
                 torch.empty(count, m, dtype=_F64, device=flat.device))

    def one(i: int) -> None:  # each worker writes its layer into the outputs (no stacking copies)
        lam[i], vec_i, left_i, kappa[i], quads_i = _eigen_one(
            flat[i], vectors, left_vectors, None if raw is None else (chol[i], sdd[i], sdx[i], eps),
            None if exact is None else exact[i], keep_left=store)
        if vec is not None:
            vec[i] = vec_i
        if left is not None:
            left[i] = left_i
        if quads_i is not None:
            for out, q in zip(quads, quads_i):
                out[i] = q

    _map_layers(one, count, parallel=m > 64)
    if raw is not None:
        raw.quads = tuple(q.reshape(*batch, m) for q in quads)
    lam, kappa = lam.reshape(*batch, m), kappa.reshape(batch)
    if vec is None:
        return lam, None, None, kappa
    return lam, vec.reshape(*batch, m, m), None if left is None else left.reshape(*batch, m, m), kappa


def _inverse(vec: torch.Tensor) -> torch.Tensor:
    """`V^-1` matrix by matrix: LU factorisation + triangular solves (getrf/getrs), pseudo-inverse when singular.

    Not `torch.linalg.inv_ex` on the whole batch: with MKL, batched complex `getri` on large eigenvector matrices was
    seen to stall for minutes, and some LAPACK builds raise on an exactly singular LU instead of reporting it.
    """
    m = vec.shape[-1]
    eye = torch.eye(m, dtype=vec.dtype, device=vec.device)
    out = []
    for v in vec.reshape(-1, m, m):
        inv = None
        try:
            lu, piv, info = torch.linalg.lu_factor_ex(v)
            if int(info) == 0:
                inv = torch.linalg.lu_solve(lu, piv, eye, left=False)  # X V = I: ~1.4x faster than V X = I
        except RuntimeError:
            inv = None
        if inv is None or not _all_finite(inv):  # numerically singular eigenvectors (defective operator)
            inv = torch.linalg.pinv(v)
        out.append(inv)
    return out[0] if vec.ndim == 2 else torch.stack(out).reshape(vec.shape)


def _all_finite(t: torch.Tensor) -> bool:
    """`isfinite(t).all()`, via one sum first (NaN/Inf propagate; a sum that overflows is checked element-wise)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _power_norm(apply, apply_t, m: int, dtype: torch.dtype, device, iters: int, rtol: float) -> float:
    """Largest singular value of one `(m, m)` operator given as `apply(v) = M v`, `apply_t(v) = M^H v`: block power
    iteration on `M^H M` (4 vectors), stopped once the estimate changes by less than `rtol` (relative) or after
    `iters` iterations. A lower bound that converges to the norm."""
    # the block vectors are kept column-major: a product with a row-major (m, 4) block is ~5x slower (MKL)
    col = lambda x: x.mT.contiguous().mT  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    v = col(torch.linalg.qr(torch.randn(m, min(4, m), generator=gen, dtype=_F64)).Q.to(device=device, dtype=dtype))
    est = 0.0
    for _ in range(iters):
        z = col(apply(v))
        new = float(torch.linalg.matrix_norm(z, ord=2))
        if abs(new - est) <= rtol * new:
            return new
        est = new
        v = col(torch.linalg.qr(apply_t(z)).Q)
    return float(torch.linalg.matrix_norm(apply(v), ord=2))


def _norm2(matrix: torch.Tensor, iters: int = 30, rtol: float = 1e-4) -> torch.Tensor:
    """Largest singular value of each `(m, m)` matrix (`_power_norm`, matrix by matrix: a batched product with a few
    vectors, and one with a transposed view, are several times slower than a contiguous one). `(...,)` float64."""
    m = matrix.shape[-1]
    out = []
    for a in matrix.reshape(-1, m, m):
        a, a_h = a.contiguous(), a.mH.contiguous()
        out.append(_power_norm(lambda v: a @ v, lambda v: a_h @ v, m, a.dtype, a.device, iters, rtol))
    return torch.tensor(out, dtype=_F64, device=matrix.device).reshape(matrix.shape[:-2])


def _condition(vec: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    r"""$\kappa(V) = \|V\|_2\|V^{-1}\|_2$ (unit-norm columns), `(...,)` float64; `inf` for a singular basis.

    Exact singular values up to `_EIG_FLOAT64_MAX` modes, block power iterations on $V$ and the explicit $V^{-1}$
    above (a complex `768 x 768` SVD costs as much as the eigendecomposition itself).
    """
    m = vec.shape[-1]
    with _single_thread() if m <= 128 else _nullcontext():
        if m <= _EIG_FLOAT64_MAX:
            s = torch.linalg.svdvals(vec).to(_F64)
            smin = s[..., -1]
            kappa = torch.where(smin > 0, s[..., 0] / smin.clamp_min(torch.finfo(_F64).tiny),
                                torch.full_like(smin, math.inf))
        else:
            kappa = _norm2(vec) * _norm2(inv)
    finite = torch.isfinite(inv.sum((-2, -1)))
    if not bool(finite.all()):
        finite = torch.isfinite(inv).flatten(-2).all(-1)
    return torch.where(torch.isfinite(kappa) & finite, kappa, torch.full_like(kappa, math.inf))


# --------------------------------------------------------------------------------------------------------------------
# full spectrum and deterministic rank-r path (Cholesky whitening of second moments)


def _chained(X: torch.Tensor, Y: torch.Tensor) -> bool:
    """Whether each `Y[l]` is stored as `X[l + 1]` (the profiler's views of one stack of the `L + 1` states)."""
    return (X.ndim == 3 and X.shape[0] > 1 and X.dtype == Y.dtype and X.stride() == Y.stride()
            and X[1:].data_ptr() == Y[:-1].data_ptr())


#: The chained covariance `S_yy = S_xx + S_dx + S_xd + S_dd` of one layer serves as `S_xx` of the next while its
#: accumulated round-off bound stays below this many units of the working precision (relative to its trace).
_CHAIN_MAX_ROUNDOFF = 64


def _second_moments(X: torch.Tensor, Y: torch.Tensor, work: torch.dtype, whitening: CholeskyWhitening | None = None,
                    chained: bool = False, keep_work: bool = False):
    r"""`Sxx, Sdx, Sdd` `(L, d, d)` in float64 from centred X and update D = Y - X, products in `work` precision.

    With `whitening`, the snapshots are whitened first (`Xc W^T`, `Dc W^T`: two more `O(N d^2)` products) and the
    returned moments are the whitened Grams, accurate whatever the conditioning of the covariance.

    With `chained` (`Y[l]` is `X[l + 1]`, see `_chained`), the input covariance of layer `l + 1` is the output
    covariance of layer `l`, $S_{yy} = S_{xx} + S_{dx} + S_{xd} + S_{dd}$, accumulated in float64: one `O(N d^2)`
    product fewer per layer. Its round-off is tracked (each step adds `eps(work)` times
    $(\sqrt{\mathrm{tr} S_{xx}} + \sqrt{\mathrm{tr} S_{dd}})^2$, the scale of the terms summed); a layer whose bound
    would exceed `_CHAIN_MAX_ROUNDOFF` units of its own trace (the update cancelling the input) is computed directly.

    With `keep_work`, the moments in `work` precision are returned too, as a fourth element.
    """
    n1 = X.shape[-2] - 1
    X = X.to(work)
    Xc = X - X.mean(dim=-2, keepdim=True)
    # D = Y - X before centring: a small update keeps its accuracy (Y_c - X_c would carry eps * |mean X| per column)
    Dc = Y.to(work) - X
    Dc -= Dc.mean(dim=-2, keepdim=True)  # = Yc - Xc: each matrix centred on its own mean (Eq. 8)
    if whitening is not None:
        w_t = whitening.matrix.mT.to(work)
        Xc, Dc = Xc @ w_t, Dc @ w_t
        chained = False
    sdx_w = Dc.mT @ Xc
    sdx_w /= n1
    sdd_w = _symmetric_gram(Dc)
    sdd_w /= n1
    sdx, sdd = sdx_w.to(_F64), sdd_w.to(_F64)
    if not chained:
        sxx_w = _symmetric_gram(Xc)
        sxx_w /= n1
        return (sxx_w.to(_F64), sdx, sdd, (sxx_w, sdx_w, sdd_w)) if keep_work else (sxx_w.to(_F64), sdx, sdd)
    unit = torch.finfo(work).eps
    trace = lambda a: float(torch.diagonal(a, dim1=-2, dim2=-1).sum().clamp_min(0.0))  # noqa: E731
    sxx = torch.empty_like(sdd)
    sxx[0] = _symmetric_gram(Xc[0]).to(_F64) / n1
    bound = unit * trace(sxx[0])
    for layer in range(1, sxx.shape[0]):
        prev = layer - 1
        syy = _sym(sxx[prev] + sdx[prev] + sdx[prev].mT + sdd[prev])
        bound += unit * (math.sqrt(trace(sxx[prev])) + math.sqrt(trace(sdd[prev]))) ** 2
        if bound <= _CHAIN_MAX_ROUNDOFF * unit * trace(syy):
            sxx[layer] = syy
        else:
            sxx[layer] = _symmetric_gram(Xc[layer]).to(_F64) / n1
            bound = unit * trace(sxx[layer])
    return (sxx, sdx, sdd, (sxx.to(work), sdx_w, sdd_w)) if keep_work else (sxx, sdx, sdd)


def _whitened_condition(sxx: torch.Tensor, whitening: CholeskyWhitening) -> float:
    """Largest `lambda_max(Sxx) / lambda_min(Sxx + eps I)` over the batch (power iterations; an estimate)."""
    with _single_thread():
        lam_max = _norm2(sxx, iters=5, rtol=1e-2)
        inv_min = _norm2(whitening.matrix, iters=5, rtol=1e-2).square()  # ||L^-1||^2 = 1 / lambda_min(Sxx + eps I)
    return float((lam_max * inv_min).amax())


def _factor_condition(sxx: torch.Tensor, chol: torch.Tensor) -> float:
    r"""`_whitened_condition` from the Cholesky factor `chol` of `Sxx + eps I`: $\|L^{-1}\|_2^2$ by power iteration
    with triangular solves instead of an explicit inverse; layers side by side (`_map_layers`). In float64: with
    `eps = 0` a nearly constant feature puts $\|L^{-1}\|^2$ beyond the float32 range."""
    m = sxx.shape[-1]
    flat_s, flat_c = sxx.reshape(-1, m, m), chol.reshape(-1, m, m)

    def layer(i: int) -> float:
        s_l, c_l = flat_s[i].contiguous(), flat_c[i]
        lam_max = _power_norm(lambda v: s_l @ v, lambda v: s_l @ v, m, s_l.dtype, s_l.device, 5, 1e-2)
        inv_min = _power_norm(lambda v: torch.linalg.solve_triangular(c_l, v, upper=False),
                              lambda v: torch.linalg.solve_triangular(c_l.mT, v, upper=True),
                              m, c_l.dtype, c_l.device, 5, 1e-2) ** 2
        return lam_max * inv_min

    return max(_map_layers(layer, flat_s.shape[0], parallel=m > 64), default=0.0)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(_all_finite(t) for t in tensors)


def _raw_fit(sxx: torch.Tensor, sdx: torch.Tensor, sdd: torch.Tensor, chol: torch.Tensor, n: int,
             lin_moments: tuple[torch.Tensor, ...] | None = None):
    r"""Full-rank full spectrum from the raw second moments, or `None` if some layer's $S_{xx}$ is (nearly) singular.

    With $W = L^{-1}$, $LL^\top = S_{xx} + \epsilon I$, the whitened Grams are $G = W S W^\top$ and
    $\hat A = I + G_{dx}G_{xx}^{-1} = I + L^{-1}(S_{dx}S_{xx}^{-1})L$: the ridge cancels. With the Cholesky factor
    $RR^\top = S_{xx}$ and $B = L^{-1}S_{dx}R^{-\top}$, $\hat A = I + (BR^{-1})L$: three right-sided triangular solves
    and one product give the whitened operator, with no congruence. $\eta_{nl}$ and `update_ratio` need only traces in
    the whitened metric, with $P = W^\top W = (S_{xx} + \epsilon I)^{-1}$: $\mathrm{tr}\,G = \sum_{ij} P_{ij} S_{ij}$
    and $\mathrm{tr}(G_{dx}G_{xx}^{-1}G_{xd}) = \mathrm{tr}(P S_{dx} S_{xx}^{-1} S_{xd}) = \|B\|_F^2$.

    A layer is full rank when the Cholesky factorisation of $S_{xx}$ succeeds with every pivot above
    `_NULL_PIVOT_MARGIN` times the round-off variance (`_null_tolerance`); otherwise the caller takes the
    pseudo-inverse path. The factorisations run in float64, the `(m, m)` solves and products in the precision of
    `lin_moments` (the same moments; float32 when they and the eigenproblem are float32 anyway, see `_full_grams`).
    Returns `(operator, moments, rank_x)`, the operator in that precision.
    """
    batch, m = sxx.shape[:-2], sxx.shape[-1]
    trace = torch.diagonal(sxx, dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
    null_var = (trace * max(n, m) * torch.finfo(_F64).eps).reshape(-1)  # round-off variance (`_null_tolerance`)
    s_xx, s_dx, s_dd = (t.reshape(-1, m, m) for t in (lin_moments if lin_moments is not None else (sxx, sdx, sdd)))
    lin = s_dx.dtype
    flat_xx, flat_chol = sxx.reshape(-1, m, m), chol.to(lin).reshape(-1, m, m)
    op = torch.empty_like(s_dx)
    traces = torch.empty(s_dx.shape[0], 3, dtype=_F64, device=s_dx.device)

    def layer(i: int) -> bool:
        chol0, info = torch.linalg.cholesky_ex(flat_xx[i])
        if int(info) != 0 or not float(torch.diagonal(chol0).square().min()) > _NULL_PIVOT_MARGIN * float(null_var[i]):
            return False
        factor, root = flat_chol[i], chol0.to(lin)  # L (of S_xx + eps I) and R (of S_xx)
        # every solve is right-sided (X T = B): on CPU torch runs those ~1.8x faster than left-sided ones
        e = torch.linalg.solve_triangular(root.mT, s_dx[i], upper=True, left=False)  # S_dx R^-T
        b = torch.linalg.solve_triangular(factor.mT, e.mT, upper=True, left=False).mT  # L^-1 S_dx R^-T
        torch.matmul(torch.linalg.solve_triangular(root, b, upper=False, left=False), factor, out=op[i])
        op[i].diagonal().add_(1.0)  # I + L^-1 S_dx S_xx^-1 L
        p = torch.cholesky_inverse(factor)
        # tr(A B^T) = sum(A * B) (pairwise summation); tr(G_dx G_xx^-1 G_xd) = tr(P S_dx S_xx^-1 S_xd) = ||b||_F^2
        traces[i, 0], traces[i, 1], traces[i, 2] = (p * s_xx[i]).sum(), (p * s_dd[i]).sum(), b.square().sum()
        return True

    if not all(_map_layers(layer, s_dx.shape[0], parallel=m > 64)):
        return None
    rank_x = torch.full(batch, m, dtype=torch.long, device=sxx.device)
    moments = _Moments(raw=(sxx, sdx, sdd), chol=chol, traces=tuple(traces[:, k].reshape(batch) for k in range(3)),
                       lin=lin)
    moments.raw_lin = tuple(t.reshape(*batch, m, m) for t in (s_xx, s_dx, s_dd))
    moments.chol_lin = flat_chol.reshape(*batch, m, m)
    return op.reshape(*batch, m, m), moments, rank_x


def _full_grams(X: torch.Tensor, Y: torch.Tensor, eps: float, rank: int | None, work: torch.dtype,
                eig_dtype: torch.dtype | None = None):
    """Operator, moments and `rank_x` of the full spectrum (`rank=None`) or the deterministic rank-r approximation.

    The raw full-rank path (`_raw_fit`) does its `(m, m)` solves and products in float32 when the second moments are
    float32 (well-conditioned float32 data) and the eigenproblem runs in float32 (`_eig_dtype`): both already limit
    the accuracy to that of float32, and the solves and products cost half as much.
    """
    n = X.shape[-2]
    chained = _chained(X, Y)
    sxx, sdx, sdd, in_work = _second_moments(X, Y, work, chained=chained, keep_work=True)
    if work != _F64 and not _finite(sxx, sdx, sdd):  # float32 products of finite data overflowed
        work = _F64
        sxx, sdx, sdd, in_work = _second_moments(X, Y, work, chained=chained, keep_work=True)
    eye = torch.eye(sxx.shape[-1], dtype=_F64, device=sxx.device)
    chol, info = torch.linalg.cholesky_ex(sxx + eps * eye)
    if bool((info > 0).any()):  # eps = 0 on rank-deficient data: symmetric pseudo-inverse square root
        if work != _F64:  # the rank is decided on float64 moments (float32 round-off would count as directions)
            return _full_grams(X, Y, eps, rank, _F64, eig_dtype)
        whitening = cholesky_whitening(sxx, eps)
        return _whitened_grams(X, Y, sxx, sdx, sdd, whitening, _whitened_condition(sxx, whitening), eps, rank)
    condition = _factor_condition(sxx, chol)
    if work != _F64 and condition > _FLOAT32_GRAM_MAX_CONDITION:
        logger.debug("ill-conditioned snapshot covariance (%.2g): second moments recomputed in float64", condition)
        work = _F64
        sxx, sdx, sdd, in_work = _second_moments(X, Y, work, chained=chained, keep_work=True)
        chol, info = torch.linalg.cholesky_ex(sxx + eps * eye)
        if bool((info > 0).any()):
            whitening = cholesky_whitening(sxx, eps)
            return _whitened_grams(X, Y, sxx, sdx, sdd, whitening, _whitened_condition(sxx, whitening), eps, rank)
        condition = _factor_condition(sxx, chol)
    if rank is None and condition <= _FLOAT64_GRAM_MAX_CONDITION:
        m = sxx.shape[-1]
        single = work == torch.float32 and condition <= _FLOAT32_GRAM_MAX_CONDITION
        lin = torch.float32 if single and _eig_dtype(m, eig_dtype) == torch.float32 else _F64
        fit = _raw_fit(sxx, sdx, sdd, chol, n, in_work if lin == work else (sxx, sdx, sdd))
        if fit is not None:
            return fit
        if work != _F64:  # (nearly) singular: the rank is decided on float64 moments, as above
            return _full_grams(X, Y, eps, rank, _F64, eig_dtype)
    return _whitened_grams(X, Y, sxx, sdx, sdd, CholeskyWhitening(chol), condition, eps, rank)


def _whitened_grams(X, Y, sxx, sdx, sdd, whitening: CholeskyWhitening, condition: float, eps: float,
                    rank: int | None):
    """The whitened Grams themselves: rank-r, (nearly) singular covariances (pseudo-inverse) and covariances too
    ill-conditioned for a congruence (explicitly whitened snapshots)."""
    null_tol = _null_tolerance(sxx, eps, X.shape[-2])
    if condition > _FLOAT64_GRAM_MAX_CONDITION:
        gxx, gdx, gdd = _second_moments(X, Y, _F64, whitening)
    else:
        gxx, gdx, gdd = (whitening.congruence(g) for g in (sxx, sdx, sdd))
    gxx, gdd = _sym(gxx), _sym(gdd)
    proj = whitening.matrix.mT  # centred rows -> whitened coordinates: Z = Xc W^T
    if rank is not None:
        # deterministic rank-r: POD of the whitened outputs Ytil (top-r eigenvectors of Gyy)
        _, U = torch.linalg.eigh(_sym(gdd + gdx + gdx.mT + gxx))
        U = U.flip(-1)[..., :rank]
        gxx, gdx, gdd = _project_grams((gxx, gdx, gdd), U)
        gxx, gdd = _sym(gxx), _sym(gdd)
        proj = proj @ U
    op, rank_x = _operator(gxx, gdx, null_tol)
    return op, _Moments(grams=(gxx, gdx, gdd), projection=proj), rank_x


def _small_operator(gxx: torch.Tensor, gdx: torch.Tensor, n: int, d: int):
    """Operator of projected `(L, r, r)` Grams (randomized path): null directions by the `matrix_rank` rule."""
    values = torch.linalg.eigvalsh(gxx).clamp_min(0.0)
    return _operator(gxx, gdx, _rank_tol(values, n, d).squeeze(-1))


# --------------------------------------------------------------------------------------------------------------------
# randomized rank-r path


def _whitener(sxx: torch.Tensor, eps: float) -> CholeskyWhitening:
    whitening = cholesky_whitening(sxx, eps)
    if isinstance(whitening, _EighWhitening):
        logger.info(
            "covariance + eps*I is not numerically positive definite; whitening with a pseudo-inverse square root"
        )
    return whitening


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
            inv = torch.linalg.solve_triangular(
                chol, torch.eye(chol.shape[-1], dtype=_F64, device=chol.device), upper=False
            )
            q = q @ inv.mT  # q R^{-1} with R = chol^T
        return q.to(z.dtype)


def _randomized_grams(X, Y, eps, rank, oversample, power_iters, generator, work, dead=None):
    """The randomized rank-r Grams: the top-r directions of the whitened outputs from a sketch. `dead` `(L, d)` marks
    constant features: the ridge whitening scales them by eps^-1/2, so the part of Y along them would dominate the
    sketch, whose projected operator then divides by ~0 (|lambda| ~ 1e7); the sketch leaves them out (the
    deterministic fit counts those directions out too)."""
    L, N, d = X.shape
    n1 = N - 1
    X = X.to(work)
    Y = Y.to(work)
    Xc = X - X.mean(dim=-2, keepdim=True)
    Dc = Y - X
    Dc -= Dc.mean(dim=-2, keepdim=True)  # in place: one (L, N, d) temporary fewer
    Yc = Xc + Dc
    if dead is not None and bool(dead.any()):
        Yc = Yc.masked_fill(dead.to(Yc.device).unsqueeze(-2), 0.0)  # a copy: Xc, Dc give the Grams below
    sxx = _symmetric_gram(Xc) / n1
    wh = _whitener(sxx, eps)
    k = min(rank + oversample, d, N)
    # drawn where the generator lives (a CPU generator gives the same sketch on any device), then moved to the data
    omega = torch.randn(L, N, k, generator=generator, dtype=_F64, device=generator.device).to(device=X.device,
                                                                                             dtype=work)
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
    return op, _Moments(grams=(gxx, gdx, gdd), projection=proj), rank_x


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
    the projected operator then divides by an almost-zero input Gram: on LLaMA-7B at N = 2048 the spectral radii
    reach ~6e5. Both X and Y are therefore first projected onto the (at most `N - 1`
    dimensional) row space of the centred X with an isometric basis `V` `(d, N)`, and whitened DMD runs on
    `X V, Y V` `(N, N)`; the N-th coordinate is a direction neither centred X nor centred Y has (a null mode).

    This changes nothing that the data identify: the non-zero eigenvalues of the exact pseudo-inverse operator
    $\hat A = \hat A P_X$ are those of $V^\top \hat A V$ (eig(AB) = eig(BA) up to zeros), and the ridge acts on the
    same covariance eigenvalues. Only rotations of the coordinates leave the estimate unchanged: the orthogonal
    projection of Y onto the span of X depends on the metric (so does the unreduced ridge-whitened operator).
    The fast path returns the `N - 1` identifiable coordinates (exact DMD then has `m = N - 1` modes); the eigh
    fallback keeps `N` coordinates, one of them a structural zero. Directions whose variance is numerically zero
    (`matrix_rank` rule on the `(N, N)` Gram, at the precision it was formed in) get a zero basis column: a null mode
    with `lambda = 0`, counted out through `rank_x`.

    Cost: three `O(N^2 d)` products (the float64 Gram `Xc Xc^T`, `V` and `Yc V` in `work` precision) and an `(N, N)`
    Cholesky factorisation (`_cholesky_row_space`); the DMD that follows runs at width `N < d`, so the whole call costs
    about what the unreduced one did (LLaMA-7B-sized layer, d = 4096, N = 2048: 3.5 s vs 3.7 s CPU). Rank-deficient
    samples fall back to an `(N, N)` eigh (~20x slower).

    Returns `(X V, Y V, V)`: `V` `(L, d, N - 1)` (fast path) or `(L, d, N)` in float64, the coordinates in `work`
    precision.
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
    # V = Xc^T L^(-T) has N columns in the (N - 1)-dimensional row space: V^T V = I - tau (L^-1 e)(L^-1 e)^T. Its
    # columns orthogonal to z = L^-1 e are orthonormal, so a Householder reflection H (H z = e_N) and its first N - 1
    # columns B give the isometry V B and drop the redundant coordinate, which would otherwise leave the whitened Gram
    # singular (and every layer on the slow pseudo-inverse path)
    z = torch.linalg.solve_triangular(chol, torch.full((*chol.shape[:-1], 1), N ** -0.5, dtype=_F64,
                                                       device=K.device), upper=False)
    z = z / torch.linalg.vector_norm(z, dim=-2, keepdim=True)
    w = z.clone()
    w[..., -1, :] -= 1.0
    norm = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
    w = torch.where(norm > 1e-12, w / norm.clamp_min(1e-300), torch.zeros_like(w))
    B = (eye - 2.0 * w @ w.mT)[..., :, : N - 1]  # (N, N - 1), orthonormal columns spanning z's complement
    basis = Xc.mT @ (inv_t @ B).to(work)  # V B, (d, N - 1)
    # Xc V = K L^(-T) = L - tau e (e^T L^(-T)): L itself up to a constant row shift, which the DMD's centring removes
    return (chol @ B).to(work), Yw @ basis, basis.to(_F64)


def _fit_operator(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    rank: int | None,
    randomized: bool,
    eps: float,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    eig_dtype: torch.dtype | None = None,
    dead: torch.Tensor | None = None,
):
    """The whitened operator and its Grams for validated `(L, N, d)` snapshots (no eigendecomposition); `dead`
    `(L, d)` marks constant features, which the randomized sketch leaves out (`_randomized_grams`).

    The one definition of the RKSP operator: `whitened_dmd` decomposes it, and KSS
    (`shaping.differentiable_dmd_eigenvalues`) rebuilds it with a gradient in the same coordinates (`projection`).
    Returns `(operator, moments, rank_x)`: `moments` (`_Moments`) gives the whitened Grams and the projection of
    [`DMDResult`] (on first use for the full spectrum).
    """
    N, d = X.shape[-2:]
    use_randomized = randomized and rank is not None
    work = dtype if dtype is not None else (_F64 if X.dtype == _F64 else torch.float32)
    basis = None
    if N - 1 < d:
        X, Y, basis = _row_space_coordinates(X, Y, work)
        if rank is not None and rank > basis.shape[-1]:
            rank = basis.shape[-1]  # at most N - 1 identifiable modes
    if use_randomized:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        # in row-space coordinates (N - 1 < d) constant features are outside the basis already
        op, moments, rank_x = _randomized_grams(X, Y, eps, rank, oversample, power_iters, gen, work,
                                                dead if basis is None else None)
    else:
        op, moments, rank_x = _full_grams(X, Y, eps, rank, work, eig_dtype)
    if basis is not None:  # centred d-dim rows -> the m whitened coordinates
        if moments.is_raw:
            moments.basis = basis
        else:
            moments._projection = basis @ moments._projection.to(_F64)
    return op, moments, rank_x


# --------------------------------------------------------------------------------------------------------------------
# public entry point


def check_eig_dtype(eig_dtype: object) -> None:
    """ValueError unless `eig_dtype` (the precision of the eigenproblem) is `None`, float32 or float64."""
    if eig_dtype is not None and eig_dtype not in (torch.float32, _F64):
        raise ValueError(
            f"eig_dtype={eig_dtype!r} must be torch.float32, torch.float64 or None (float64 up to 256 modes, float32 "
            "above)."
        )


def sample_size_note(n: int, d: int, rank: int | None = None) -> str | None:
    """What `N = n` snapshots of width `d` (and `rank`) limit, when `n < d` or `n <= rank`; else `None`."""
    if n >= d and (rank is None or n > rank):
        return None
    return (f"N={n} snapshots for d={d} features{'' if rank is None else f' and rank={rank}'}: the DMD estimate is "
            f"rank-limited (at most N-1={n - 1} identifiable modes); use more samples (N >= {2 * d} for a verdict, "
            f"{8 * d} for a stable estimate)")


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
    eigenvectors: bool = True,
    eig_dtype: torch.dtype | None = None,
    left_eigenvectors: bool = True,
    keep_eigenvectors: bool = True,
    warn_sample_size: bool = True,
) -> DMDResult:
    r"""Whitened DMD of the map X -> Y of one residual block, or of `L` blocks at once (RKSP Algorithm 1, lines 5-8).

    By default the full spectrum of the whitened operator (all identifiable modes); `rank=r` gives the rank-r
    approximation instead.

    $$\tilde X = (X-\bar X)\hat\Sigma_X^{-1/2},\quad \tilde Y = (Y-\bar Y)\hat\Sigma_X^{-1/2},\quad
    \hat A = \tilde Y^\top (\tilde X^\top)^{+} = V\Lambda V^{-1}$$

    See the module docstring for the exact and rank-r formulas and the precision used.

    Args:
        X (`torch.Tensor` of shape `(N, d)` or `(L, N, d)`): states entering the block; rows are samples (flattened
            batch x token positions). Any real dtype, including fp16 / bf16; numpy arrays are accepted.
        Y (`torch.Tensor`, same shape as `X`): states leaving the block, row-aligned with `X`.
        rank (`int`, *optional*): keep only `r` modes: the rank-r approximation (biased toward expanding modes, see
            the module docstring). `None` (default) = the full spectrum, `m = min(N - 1, d)` identifiable modes.
        randomized (`bool`, *optional*, defaults to `False`): with `rank`, find the rank-r subspace with a randomized
            range finder (the paper's stated recipe is `rank=32, randomized=True` at N = 2048).
        eps (`float`, *optional*, defaults to `1e-5`): ridge $\epsilon$ added to $\hat\Sigma_X$ (Eq. 9, App. D).
            Absolute, as in the paper; it also makes constant features harmless. The eigenvalues do not depend on
            it (the ridge cancels in the operator), but κ(V), the Kreiss constant and $\eta_{nl}$ do where the
            covariance's eigenvalues come near it: data on a scale far below 1 (variances near 1e-5) read differently
            from the same data rescaled; rescale such data to unit scale, or scale `eps` with it.
        oversample (`int`, *optional*, defaults to `10`): extra sketch columns of the range finder.
        power_iters (`int`, *optional*, defaults to `2`): subspace (power) iterations of the range finder.
        generator (`torch.Generator`, *optional*): generator of the sketch, drawn on its device and moved to X's (a
            CPU generator gives the same sketch on any device). `None` uses a fresh CPU generator seeded with 0, so
            repeated calls give identical numbers.
        degenerate_tol (`float`, *optional*, defaults to `1e-4`): flag the result `degenerate` when
            $\|\tilde Y - \tilde X\|_F \le$ `degenerate_tol` $\cdot \|\tilde X\|_F$
            (zero-initialised residual branches). A layer whose input is the same state for every sample up to
            1024 units of round-off (one token repeated, without position information) has `rank_x = 0` and is
            degenerate too: there is no direction to fit. With `randomized=True`, the sketch leaves constant
            features out (the ridge would scale them by $\epsilon^{-1/2}$ into it).
        dtype (`torch.dtype`, *optional*): working precision of the `O(N d^2)` products (`torch.float32` or
            `torch.float64`). Default: float64 for float64 inputs, float32 otherwise (with an automatic float64 retry
            for ill-conditioned covariances). float64 agrees with PyDMD to ~1e-12.
        eigenvectors (`bool`, *optional*, defaults to `True`): also compute right / left eigenvectors and
            $\kappa(V)$ (needed by the ResDMD filter and `eigvec_condition`); `False` returns eigenvalues only.
        eig_dtype (`torch.dtype`, *optional*): precision of the eigenproblem. Default: float64 up to 256 modes,
            float32 above (2.6x faster; on GPT-2 small moduli within 7e-5 of float64 for float32 inputs). With float64
            inputs (or `dtype=torch.float64`) the float32 eigenvalues are refined against the float64 operator, to an
            estimated error of at most 1e-7 x max(1, spectral radius) or else solved in float64 (GPT-2 small: within
            2e-9 of a float64 `eig`; the eigenvectors stay float32). `torch.float64` solves it all in float64.
        left_eigenvectors (`bool`, *optional*, defaults to `True`): with `eigenvectors`, also compute the left
            eigenvectors, $\kappa(V)$ and, for the full spectrum, the ResDMD quadratic forms (one inverse of V, one
            triangular solve and two products); `False` gives eigenvalues and right eigenvectors only (the
            outputs of an exact DMD such as PyDMD's), with `left_eigenvectors=None` and a NaN $\kappa(V)$ in the result.
        keep_eigenvectors (`bool`, *optional*, defaults to `True`): `False` computes everything the spectral features
            need from the eigenvectors ($\kappa(V)$ and the ResDMD quadratic forms) and then leaves the `(L, m, m)`
            eigenvector matrices out of the result (`eigenvectors=None`, `left_eigenvectors=None`): less memory and,
            for the full spectrum, less time. [`profile_from_snapshots`] uses it, as it keeps only the features.
        warn_sample_size (`bool`, *optional*, defaults to `True`): emit a `UserWarning` (`sample_size_note`) when
            N < d or N <= rank; `profile_from_snapshots` passes `False` and logs the note itself.

    Returns:
        [`DMDResult`]: batched along the first axis when `X` was `(L, N, d)`.

    Raises:
        `TypeError`: complex, boolean or non-array input.
        `ValueError`: wrong shapes, `N < 2`, NaN/Inf (the message names the first bad layer / sample / feature), or an
            invalid `rank` / `eps`.

    Warns:
        `UserWarning`: when `N < d` (or `N <= rank`): the estimate is rank-limited. The snapshots are then reduced to
            the (`N - 1`-dimensional) row space of the centred X before whitening (the full spectrum has at most
            `N - 1` identifiable modes; a larger `rank` is lowered to `N - 1`), so that directions X never visits are
            not blown up by the $\epsilon^{-1/2}$ of the ridge; the part of Y outside that span does not enter the Grams
            (nor `update_ratio` / $\eta_{nl}$). Numerically null directions get $\lambda = 0$ and are counted out by
            [`spectral_features`].

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman.koopman import whitened_dmd, spectral_features
    >>> X = torch.randn(2048, 64)
    >>> res = whitened_dmd(X, X @ torch.diag(torch.linspace(0.5, 1.2, 64)))
    >>> res.eigenvalues.shape
    torch.Size([64])
    ```
    """
    X, Y, batched = _check_snapshots(X, Y)
    L, N, d = X.shape
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps={eps!r} must be a finite float >= 0 (the paper uses 1e-5)")
    eps = float(eps)  # NumPy scalars too
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= d:
            raise ValueError(f"rank={rank!r} must be an int in [1, d={d}], or None for exact DMD")
        rank = int(rank)
    elif randomized:
        raise ValueError("randomized=True needs a rank, e.g. whitened_dmd(X, Y, rank=32, randomized=True)")
    if randomized:
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample={oversample!r} must be an int >= 0")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"power_iters={power_iters!r} must be an int >= 0")
    if dtype is not None and dtype not in (torch.float32, _F64):
        raise ValueError(f"dtype={dtype} must be torch.float32, torch.float64 or None")
    check_eig_dtype(eig_dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    note = sample_size_note(N, d, rank)
    if note is not None and warn_sample_size:
        warnings.warn(note, UserWarning, stacklevel=2)

    with torch.no_grad():
        # float32 round-off for half-precision states too: a bound in bfloat16 units would take real, small variation
        # for a constant; states computed in half precision from one repeated token come out identical
        constant, dead = _constant_input(X, float(torch.finfo(X.dtype).eps))
        op, moments, rank_x = _fit_operator(
            X, Y, rank=rank, randomized=randomized, eps=eps, oversample=oversample, power_iters=power_iters,
            generator=generator, dtype=dtype, eig_dtype=eig_dtype, dead=dead)
        # float64 eigenvalues where the caller works in float64; an operator promoted to float64 internally (e.g. an
        # ill-conditioned float32 covariance) keeps the float32 eigenproblem's precision and cost
        refine = dtype == _F64 or (dtype is None and X.dtype == _F64)
        lam, vec, left, kappa = _eigen(op, eigenvectors, eig_dtype, left_eigenvectors, moments, eps, refine,
                                       keep_vectors=keep_eigenvectors)
        if not keep_eigenvectors:
            if left is not None and not moments.is_raw:  # the forms the features would take from the dropped vectors
                moments.quads = _whitened_quads(left, moments)
            vec = left = None
        op = op.to(_F64)
        if moments.is_raw:
            trace_xx, trace_dd = moments.traces[0].clamp_min(0.0), moments.traces[1].clamp_min(0.0)
        else:
            trace_xx = torch.diagonal(moments.gram("xx"), dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
            trace_dd = torch.diagonal(moments.gram("dd"), dim1=-2, dim2=-1).sum(-1).clamp_min(0.0)
        ratio = torch.where(trace_xx > 0, (trace_dd / trace_xx.clamp_min(torch.finfo(_F64).tiny)).sqrt(),
                            torch.zeros_like(trace_xx))
        constant = constant.to(rank_x.device)
        if bool(constant.any()):  # no direction to fit: the operator's modes are round-off, none is identified
            rank_x = torch.where(constant, torch.zeros_like(rank_x), rank_x)
            logger.info("%d of %d layer(s) see the same input state for every sample (up to round-off: one token "
                        "repeated without position information?): no mode is identified there", int(constant.sum()), L)
        degenerate = (ratio <= degenerate_tol) | (rank_x == 0)

    out = DMDResult(
        eigenvalues=lam, eigenvectors=vec, left_eigenvectors=left, operator=op, rank_x=rank_x, update_ratio=ratio,
        degenerate=degenerate, eigvec_condition=kappa, n_samples=N, dim=d,
        randomized=bool(randomized and rank is not None), eps=float(eps), moments=moments,
    )
    if int(degenerate.sum()):
        logger.info("%d of %d layer(s) have a ~zero update (Y ~ X): RKSP is uninformative there",
                    int(degenerate.sum()), L)
    return out if batched else out.layer(0)
