"""Reynolds operators over the symmetric group S_n: the full operator and the reductive one over Reynolds designs.

Notation (Sannai, Kawano, Kumagai, "Invariant and Equivariant Reynolds Networks", JMLR 25(42), 2024). A permutation
g = σ acts on an order-r tensor by re-indexing every axis, `(g·X)[k₁..k_r] = X[σ(k₁)..σ(k_r)]`; its inverse acts as
`(g⁻¹·Y)[k₁..k_r] = Y[σ⁻¹(k₁)..σ⁻¹(k_r)]`. For any map Φ,

    R(Φ)(X) = (1/|G|) Σ_{g∈S_n} g⁻¹·Φ(g·X)                           (Reynolds operator, equivariant for any Φ)

costs n! evaluations. When Φ only *reads* the principal sub-tensor on the first k indices and only *writes* entries
whose indices all lie in {0..k−1}, Φ commutes with the point-wise stabiliser of {0..k−1} (≅ S_{n−k}), so every coset
of that stabiliser contributes the same term and

    Σ_{g∈S_n} g⁻¹·Φ(g·X) = (n−k)! · Σ_{g∈D_k} g⁻¹·Φ(g·X)                (reductive Reynolds operator)

where the *Reynolds design* D_k is any set of coset representatives: one permutation per injective k-tuple
(σ(0)..σ(k−1)), |D_k| = n!/(n−k)!. The designs used by the paper's code are

* sets (k = 1): the n cyclic shifts σ_j(v) = (v + j) mod n;
* graphs (k = 2): σ_{i,j}(v) = (τ_{1,i}(v) + j) mod n, i = 1..n−1, j = 0..n−1 (τ_{1,i} swaps 1 and i), which maps the
  ordered pair (0, 1) onto (j, j + i mod n) and so hits each ordered pair of distinct nodes exactly once.

This module has no dependency besides torch: it is copied next to the model files as Hub remote code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch


__all__ = [
    "all_permutations",
    "set_design",
    "graph_design",
    "injective_tuple_design",
    "pair_blocks",
    "full_reynolds",
    "reductive_reynolds",
    "full_reynolds_set",
    "reductive_reynolds_set",
    "full_reynolds_k",
    "reductive_reynolds_k",
]

PairFunction = Callable[[torch.Tensor], torch.Tensor]

# n! grows fast: the literal operator is a reference implementation for tests and benchmarks only.
_MAX_FULL_N = 9


# ----------------------------------------------------------------------------------------------------------------------
# Designs (as explicit permutations, rows σ with σ[v] = σ(v))
# ----------------------------------------------------------------------------------------------------------------------
def all_permutations(n: int, device: torch.device | None = None) -> torch.Tensor:
    """All n! permutations of `range(n)` as a `(n!, n)` long tensor, in lexicographic order."""
    _check_n(n, minimum=1)
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device).reshape(-1, n)


def set_design(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The rank-1 (set) Reynolds design: the n cyclic shifts σ_j(v) = (v + j) mod n, shape `(n, n)`.

    σ_j maps position 0 to node j, so the design is a set of coset representatives of S_n / S_{n−1}.
    """
    _check_n(n, minimum=1)
    v = torch.arange(n, device=device)
    return (v[None, :] + v[:, None]) % n


