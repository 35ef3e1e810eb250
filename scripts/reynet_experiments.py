"""Experiment building blocks for `scripts/train_reynet.py`: synthetic tasks, graph CV, baselines, training loops.

Kept out of the package: these are the paper-reproduction protocols, not library API.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_koopman.datasets.graphs import GraphDataset, collate_graphs, load_gin_graphs, stratified_kfold
from hf_koopman.models.reynet import (
    ReyNetConfig,
    ReyNetForEquivariantRegression,
    ReyNetForGraphClassification,
    ReyNetForInvariantRegression,
)


__all__ = [
    "SYNTHETIC_TASKS",
    "train_graph_classifier",
    "mean_std",
    "make_synthetic",
    "MLPBaseline",
    "synthetic_model",
    "train_regression",
    "evaluate_mse",
    "GraphProtocol",
    "run_graph_cv",
    "graph_model",
]

logger = logging.getLogger(__name__)

# task -> (equivariant?, target function of X (N, n, n))
SYNTHETIC_TASKS: dict[str, tuple[bool, Callable[[torch.Tensor], torch.Tensor]]] = {
    "symmetry": (True, lambda X: 0.5 * (X + X.transpose(-1, -2))),
    "diagonal": (True, lambda X: torch.diag_embed(X.diagonal(dim1=-2, dim2=-1))),
    "power": (True, lambda X: X.pow(2)),  # element-wise square, as in the paper's code
    "trace": (False, lambda X: X.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)),
}


def make_synthetic(task: str, num: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`X (num, 1, n, n)` with i.i.d. U(0, 10) entries and the task's target (`(num, 1, n, n)` or `(num, 1)`)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(SYNTHETIC_TASKS)}")
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(num, n, n, generator=gen) * 10.0
    equivariant, fn = SYNTHETIC_TASKS[task]
    Y = fn(X)
    return X[:, None], (Y[:, None] if equivariant else Y)


class MLPBaseline(nn.Module):
    """The paper's FNN: `Linear(n², 128) → ReLU → Linear(128, n²)` (or `→ 1` for invariant targets). Fixed n."""

    def __init__(self, n: int, out_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.n = n
        self.net = nn.Sequential(nn.Linear(n * n, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, graph_tensor: torch.Tensor) -> torch.Tensor:
        if graph_tensor.shape[-1] != self.n:
            raise ValueError(f"the MLP baseline is built for n={self.n}, got n={graph_tensor.shape[-1]}")
        out = self.net(graph_tensor.flatten(1))
        return out.reshape(graph_tensor.shape) if out.shape[1] == self.n * self.n else out


def synthetic_model(kind: str, task: str, n: int) -> nn.Module:
    """The three contenders of the synthetic experiment (widths from the paper's code, see the research notes)."""
    equivariant = SYNTHETIC_TASKS[task][0]
    if kind == "mlp":
        return MLPBaseline(n, n * n if equivariant else 1)
    if kind == "reynet":
        if equivariant:  # ReyEquiv2to2(1, set_layers=[128], channel_layers=[1]) + linear read-out
            cfg = ReyNetConfig(phi_hidden_sizes=[128], skip_connection=False, channel_hidden_sizes=[])
            return ReyNetForEquivariantRegression(cfg)
        cfg = ReyNetConfig(phi_hidden_sizes=[128], channel_hidden_sizes=[64], head_hidden_sizes=[128], skip_connection=False)
        return ReyNetForInvariantRegression(cfg)
    if kind == "iegn":
        if equivariant:  # MaronEquivNet2to2(1, [80]) + linear read-out
            return ReyNetForEquivariantRegression(ReyNetConfig(layer_type="iegn", channel_hidden_sizes=[80]))
        return ReyNetForInvariantRegression(
            ReyNetConfig(layer_type="iegn", channel_hidden_sizes=[64], head_hidden_sizes=[128])
        )
    raise ValueError(f"unknown model kind {kind!r}")


def _predict(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    out = model(graph_tensor=X) if not isinstance(model, MLPBaseline) else model(X)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_regression(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, batch_size: int = 100, lr: float = 1e-3,
    weight_decay: float = 1e-5, seed: int = 0, desc: str = "train",
) -> list[float]:
    """Adam + MSE (the paper's synthetic protocol: lr 1e-3, weight decay 1e-5, batch 100). Returns epoch losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(X), generator=gen)
        total = 0.0
        for s in range(0, len(X), batch_size):
            idx = perm[s : s + batch_size]
            loss = nn.functional.mse_loss(_predict(model, X[idx]), Y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite training loss {loss.item()}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(X))
    return history


@torch.no_grad()
def evaluate_mse(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    se = 0.0
    for s in range(0, len(X), batch_size):
        se += nn.functional.mse_loss(_predict(model, X[s : s + batch_size]), Y[s : s + batch_size], reduction="sum").item()
    return se / Y.numel()


# ----------------------------------------------------------------------------------------------------------------------
# graph classification
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class GraphProtocol:
    """Cross-validation protocol. Evaluating only the first `eval_folds[name] < num_folds` folds and few epochs is the
    documented reduced protocol (CPU budget); `--full-protocol` in the script runs all folds and the paper's epochs."""

    num_folds: int = 10
    eval_folds: dict[str, int] = field(default_factory=lambda: {"MUTAG": 10, "PROTEINS": 3, "NCI109": 3})
    epochs: dict[str, int] = field(default_factory=lambda: {"MUTAG": 20, "PROTEINS": 3, "NCI109": 3})
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    reynet: dict = field(
        default_factory=lambda: {
            "phi_mode": "joint", "phi_hidden_sizes": [32], "reynolds_channels": 16,
            "channel_hidden_sizes": [32, 64], "head_hidden_sizes": [64],
        }
    )
    iegn: dict = field(default_factory=lambda: {"channel_hidden_sizes": [16, 32, 64], "head_hidden_sizes": [64]})


def graph_model(kind: str, in_channels: int, num_classes: int, protocol: GraphProtocol) -> ReyNetForGraphClassification:
    extra = protocol.reynet if kind == "reynet" else {**protocol.iegn, "layer_type": "iegn"}
    cfg = ReyNetConfig(in_channels=in_channels, num_labels=num_classes, **extra)
    return ReyNetForGraphClassification(cfg)


def _size_batches(
    ds: GraphDataset, indices: Sequence[int], batch_size: int, gen: torch.Generator | None, max_pairs: int = 100_000
) -> list:
    """Batches of similar-size graphs (less padding) with at most `batch_size` graphs and `max_pairs` padded node pairs
    (a PROTEINS graph has 620 nodes); batch order shuffled when `gen` is given."""
    order = sorted(indices, key=lambda i: ds.sizes[i])
    if gen is not None:  # shuffle inside equal-size runs by a random tie-break, then shuffle batch order
        noise = torch.rand(len(order), generator=gen).tolist()
        order = [i for _, _, i in sorted(zip([ds.sizes[i] for i in order], noise, order))]
    batches, current = [], []
    for i in order:  # ascending sizes: the newest graph is the largest; cap the padded pair count B·n²
        if current and (len(current) >= batch_size or (len(current) + 1) * ds.sizes[i] ** 2 > max_pairs):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if gen is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


@torch.no_grad()
def _accuracy(model: nn.Module, ds: GraphDataset, indices: Sequence[int], batch_size: int) -> float:
    model.eval()
    correct = 0
    for b in _size_batches(ds, indices, batch_size, None):
        batch = collate_graphs([ds[i] for i in b])
        pred = model(graph_tensor=batch["graph_tensor"], node_mask=batch["node_mask"]).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
    return correct / len(indices)


def train_graph_classifier(
    model: ReyNetForGraphClassification, ds: GraphDataset, train_idx: Sequence[int], *, epochs: int, lr: float,
    batch_size: int, seed: int, desc: str,
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        model.train()
        total, count = 0.0, 0
        for b in _size_batches(ds, train_idx, batch_size, gen):
            batch = collate_graphs([ds[i] for i in b])
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            count += len(b)
        history.append(total / count)
    return history


def run_graph_cv(
    data_dir, name: str, protocol: GraphProtocol, kinds: Sequence[str] = ("reynet", "iegn"),
    on_fold: Callable[[dict], None] | None = None, previous: dict | None = None,
) -> dict:
    """Seeded stratified k-fold CV of each model kind on one TU dataset; per-fold accuracies and CPU time.

    Folds are the outer loop (every kind is trained on fold k before fold k+1 starts), so a run stopped early still has
    paired results; `on_fold(result)` is called after every fold with the partial result (to save progress).
    `previous` (a result of an interrupted or shorter run with the same protocol) resumes: its folds are kept.
    """
    graphs, num_classes, num_node_labels = load_gin_graphs(data_dir, name)
    ds = GraphDataset(graphs, num_node_labels)
    folds = stratified_kfold(ds.labels, protocol.num_folds, protocol.seed)[: protocol.eval_folds.get(name, protocol.num_folds)]
    epochs = protocol.epochs[name]
    result: dict = {"dataset": name, "num_graphs": len(ds), "num_classes": num_classes, "in_channels": num_node_labels + 1,
                    "epochs": epochs, "num_folds": protocol.num_folds, "eval_folds": 0,
                    "models": {kind: {"fold_accuracies": [], "cpu_seconds": 0.0} for kind in kinds}}
    done = 0
    if previous is not None:
        if previous.get("epochs") != epochs or previous.get("num_folds") != protocol.num_folds:
            raise ValueError(f"{name}: cannot resume a run with different epochs/num_folds")
        result["models"] = previous["models"]
        done = previous["eval_folds"]
        result["eval_folds"] = done
        logger.info("%s: resuming after %d completed folds", name, done)
    for k, (train_idx, test_idx) in enumerate(folds):
        if k < done:
            continue
        for kind in kinds:
            torch.manual_seed(protocol.seed + k)
            model = graph_model(kind, num_node_labels + 1, num_classes, protocol)
            entry = result["models"][kind]
            entry["num_parameters"] = sum(p.numel() for p in model.parameters())
            t0 = time.process_time()
            train_graph_classifier(model, ds, train_idx, epochs=epochs, lr=protocol.lr, batch_size=protocol.batch_size,
                                   seed=protocol.seed + k, desc=f"{name}/{kind}/fold{k}")
            acc = _accuracy(model, ds, test_idx, protocol.batch_size)
            entry["cpu_seconds"] += time.process_time() - t0
            entry["fold_accuracies"].append(acc)
            entry["mean"], entry["std"] = mean_std(entry["fold_accuracies"])
            logger.info("%s %s fold %d: accuracy %.4f", name, kind, k, acc)
        result["eval_folds"] = k + 1
        if on_fold is not None:
            on_fold(result)
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), (float(t.std(unbiased=False)) if len(values) > 1 else 0.0)


def fmt_mse(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}"
