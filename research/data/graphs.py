"""TU graph benchmarks (MUTAG, PROTEINS, NCI109, ...) as dense 2-tensors for ReyNet / IEGN, with padding collation.

Reads the one-file GIN format (first line: number of graphs; per graph a line "n label", then n lines
"node_label k nbr_1 ... nbr_k [extra attributes ignored]", neighbours 0-based within the graph). The tensor follows
the IEGN / ReyNet reference pipeline (Maron et al. 2019, `data_helper.py`):

* channel 0 = D^{-1/2} A D^{-1/2} (isolated nodes get 0),
* channels 1..L = one-hot node labels on the diagonal, **plus** the normalised adjacency (the reference code adds it
  to every label channel; kept for comparability),

so `in_channels = L + 1`. Graphs of different sizes are padded to the largest graph in a batch and come with a
`node_mask`. The data directory is always passed in (or read from `$HF_KOOPMAN_DATA`), never hard-coded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from research.data.data_dir import resolve_data_dir


__all__ = [
    "GraphRecord",
    "GraphDataset",
    "load_gin_graphs",
    "graph_to_tensor",
    "collate_graphs",
    "stratified_kfold",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)


@dataclass
class GraphRecord:
    """One graph: `num_nodes`, integer class `label`, `node_labels` `(n,)` and directed `edges` `(2, m)` (long)."""

    num_nodes: int
    label: int
    node_labels: torch.Tensor
    edges: torch.Tensor


def load_gin_graphs(data_dir: str | os.PathLike | None, name: str) -> tuple[list[GraphRecord], int, int]:
    """Parse `<data_dir>/graphs/<name>/<name>.txt` (GIN one-file format).

    Graph labels and node labels are re-indexed to `0..K−1` in sorted order of their original values.

    Returns:
        `(graphs, num_classes, num_node_labels)`.
    """
    path = resolve_data_dir(data_dir) / "graphs" / name / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"{path} not found: expected the GIN one-file format for dataset {name!r}")
    lines = path.read_text(encoding="utf-8").split("\n")
    pos = 0

    def next_line() -> list[int]:
        nonlocal pos
        while pos < len(lines) and not lines[pos].strip():
            pos += 1
        if pos >= len(lines):
            raise ValueError(f"{path}: unexpected end of file")
        parts = lines[pos].split()
        pos += 1
        return [int(float(p)) for p in parts]

    num_graphs = next_line()[0]
    raw = []
    for g in range(num_graphs):
        n, label = next_line()[:2]
        node_labels, src, dst = [], [], []
        for v in range(n):
            row = next_line()
            node_labels.append(row[0])
            k = row[1]
            nbrs = row[2 : 2 + k]
            if len(nbrs) != k or any(not 0 <= u < n for u in nbrs):
                raise ValueError(f"{path}: graph {g}, node {v}: malformed neighbour list {row}")
            src.extend([v] * k)
            dst.extend(nbrs)
        raw.append((n, label, node_labels, src, dst))

    label_ids = {v: i for i, v in enumerate(sorted({r[1] for r in raw}))}
    node_ids = {v: i for i, v in enumerate(sorted({x for r in raw for x in r[2]}))}
    graphs = [
        GraphRecord(
            num_nodes=n,
            label=label_ids[label],
            node_labels=torch.tensor([node_ids[x] for x in nl], dtype=torch.long),
            edges=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        )
        for n, label, nl, src, dst in raw
    ]
    logger.info("%s: %d graphs, %d classes, %d node labels", name, len(graphs), len(label_ids), len(node_ids))
    return graphs, len(label_ids), len(node_ids)


def graph_to_tensor(graph: GraphRecord, num_node_labels: int) -> torch.Tensor:
    """Dense `(num_node_labels + 1, n, n)` float tensor of one graph (see the module docstring)."""
    n = graph.num_nodes
    A = torch.zeros(n, n)
    if graph.edges.numel():
        A[graph.edges[0], graph.edges[1]] = 1.0
        A = torch.maximum(A, A.T)  # the files list both directions; be robust to one-sided lists
    deg = A.sum(dim=0)  # column sums, as in the reference
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    A_norm = inv_sqrt[:, None] * A * inv_sqrt[None, :]
    T = A_norm[None].repeat(num_node_labels + 1, 1, 1)
    idx = torch.arange(n)
    T[graph.node_labels + 1, idx, idx] += 1.0
    return T


class GraphDataset(torch.utils.data.Dataset):
    """Items `{"graph_tensor": (C, n, n), "labels": int}` for the Trainer or a `DataLoader` with [`collate_graphs`]."""

    def __init__(self, graphs: Sequence[GraphRecord], num_node_labels: int) -> None:
        self.tensors = [graph_to_tensor(g, num_node_labels) for g in graphs]
        self.labels = [g.label for g in graphs]
        self.sizes = [g.num_nodes for g in graphs]

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> dict:
        return {"graph_tensor": self.tensors[i], "labels": self.labels[i]}


def collate_graphs(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad `(C, n_i, n_i)` graph tensors to the largest n in the batch.

    Returns:
        `{"graph_tensor": (B, C, n, n), "node_mask": (B, n) bool, "labels": (B,)}` (labels only if every item has one).
    """
    if not items:
        raise ValueError("collate_graphs got an empty batch")
    n = max(it["graph_tensor"].shape[-1] for it in items)
    C = items[0]["graph_tensor"].shape[0]
    X = torch.zeros(len(items), C, n, n)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, it in enumerate(items):
        t = it["graph_tensor"]
        if t.shape[0] != C:
            raise ValueError(f"all graph tensors need {C} channels, item {i} has {t.shape[0]}")
        m = t.shape[-1]
        X[i, :, :m, :m] = t
        mask[i, :m] = True
    batch = {"graph_tensor": X, "node_mask": mask}
    if all("labels" in it for it in items):
        batch["labels"] = torch.as_tensor([it["labels"] for it in items])
    return batch


def stratified_kfold(labels: Sequence[int], num_folds: int = 10, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Seeded stratified k-fold split: `[(train_indices, test_indices)] * num_folds`.

    Each class's indices are shuffled with `torch.Generator().manual_seed(seed)` and dealt round-robin to the folds, so
    class proportions match in every fold (no standard split files ship with the offline data). It is not
    `sklearn.model_selection.StratifiedKFold`: the assignment fixes which graphs every recorded ReyNet run in
    `results/` trained and tested on, and scikit-learn deals the folds differently, so switching would change every
    split of that evidence.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(list(labels))
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for c in torch.unique(labels_t).tolist():
        idx = torch.nonzero(labels_t == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        for j, i in enumerate(idx):
            folds[(j + offset) % num_folds].append(i)
        offset += len(idx)  # continue dealing where the previous class stopped: balanced fold sizes
    out = []
    for k in range(num_folds):
        test = sorted(folds[k])
        test_set = set(test)
        train = [i for i in range(len(labels_t)) if i not in test_set]
        out.append((train, test))
    return out
