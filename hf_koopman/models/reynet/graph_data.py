"""ReyNet inputs: the `(C, n, n)` graph tensor of one graph, and a collator that pads graphs of different sizes.

[`build_graph_tensor`] turns an edge list or an adjacency matrix plus node labels / features into the dense tensor
the models read (the IEGN / ReyNet layout of the reference checkpoints); [`ReyNetGraphCollator`] pads a list of them
into `graph_tensor (B, C, n_max, n_max)` and `node_mask (B, n_max)` for `Trainer` or a `DataLoader`. Imports only
torch (this file ships with the Hub remote code, like the other files of this folder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


__all__ = ["build_graph_tensor", "ReyNetGraphCollator"]

_LABEL_KEYS = ("labels", "label", "label_ids")  # the names transformers' default collator accepts


# ----------------------------------------------------------------------------------------------------------------------
# one graph -> (C, n, n)
# ----------------------------------------------------------------------------------------------------------------------
def _num_nodes(num_nodes: int | None, adjacency, node_labels, node_features) -> int:
    """n from the first source that gives it: `num_nodes`, the adjacency, the node labels or the node features."""
    if num_nodes is not None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        return num_nodes
    for source in (adjacency, node_labels, node_features):
        if source is not None:
            return len(source)
    raise ValueError(
        "build_graph_tensor cannot tell the number of nodes from an edge list alone (isolated nodes have no edge); "
        "pass num_nodes=..., node_labels or node_features."
    )


def _edge_adjacency(edge_index, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric 0/1 adjacency `(n, n)` of an undirected edge list `(2, E)` (sources, targets)."""
    edges = torch.as_tensor(edge_index)
    A = torch.zeros(n, n, dtype=dtype)
    if edges.numel() == 0:
        return A
    if edges.dim() != 2 or edges.shape[0] != 2 or edges.is_floating_point():
        raise ValueError(
            f"edge_index must be an integer tensor of shape (2, E) (row 0 sources, row 1 targets), got "
            f"{edges.dtype} of shape {tuple(edges.shape)}; a list of (u, v) pairs of shape (E, 2) needs a transpose."
        )
    if int(edges.min()) < 0 or int(edges.max()) >= n:
        raise ValueError(f"edge_index refers to nodes outside [0, {n}): min {int(edges.min())}, max {int(edges.max())}")
    A[edges[0], edges[1]] = 1.0
    return torch.maximum(A, A.T)  # undirected: one direction per edge is enough