def graph_design(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The rank-2 (graph) Reynolds design of the paper's code, shape `(n(n−1), n)`.

    Row `(i − 1)·n + j` is σ_{i,j}(v) = (τ_{1,i}(v) + j) mod n, which sends the ordered pair (0, 1) to
    (j, (j + i) mod n).
    """
    _check_n(n, minimum=2)
    rows = []
    for i in range(1, n):
        tau = list(range(n))
        tau[1], tau[i] = tau[i], tau[1]  # the transposition (1 i); identity for i = 1
        for j in range(n):
            rows.append([(t + j) % n for t in tau])
    return torch.tensor(rows, dtype=torch.long, device=device)


def injective_tuple_design(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """The general order-k design: one permutation per injective k-tuple, shape `(n!/(n−k)!, n)`.

    Row for the tuple t sends positions 0..k−1 to t and the remaining positions, in increasing order, to the nodes not
    in t (in increasing order). Any other completion would do: the rows only have to be coset representatives of
    S_n modulo the point-wise stabiliser of {0..k−1}.
    """
    _check_n(n, minimum=1)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    rows = []
    for t in itertools.permutations(range(n), k):
        rest = [v for v in range(n) if v not in t]
        rows.append(list(t) + rest)
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(-1, n)


# ----------------------------------------------------------------------------------------------------------------------
# Rank-2 contract: pair functions on 2×2 principal blocks
# ----------------------------------------------------------------------------------------------------------------------
def pair_blocks(X: torch.Tensor) -> torch.Tensor:
    """The 2×2 principal block of every ordered pair (a, b), flattened channel-major.

    Args:
        X (`torch.Tensor` of shape `(B, C, n, n)`).

    Returns:
        `torch.Tensor` of shape `(B, n, n, 4·C)`; entry `[:, a, b, 4c:4c+4]` is
        `[X_c[a,a], X_c[a,b], X_c[b,a], X_c[b,b]]`. Entries with a = b are computed too (cheaper than gathering) and are
        ignored by the operators.
    """
    _check_square(X)
    B, C, n, _ = X.shape
    d = X.diagonal(dim1=-2, dim2=-1)  # (B, C, n)
    blocks = torch.stack(
        (
            d[:, :, :, None].expand(B, C, n, n),  # X[a,a]
            X,  # X[a,b]
            X.transpose(-1, -2),  # X[b,a]
            d[:, :, None, :].expand(B, C, n, n),  # X[b,b]
        ),
        dim=-1,
    )  # (B, C, n, n, 4)
    return blocks.permute(0, 2, 3, 1, 4).reshape(B, n, n, 4 * C)


def _split_pair_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out.shape[-1] % 2:
        raise ValueError(
            f"phi must return (..., 2·C') features (diagonal part, then off-diagonal part), got {out.shape[-1]}"
        )
    c_out = out.shape[-1] // 2
    return out[..., :c_out], out[..., c_out:]


def reductive_reynolds(phi: PairFunction, X: torch.Tensor) -> torch.Tensor:
    """Reductive Reynolds operator over the graph design (the n(n−1) ordered pairs of distinct nodes), O(n²).

    With `(φ₀, φ₁) = phi(block(a, b))` (first C' features, last C' features):

        Y[a, b] = φ₁(block(a, b))                               for a ≠ b
        Y[a, a] = (1/(n−1)) Σ_{b≠a} φ₀(block(a, b))

    which is `Σ_{g∈D₂} g⁻¹·Φ(g·X)` followed by the paper code's normalisation (1/(n−1) on the diagonal, 1 off it), where
    Φ writes φ₀ at (0, 0) and φ₁ at (0, 1) of a zero matrix. In terms of the averaged Reynolds operator
    R(Φ) = (1/n!) Σ_{g∈S_n} g⁻¹·Φ(g·X): `reductive_reynolds = n · R(Φ)` on the diagonal and `n(n−1) · R(Φ)` off it.

    Args:
        phi (`Callable`): maps `(..., 4·C)` blocks (see [`pair_blocks`]) to `(..., 2·C')`.
        X (`torch.Tensor` of shape `(B, C, n, n)`): the input tensors, n ≥ 2.

    Returns:
        `torch.Tensor` of shape `(B, C', n, n)`, S_n-equivariant in the node axes.
    """
    _check_square(X)
    n = X.shape[-1]
    _check_n(n, minimum=2)
    diag_part, off_part = _split_pair_output(phi(pair_blocks(X)))  # (B, n, n, C') each
    eye = torch.eye(n, dtype=torch.bool, device=X.device)[None, :, :, None]
    off = off_part.masked_fill(eye, 0.0)
    diag = diag_part.masked_fill(eye, 0.0).sum(dim=2) / (n - 1)  # (B, n, C')
    return off.permute(0, 3, 1, 2) + torch.diag_embed(diag.transpose(1, 2))  # (B, C', n, n)


def full_reynolds(phi: PairFunction, X: torch.Tensor, *, chunk_size: int = 720) -> torch.Tensor:
    """The literal Reynolds sum over all n! permutations, normalised to match [`reductive_reynolds`] exactly.

    Computes `S = Σ_{g∈S_n} g⁻¹·Φ(g·X)`, where Φ(Z) reads the 2×2 block of Z on positions (0, 1), evaluates `phi` and
    writes φ₀ at (0, 0), φ₁ at (0, 1) of an all-zero matrix. Each ordered pair (a, b) is produced by the (n−2)!
    permutations with σ(0) = a, σ(1) = b, hence the returned value is

        S / (n−2)!  off the diagonal,   S / (n−1)!  on the diagonal,

    i.e. `n(n−1) · R(Φ)` and `n · R(Φ)` with R the averaged operator (1/n!) Σ_g. Feasible for n ≤ 9 only.

    Args:
        phi (`Callable`): as for [`reductive_reynolds`].
        X (`torch.Tensor` of shape `(B, C, n, n)`): the input tensors.
        chunk_size (`int`, *optional*, defaults to 720): permutations evaluated per batch (memory bound).

    Returns:
        `torch.Tensor` of shape `(B, C', n, n)`.
    """
    _check_square(X)
    B, C, n, _ = X.shape
    _check_n(n, minimum=2, maximum=_MAX_FULL_N)
    perms = all_permutations(n, device=X.device)
    total = None
    for start in range(0, perms.shape[0], chunk_size):
        sigma = perms[start : start + chunk_size]  # (P, n)
        P = sigma.shape[0]
        gX = X[:, :, sigma[:, :, None], sigma[:, None, :]]  # (B, C, P, n, n): (g·X)[k,l] = X[σ(k), σ(l)]
        block = gX[..., :2, :2].reshape(B, C, P, 4).permute(0, 2, 1, 3).reshape(B, P, 4 * C)  # channel-major
        diag_part, off_part = _split_pair_output(phi(block))  # (B, P, C')
        c_out = diag_part.shape[-1]
        phi_img = X.new_zeros(B, P, c_out, n, n)  # Φ(g·X)
        phi_img[..., 0, 0] = diag_part
        phi_img[..., 0, 1] = off_part
        inv = torch.argsort(sigma, dim=1)  # σ⁻¹
        back = phi_img[:, torch.arange(P, device=X.device)[:, None, None], :, inv[:, :, None], inv[:, None, :]]
        # advanced indexing moved the (P, n, n) index dims first: back is (P, n, n, B, C') -> sum over P
        contrib = back.sum(dim=0).permute(2, 3, 0, 1)  # (B, C', n, n)
        total = contrib if total is None else total + contrib
    eye = torch.eye(n, dtype=torch.bool, device=X.device)
    # divide (not multiply by a rounded reciprocal) so float64 results agree to machine precision
    count = torch.where(eye, float(math.factorial(n - 1)), float(math.factorial(n - 2))).to(X.dtype)
    return total / count


# ----------------------------------------------------------------------------------------------------------------------
# Rank-1 (sets) and the general order-k injective-tuple design
# ----------------------------------------------------------------------------------------------------------------------
def reductive_reynolds_set(phi: PairFunction, x: torch.Tensor) -> torch.Tensor:
    """Reductive Reynolds operator for sets over the cyclic-shift design (d = 1, as in the paper's `ReyEquiv1to1`).

    `Σ_{j} σ_j⁻¹·Φ(σ_j·x)` with Φ writing `phi(x[0])` at position 0 gives `y[i] = phi(x[:, i])`: one evaluation per
    element. Equals `n · R(Φ)` with R = (1/n!) Σ_{g∈S_n}.

    Args:
        phi (`Callable`): maps `(..., C)` to `(..., C')`.
        x (`torch.Tensor` of shape `(B, C, n)`).

    Returns:
        `torch.Tensor` of shape `(B, C', n)`.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, n), got {tuple(x.shape)}")
    n = x.shape[-1]
    design = set_design(n, device=x.device)  # σ_j(0) = j
    picked = x[:, :, design[:, 0]]  # (B, C, n): element j read by σ_j
    out = phi(picked.transpose(1, 2))  # (B, n, C')
    # σ_j⁻¹ writes position 0 back to node j
    y = out.new_zeros(out.shape)
    y[:, design[:, 0]] = out
    return y.transpose(1, 2).contiguous()


def full_reynolds_set(phi: PairFunction, x: torch.Tensor) -> torch.Tensor:
    """Literal Σ_{g∈S_n} g⁻¹·Φ(g·x) for sets (Φ writes `phi(x[0])` at position 0), divided by (n−1)! so that it
    equals [`reductive_reynolds_set`]. Shapes `(B, C, n) -> (B, C', n)`."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, n), got {tuple(x.shape)}")
    n = x.shape[-1]
    _check_n(n, minimum=1, maximum=_MAX_FULL_N)
    perms = all_permutations(n, device=x.device)
    gx = x[:, :, perms]  # (B, C, P, n)
    out = phi(gx[..., 0].permute(0, 2, 1))  # (B, P, C')
    img = out.new_zeros(out.shape[0], perms.shape[0], out.shape[-1], n)
    img[..., 0] = out
    inv = torch.argsort(perms, dim=1)
    back = img[:, torch.arange(perms.shape[0], device=x.device)[:, None], :, inv]  # (P, n, B, C')
    return (back.sum(dim=0).permute(1, 2, 0) / math.factorial(n - 1)).contiguous()


def _principal_subtensor(X: torch.Tensor, tuples: torch.Tensor, rank: int) -> torch.Tensor:
    """`X[..., t, t, ..]` for each tuple: `(B, C, n^rank)` -> `(B, T, C, k^rank)`."""
    B, C = X.shape[:2]
    T, k = tuples.shape
    index = []
    for axis in range(rank):
        shape = [T] + [1] * rank
        shape[axis + 1] = k
        index.append(tuples.reshape(shape))
    sub = X[(slice(None), slice(None), *index)]  # (B, C, T, k, ..., k)
    return sub.reshape(B, C, T, k**rank).transpose(1, 2)


def reductive_reynolds_k(phi: PairFunction, X: torch.Tensor, k: int, out_rank: int | None = None) -> torch.Tensor:
    """Reductive Reynolds operator over injective k-tuples for an order-r tensor, O(n^k) evaluations of `phi`.

    Φ reads the principal sub-tensor of X on positions 0..k−1 and writes an order-r' sub-tensor on the same positions;
    the result is `Σ_{t} t⁻¹·Φ(t·X)` over the n!/(n−k)! injective tuples t, i.e. `Y[t, .., t] += phi(X[t, .., t])`
    scatter-added over all tuples. This equals `n!/(n−k)! · R(Φ)` with R = (1/n!) Σ_{g∈S_n} (unnormalised, unlike the
    rank-2 [`reductive_reynolds`], which is the special case k = 2, r = r' = 2 with the paper's normalisation).

    Args:
        phi (`Callable`): maps `(B, T, C, k^r)` sub-tensors (flattened row-major over the k^r index) to
            `(B, T, C', k^{r'})`.
        X (`torch.Tensor` of shape `(B, C, n, ..., n)`) with r ≥ 1 node axes.
        k (`int`): tuple length, 1 ≤ k ≤ n.
        out_rank (`int`, *optional*): r', defaults to r.

    Returns:
        `torch.Tensor` of shape `(B, C', n, ..., n)` with r' node axes.
    """
    rank, n = _check_tensor_rank(X)
    out_rank = rank if out_rank is None else out_rank
    if not isinstance(out_rank, int) or out_rank < 1:
        raise ValueError(f"out_rank must be a positive integer, got {out_rank!r}")
    tuples = injective_tuple_design(n, k, device=X.device)[:, :k]  # (T, k)
    sub = _principal_subtensor(X, tuples, rank)
    out = phi(sub)  # (B, T, C', k^{r'})
    B, T, c_out, width = out.shape
    if width != k**out_rank:
        raise ValueError(f"phi must return k**out_rank = {k**out_rank} values per channel, got {width}")
    # flat output index of every (tuple, local index) pair
    local = torch.tensor(list(itertools.product(range(k), repeat=out_rank)), dtype=torch.long, device=X.device)
    nodes = tuples[:, local]  # (T, k^{r'}, r')
    strides = torch.tensor([n ** (out_rank - 1 - a) for a in range(out_rank)], device=X.device)
    flat = (nodes * strides).sum(-1).reshape(-1)  # (T·k^{r'},)
    Y = out.new_zeros(B, c_out, n**out_rank)
    Y.index_add_(2, flat, out.permute(0, 2, 1, 3).reshape(B, c_out, T * width))
    return Y.reshape(B, c_out, *([n] * out_rank))


def full_reynolds_k(phi: PairFunction, X: torch.Tensor, k: int, out_rank: int | None = None) -> torch.Tensor:
    """Literal `(1/(n−k)!) Σ_{g∈S_n} g⁻¹·Φ(g·X)` with Φ as in [`reductive_reynolds_k`]; equals it exactly.

    Shapes as in [`reductive_reynolds_k`]. Feasible for n ≤ 9 only.
    """
    rank, n = _check_tensor_rank(X)
    _check_n(n, minimum=1, maximum=_MAX_FULL_N)
    out_rank = rank if out_rank is None else out_rank
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    perms = all_permutations(n, device=X.device)  # (P, n)
    P = perms.shape[0]
    # Φ(g·X) only looks at positions 0..k−1 of g·X, i.e. at nodes σ(0..k−1); g⁻¹ writes local position i back to σ(i)
    sub = _principal_subtensor(X, perms[:, :k], rank)  # (B, P, C, k^r) = the block of g·X on positions 0..k−1
    out = phi(sub)
    B, _, c_out, width = out.shape
    if width != k**out_rank:
        raise ValueError(f"phi must return k**out_rank = {k**out_rank} values per channel, got {width}")
    img = out.new_zeros(B, P, c_out, *([n] * out_rank))  # Φ(g·X): zero outside positions 0..k−1
    img[(slice(None), slice(None), slice(None), *([slice(0, k)] * out_rank))] = out.reshape(
        B, P, c_out, *([k] * out_rank)
    )
    inv = torch.argsort(perms, dim=1)  # (g⁻¹·Y)[v..] = Y[σ⁻¹(v)..]
    index = []
    for axis in range(out_rank):
        shape = [P] + [1] * out_rank
        shape[axis + 1] = n
        index.append(inv.reshape(shape))
    back = img[(slice(None), torch.arange(P, device=X.device).reshape([P] + [1] * out_rank), slice(None), *index)]
    # advanced indices are separated by a slice, so their broadcast dims (P, n, .., n) come first
    total = back.sum(dim=0)  # (n, .., n, B, C')
    total = total.permute(out_rank, out_rank + 1, *range(out_rank))
    return total / math.factorial(n - k)


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------------
def _check_n(n: int, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(n, int) or n < minimum:
        raise ValueError(f"the number of nodes must be an integer >= {minimum}, got {n!r}")
    if maximum is not None and n > maximum:
        raise ValueError(
            f"the full Reynolds operator sums over n! = {math.factorial(n)} permutations; n={n} exceeds the supported "
            f"maximum {maximum}. Use the reductive operator, which is exact and O(n^k)."
        )


def _check_square(X: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != 4 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"X must have shape (B, C, n, n), got {tuple(X.shape)}")


def _check_tensor_rank(X: torch.Tensor) -> tuple[int, int]:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() < 3:
        raise ValueError(f"X must have shape (B, C, n, ..., n) with at least one node axis, got {tuple(X.shape)}")
    n = X.shape[2]
    if any(s != n for s in X.shape[2:]):
        raise ValueError(f"all node axes of X must have the same size, got {tuple(X.shape)}")
    return X.dim() - 2, n
