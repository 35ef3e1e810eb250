"""The IEGN baseline: Maron et al.'s linear S_n-equivariant layer on 2-tensors (the 15-element basis, ICLR 2019).

"Invariant and Equivariant Graph Networks" (https://huggingface.co/papers/1812.09902) shows that the linear
equivariant maps R^{n×n} → R^{n×n} form a 15-dimensional space (bell(4) = 15). With the per-channel statistics
diag(X), row sums, column sums, the diagonal sum and the total sum (sums normalised by n or n², the reference code's
'inf' normalisation), the basis is

* 5 ops on the diagonal:   diag(X), Σ diag, row sums, column sums, Σ all
* 6 ops broadcast along rows or columns: row sums, column sums and diag(X), each along i and along j
* 2 ops broadcast everywhere: Σ all, Σ diag
* 2 ops: X and Xᵀ,

plus a bias on every entry and one on the diagonal. `IEGNLinear` implements it two ways with identical results:
materialising the 15 basis tensors (`(B, 15·C, n, n)`, as the reference implementation does) or factorised (only
`(B, C', n, n)`-sized tensors). Node masks let graphs of different sizes share a batch: sums run over real nodes and
are divided by the real n.

Imports only torch (Hub remote code).
"""

from __future__ import annotations

import math

import torch
from torch import nn


__all__ = ["IEGNLinear", "NUM_BASIS_OPS"]

NUM_BASIS_OPS = 15