def _node_channels(node_labels, num_node_labels: int | None, node_features, n: int, dtype) -> torch.Tensor | None:
    """Per-node values `(n, F)` for the diagonals: one-hot `node_labels` or `node_features` (None: neither)."""
    if node_labels is not None and node_features is not None:
        raise ValueError("pass node_labels (integer classes, one-hot encoded) or node_features (n, F), not both")
    if node_labels is not None:
        labels = torch.as_tensor(node_labels)
        if num_node_labels is None:
            raise ValueError(
                "node_labels needs num_node_labels (the number of node classes of the data set, which fixes the "
                "channel count C = num_node_labels + 1 whatever labels this graph happens to have)"
            )
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(
                f"node_labels must be {n} integers (one per node), got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_node_labels):
            raise ValueError(f"node_labels must lie in [0, num_node_labels={num_node_labels}), got {labels.tolist()}")
        return torch.nn.functional.one_hot(labels.long(), num_node_labels).to(dtype)
    if node_features is not None:
        feats = torch.as_tensor(node_features, dtype=dtype)
        if feats.dim() != 2 or feats.shape[0] != n:
            raise ValueError(f"node_features must have shape (n, F) = ({n}, F), got {tuple(feats.shape)}")
        return feats
    return None


def _normalise(A: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the column sums (degrees of an undirected graph); isolated nodes keep zero rows."""
    deg = A.sum(dim=0)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv_sqrt[:, None] * A * inv_sqrt[None, :]


def build_graph_tensor(
    edge_index: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    num_nodes: int | None = None,
    adjacency: torch.Tensor | None = None,
    node_labels: torch.Tensor | Sequence[int] | None = None,
    num_node_labels: int | None = None,
    node_features: torch.Tensor | None = None,
    normalize: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""The dense graph tensor `(1 + F, n, n)` of one graph, the input layout of ReyNet / IEGN graph classifiers.

    Channel 0 is the adjacency; channel `1 + f` is the adjacency plus node feature `f` on its diagonal. With
    `node_labels` the features are their one-hot encoding (F = `num_node_labels`): this is exactly the input of the
    TU-benchmark checkpoints (e.g. `reynet-mutag`, `C = num_node_labels + 1`).

    Args:
        edge_index (`torch.LongTensor` of shape `(2, E)` or a nested list, *optional*):
            Undirected edges, row 0 sources and row 1 targets (one direction per edge suffices). Give this or
            `adjacency`.
        num_nodes (`int`, *optional*): n; needed with `edge_index` unless `node_labels` / `node_features` give it.
        adjacency (`torch.Tensor` of shape `(n, n)`, *optional*): a (weighted, possibly directed) adjacency, used as is.
        node_labels (`torch.LongTensor` of shape `(n,)`, *optional*): integer node classes in `[0, num_node_labels)`.
        num_node_labels (`int`, *optional*): number of node classes of the data set (required with `node_labels`).
        node_features (`torch.FloatTensor` of shape `(n, F)`, *optional*): real-valued node features instead.
        normalize (`bool`, *optional*, defaults to `True`): use D^-1/2 A D^-1/2 (D: column sums) instead of A.
        dtype (`torch.dtype`, *optional*): defaults to `torch.get_default_dtype()`.

    Returns:
        `torch.Tensor` of shape `(1 + F, n, n)` (`(1, n, n)` without node labels or features).

    Example:

    ```python
    >>> from hf_koopman.models.reynet import build_graph_tensor
    >>> build_graph_tensor([[0, 1], [1, 2]], node_labels=[0, 2, 1], num_node_labels=3).shape  # path 0-1-2
    torch.Size([4, 3, 3])
    ```
    """
    if (edge_index is None) == (adjacency is None):
        raise ValueError("build_graph_tensor needs exactly one of edge_index (2, E) and adjacency (n, n)")
    dtype = dtype or torch.get_default_dtype()
    n = _num_nodes(num_nodes, adjacency, node_labels, node_features)
    if adjacency is not None:
        A = torch.as_tensor(adjacency).to(dtype)
        if A.shape != (n, n):
            raise ValueError(f"adjacency must have shape (n, n) = ({n}, {n}), got {tuple(A.shape)}")
    else:
        A = _edge_adjacency(edge_index, n, dtype)
    if normalize:
        A = _normalise(A)
    feats = _node_channels(node_labels, num_node_labels, node_features, n, dtype)
    if feats is None:
        return A[None].clone()
    T = A[None].repeat(1 + feats.shape[1], 1, 1)
    T[1:].diagonal(dim1=1, dim2=2).add_(feats.T)  # feature f of node i at (1 + f, i, i)
    return T


# ----------------------------------------------------------------------------------------------------------------------
# batches of graphs of different sizes
# ----------------------------------------------------------------------------------------------------------------------
def _graph_of(feature: Mapping[str, object], i: int) -> torch.Tensor:
    """Item `i`'s `graph_tensor` `(C, n, n)` as a floating-point tensor."""
    if "graph_tensor" not in feature:
        raise ValueError(f"item {i} has no 'graph_tensor' (keys {sorted(feature)}); build it with build_graph_tensor")
    t = torch.as_tensor(feature["graph_tensor"])
    if t.dim() != 3 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"item {i}: graph_tensor must have shape (C, n, n), got {tuple(t.shape)}")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _node_mask_of(feature: Mapping[str, object], m: int, i: int) -> torch.Tensor | bool:
    """Item `i`'s own `node_mask` `(n_i,)`, or True (every node real) when it has none."""
    if feature.get("node_mask") is None:
        return True
    own = torch.as_tensor(feature["node_mask"]).bool()
    if own.shape != (m,):
        raise ValueError(f"item {i}: node_mask must have shape (n_i,) = ({m},) like its graph_tensor, got "
                         f"{tuple(own.shape)}")
    return own


def _label_of(feature: Mapping[str, object]):
    for key in _LABEL_KEYS:
        if feature.get(key) is not None:
            return feature[key]
    return None


def _pad_square(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the last two dims of `(..., m, m)` to `(..., n, n)`."""
    m = t.shape[-1]
    return torch.nn.functional.pad(t, (0, n - m, 0, n - m))


def _holds_text(value: object) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    # a NumPy array of strings, bytes or objects, duck-typed: this file imports torch and transformers only
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if isinstance(kind, str) and hasattr(value, "tolist"):
        return kind in "US" or (kind == "O" and _holds_text(value.tolist()))
    return isinstance(value, (list, tuple)) and any(_holds_text(v) for v in value)


def _label_tensor(label: object, index: int) -> torch.Tensor:
    """`torch.as_tensor(label)`, refusing class names with the mapping to make."""
    if _holds_text(label):
        raise TypeError(
            f"item {index} of the batch has the label {label!r}: labels must be numbers (class indices, regression "
            "targets); map class names to indices first, e.g. with config.label2id, or "
            "dataset.class_encode_column('label') for a datasets.Dataset"
        )
    return torch.as_tensor(label)


def _stack_labels(labels: list, sizes: list[int], n: int) -> torch.Tensor:
    """Labels of a batch: scalars -> `(B,)`, vectors -> `(B, T)`, per-graph matrices `(…, n_i, n_i)` -> padded
    `(B, …, n, n)` (targets of [`ReyNetForEquivariantRegression`], whose loss ignores the padded entries)."""
    tensors = [_label_tensor(label, i) for i, label in enumerate(labels)]
    if all(t.dim() >= 2 and t.shape[-2:] == (m, m) for t, m in zip(tensors, sizes)):
        tensors = [_pad_square(t, n) for t in tensors]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            "labels of one batch must share a shape (or be (..., n_i, n_i) matrices of each graph), got "
            f"{sorted(shapes)}"
        )
    return torch.stack(tensors)


@dataclass
class ReyNetGraphCollator:
    """Pads graphs of different sizes into one batch for `Trainer` (`data_collator=`) or a `DataLoader`.

    Each item is a mapping with `graph_tensor` `(C, n_i, n_i)` (tensor, array or nested list; see
    [`build_graph_tensor`]), optionally `node_mask` `(n_i,)` (False marks nodes that are already padding) and a label
    under `labels` (or `label` / `label_ids`, as for transformers' default collator). Other keys are ignored.

    Returns `{"graph_tensor": (B, C, n_max, n_max), "node_mask": (B, n_max) bool, "labels": ...}`: graph tensors are
    zero-padded at the end, `node_mask` marks real nodes, and labels (present when every item has one) are stacked to
    `(B,)` / `(B, T)`, or padded to `(B, …, n_max, n_max)` when they are per-graph matrices. The models ignore padded
    nodes, so a padded graph gives the outputs of the graph alone.

    Args:
        pad_to_multiple_of (`int`, *optional*): round n_max up to a multiple of this (fewer distinct shapes, e.g. for
            `torch.compile`; also what lets `Trainer.evaluate` / `predict` concatenate the `(B, T, n, n)` outputs of
            `ReyNetForEquivariantRegression` across batches, when it is at least the largest graph).
        dtype (`torch.dtype`, *optional*): dtype of `graph_tensor`, that of the model's weights. Defaults to
            `torch.get_default_dtype()` (float32 unless changed), so float64 NumPy arrays become float32; pass
            `dtype=torch.float64` for a model in float64.

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman.models.reynet import ReyNetGraphCollator
    >>> batch = ReyNetGraphCollator()([{"graph_tensor": torch.rand(2, 3, 3), "labels": 0},
    ...                                {"graph_tensor": torch.rand(2, 5, 5), "labels": 1}])
    >>> batch["graph_tensor"].shape, batch["node_mask"].sum(dim=1).tolist()
    (torch.Size([2, 2, 5, 5]), [3, 5])
    ```
    """

    pad_to_multiple_of: int | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        p = self.pad_to_multiple_of
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {p!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {self.dtype!r}")

    def __call__(self, features: Sequence[Mapping[str, object]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("ReyNetGraphCollator got an empty batch")
        graphs = [_graph_of(f, i) for i, f in enumerate(features)]
        C, dtype = graphs[0].shape[0], self.dtype or torch.get_default_dtype()
        sizes = [g.shape[-1] for g in graphs]
        n = max(sizes)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        X = torch.zeros(len(graphs), C, n, n, dtype=dtype)
        mask = torch.zeros(len(graphs), n, dtype=torch.bool)
        for i, (f, g, m) in enumerate(zip(features, graphs, sizes)):
            if g.shape[0] != C:
                raise ValueError(f"every graph_tensor of a batch needs the same channels: item 0 has {C}, item {i} "
                                 f"has {g.shape[0]}")
            X[i, :, :m, :m] = g
            mask[i, :m] = _node_mask_of(f, m, i)
        batch = {"graph_tensor": X, "node_mask": mask}
        labels = [_label_of(f) for f in features]
        if any(label is not None for label in labels):
            if any(label is None for label in labels):
                raise ValueError("some items of the batch have a label and some do not; label every item or none")
            batch["labels"] = _stack_labels(labels, sizes, n)
        return batch