def add_transposed_halves(both: torch.Tensor) -> torch.Tensor:
    """`(B, n, n, 2F)` -> `(B, n, n, F)`: `both[..., :F] + both[..., F:]` with the second half transposed in (i, j).

    Both equivariant layers compute their X[i, j] and X[j, i] terms as one `(…, C) @ (C, 2F)` GEMM and combine the
    halves here. `unbind`, not slicing: its backward stacks the two gradients, where slicing would zero-fill two
    full-size buffers and add them. The result is a fresh buffer, so callers may add to it in place.
    """
    ij, ji = both.unflatten(-1, (2, both.shape[-1] // 2)).unbind(-2)
    return ij + ji.transpose(1, 2)


def _masked_stats(X: torch.Tensor, node_mask: torch.Tensor | None):
    """Per-channel statistics of `(B, C, n, n)`: diag `(B,C,n)`, row/col means `(B,C,n)`, diag/all means `(B,C)`."""
    B, C, n, _ = X.shape
    if node_mask is None:
        count = X.new_full((B, 1), float(n))
        Xm = X
    else:
        m = node_mask.to(X.dtype)
        pair = (m[:, :, None] * m[:, None, :]).bool()[:, None]
        Xm = X.masked_fill(~pair, 0.0)  # where, not multiply: padding may hold anything
        count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    diag = Xm.diagonal(dim1=-2, dim2=-1)
    row = Xm.sum(dim=-1) / count[:, :, None]
    col = Xm.sum(dim=-2) / count[:, :, None]
    diag_mean = diag.sum(dim=-1) / count
    all_mean = Xm.sum(dim=(-1, -2)) / count**2
    return Xm, diag, row, col, diag_mean, all_mean


class IEGNLinear(nn.Module):
    """Linear equivariant 2→2 layer on `(B, C_in, n, n)` tensors with the 15-op basis and two biases.

    Args:
        in_channels (`int`): C_in.
        out_channels (`int`): C_out.
        factorized (`bool`, *optional*, defaults to `True`): compute without materialising the 15 basis tensors
            (same result, O(C_out·n²) memory instead of O(15·C_in·n²)).
    """

    def __init__(self, in_channels: int, out_channels: int, factorized: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factorized = factorized
        # coefficient of (input channel, basis op) -> output channel; std as in the reference code
        self.weight = nn.Parameter(torch.empty(in_channels, NUM_BASIS_OPS, out_channels))
        self.bias_all = nn.Parameter(torch.zeros(out_channels))
        self.bias_diag = nn.Parameter(torch.zeros(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / (self.in_channels + self.out_channels)))
            self.bias_all.zero_()
            self.bias_diag.zero_()

    def basis(self, X: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The 15 basis tensors, `(B, C, n, n)` -> `(B, C, 15, n, n)`."""
        Xm, diag, row, col, diag_mean, all_mean = _masked_stats(X, node_mask)
        B, C, n, _ = X.shape
        full = (B, C, n, n)
        ops = [
            torch.diag_embed(diag),
            torch.diag_embed(diag_mean[..., None].expand(B, C, n)),
            torch.diag_embed(row),
            torch.diag_embed(col),
            torch.diag_embed(all_mean[..., None].expand(B, C, n)),
            row[..., :, None].expand(full),
            row[..., None, :].expand(full),
            col[..., :, None].expand(full),
            col[..., None, :].expand(full),
            diag[..., :, None].expand(full),
            diag[..., None, :].expand(full),
            all_mean[..., None, None].expand(full),
            diag_mean[..., None, None].expand(full),
            Xm,
            Xm.transpose(-1, -2),
        ]
        return torch.stack(ops, dim=2)

    def forward_channels_last(self, h: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
        """The factorised layer on channel-last input, `(B, n, n, C_in)` -> `(B, n, n, C_out)`.

        Same maps as [`forward`], but every term is a plain `(…, C_in) @ (C_in, C_out)` GEMM on contiguous memory and
        the 15 ops are grouped by where they write (diagonal / along i / along j / constant / the two full-size ops).
        The caller guarantees that `h` is zero at padded nodes (as the model's blocks do), so sums need no mask;
        `count` `(B,)` gives the real number of nodes of each graph (defaults to n). Entries at padded nodes of the
        result are *not* zeroed: the caller masks them.
        """
        B, n, _, C = h.shape
        W = self.weight  # (C, 15, C')
        cnt = h.new_full((B,), float(n)) if count is None else count.to(h.dtype).clamp_min(1.0)
        inv = (1.0 / cnt)[:, None, None]  # (B, 1, 1)
        diag = h.diagonal(dim1=1, dim2=2).transpose(1, 2)  # (B, n, C): X[i, i]
        row = h.sum(dim=2) * inv  # (B, n, C): mean over j of X[i, j]
        col = h.sum(dim=1) * inv  # (B, n, C): mean over i of X[i, j]
        diag_mean = diag.sum(dim=1) * inv[:, 0]  # (B, C)
        all_mean = row.sum(dim=1) * inv[:, 0]  # (B, C): Σ X / n²
        node_stats = torch.cat((diag, row, col), dim=-1)  # (B, n, 3C)
        graph_stats = torch.cat((diag_mean, all_mean), dim=-1)  # (B, 2C)
        # weight blocks in the (diag, row, col) / (diag_mean, all_mean) order of the stats above; op numbering as in
        # `basis`: 0-4 on the diagonal, 5/7/9 along i, 6/8/10 along j, 11-12 constant, 13-14 X and Xᵀ
        w_on_diag = torch.cat((W[:, 0], W[:, 2], W[:, 3]), dim=0)
        w_on_diag_graph = torch.cat((W[:, 1], W[:, 4]), dim=0)
        w_along_i = torch.cat((W[:, 9], W[:, 5], W[:, 7]), dim=0)
        w_along_j = torch.cat((W[:, 10], W[:, 6], W[:, 8]), dim=0)
        w_const = torch.cat((W[:, 12], W[:, 11]), dim=0)
        on_diag = node_stats @ w_on_diag + (graph_stats @ w_on_diag_graph + self.bias_diag)[:, None, :]  # (B, n, C')
        along_i = node_stats @ w_along_i + (graph_stats @ w_const + self.bias_all)[:, None, :]  # (B, n, C')
        along_j = node_stats @ w_along_j
        # X[i, j] and X[j, i] terms as one (…, C) @ (C, 2C') GEMM (h read once, one saved input for both)
        out = add_transposed_halves(h @ torch.cat((W[:, 13], W[:, 14]), dim=1))  # (B, n, n, C'), a fresh buffer
        # the broadcasts go in place (no full-size temporaries)
        out.add_(along_i[:, :, None, :]).add_(along_j[:, None, :, :])
        out.diagonal(dim1=1, dim2=2).add_(on_diag.transpose(1, 2))  # in place: no full-size diag_embed tensor
        return out

    def forward(self, X: torch.Tensor, node_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, C_in, n, n)` (+ optional `(B, n)` node mask) -> `(B, C_out, n, n)`; padded entries are zero."""
        n = X.shape[-1]
        if not self.factorized:
            out = torch.einsum("bcknm,cko->bonm", self.basis(X, node_mask), self.weight)
        else:
            Xm, diag, row, col, diag_mean, all_mean = _masked_stats(X, node_mask)
            W = self.weight  # (C, 15, C')
            on_diag = (
                torch.einsum("bcn,co->bon", diag, W[:, 0])
                + torch.einsum("bc,co->bo", diag_mean, W[:, 1])[..., None]
                + torch.einsum("bcn,co->bon", row, W[:, 2])
                + torch.einsum("bcn,co->bon", col, W[:, 3])
                + torch.einsum("bc,co->bo", all_mean, W[:, 4])[..., None]
            )  # (B, C', n)
            along_i = (  # depends on the row index i only
                torch.einsum("bcn,co->bon", row, W[:, 5])
                + torch.einsum("bcn,co->bon", col, W[:, 7])
                + torch.einsum("bcn,co->bon", diag, W[:, 9])
            )
            along_j = (
                torch.einsum("bcn,co->bon", row, W[:, 6])
                + torch.einsum("bcn,co->bon", col, W[:, 8])
                + torch.einsum("bcn,co->bon", diag, W[:, 10])
            )
            const = torch.einsum("bc,co->bo", all_mean, W[:, 11]) + torch.einsum("bc,co->bo", diag_mean, W[:, 12])
            out = torch.einsum("bcij,co->boij", Xm, W[:, 13]) + torch.einsum("bcji,co->boij", Xm, W[:, 14])
            out = out + along_i[..., :, None] + along_j[..., None, :] + const[..., None, None]
            out = out + torch.diag_embed(on_diag)
        out = out + self.bias_all[None, :, None, None]
        out = out + torch.diag_embed(self.bias_diag[None, :, None].expand(out.shape[0], -1, n))
        if node_mask is not None:
            m = node_mask.bool()
            out = out.masked_fill(~(m[:, None, :, None] & m[:, None, None, :]), 0.0)
        return out
