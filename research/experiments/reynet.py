"""ReyNet study protocols: synthetic tasks, graph cross-validation, baselines and training loops.

Used by `research.scripts.train_reynet`, `research.scripts.reynet_fit_check`, `research.scripts.reynet_lr_pilot` and
`benchmarks/bench_reynet.py`; these are the paper-reproduction protocols, not library API.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from research.data.graphs import GraphDataset, collate_graphs, load_gin_graphs, stratified_kfold
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
    "best_common_epoch",
    "run_graph_cv",
    "graph_model",
    "validation_split",
    "outcome_paragraph",
    "select_readouts",
    "READOUT_CRITERION",
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
    """Cross-validation protocol for TU graph classification (both models get exactly the same treatment).

    All `num_folds` folds are trained in lock-step, epoch by epoch (every fold and model finishes epoch e before any
    starts epoch e + 1), so a run stopped at a wall-clock deadline still has every fold at one common epoch count. The
    learning-rate schedule is a step decay that does not depend on the total number of epochs (Adam, lr × `lr_gamma`
    every `lr_step_epochs[name]` epochs), so stopping after e epochs gives exactly the run that was planned for e
    epochs. Test accuracy is recorded after every epoch (model selection is *not* done per fold, see
    [`best_common_epoch`]).
    """

    num_folds: int = 10
    eval_folds: dict[str, int] = field(default_factory=dict)  # first K folds only (smoke tests); default all
    # these outer folds only (one process per fold subset on a multi-core machine; `merge_fold_runs` joins them).
    # Seeds follow the fold index, so fold k gets the same split, init and batch order as in a run of all folds.
    fold_ids: list[int] | None = None
    epochs: dict[str, int] = field(default_factory=lambda: {"MUTAG": 60, "PROTEINS": 20, "NCI109": 20})  # maxima
    lr: float = 1e-3
    lr_gamma: float = 0.5
    lr_step_epochs: dict[str, int] = field(default_factory=lambda: {"MUTAG": 15, "PROTEINS": 5, "NCI109": 5})
    batch_size: int = 16
    seed: int = 0
    reynet: dict = field(
        default_factory=lambda: {
            "phi_mode": "joint", "phi_hidden_sizes": [32], "reynolds_channels": 16,
            "channel_hidden_sizes": [32, 64], "head_hidden_sizes": [64],
        }
    )
    iegn: dict = field(default_factory=lambda: {"channel_hidden_sizes": [16, 32, 64], "head_hidden_sizes": [64]})

    def step_epochs(self, name: str) -> int:
        return self.lr_step_epochs.get(name, max(1, self.epochs[name] // 4))

    def schedule(self, name: str) -> str:
        return (f"Adam lr {self.lr}, ×{self.lr_gamma} every {self.step_epochs(name)} epochs (StepLR), batch "
                f"{self.batch_size} size-bucketed graphs, no weight decay")


# The pair-design ReyNet at about IEGN's parameter count on NCI109 (~51k against IEGN's 56k; the main table's ReyNet
# has 18k): φ 4C → 96 → 2·32, channel MLP [64, 128]. Used by the fit check and the width pilot.
REYNET_WIDE = {"phi_hidden_sizes": [96], "reynolds_channels": 32, "channel_hidden_sizes": [64, 128]}


def graph_model(
    kind: str, in_channels: int, num_classes: int, protocol: GraphProtocol, pooling: str | None = None
) -> ReyNetForGraphClassification:
    """The `kind` ("reynet" / "iegn") classifier of the protocol; `pooling` overrides the readout of its config."""
    extra = protocol.reynet if kind == "reynet" else {**protocol.iegn, "layer_type": "iegn"}
    if pooling is not None:
        extra = {**extra, "pooling": pooling}
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


def _collate(ds: GraphDataset, b: Sequence[int], device: torch.device | str) -> dict[str, torch.Tensor]:
    """`collate_graphs` of the graphs `b`, on `device` (batches are built on the CPU, then moved)."""
    return {k: v.to(device) for k, v in collate_graphs([ds[i] for i in b]).items()}


@torch.inference_mode()
def _accuracy(
    model: nn.Module, ds: GraphDataset, indices: Sequence[int], batch_size: int, device: torch.device | str = "cpu"
) -> float:
    model.eval()
    correct = 0
    for b in _size_batches(ds, indices, batch_size, None):
        batch = _collate(ds, b, device)
        pred = model(graph_tensor=batch["graph_tensor"], node_mask=batch["node_mask"]).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
    return correct / len(indices)


@torch.inference_mode()
def _evaluate(model: nn.Module, ds: GraphDataset, indices: Sequence[int], batch_size: int) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on `indices` (the validation split of readout selection)."""
    model.eval()
    correct, loss = 0, 0.0
    for b in _size_batches(ds, indices, batch_size, None):
        batch = collate_graphs([ds[i] for i in b])
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss += float(out.loss) * len(b)
    return correct / len(indices), loss / len(indices)


def _train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, ds: GraphDataset, train_idx: Sequence[int], batch_size: int,
    gen: torch.Generator, desc: str, device: torch.device | str = "cpu",
) -> float:
    """One epoch over size-bucketed batches; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for b in _size_batches(ds, train_idx, batch_size, gen):
        batch = _collate(ds, b, device)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
        count += len(b)
    return total / count


def train_graph_classifier(
    model: ReyNetForGraphClassification, ds: GraphDataset, train_idx: Sequence[int], *, epochs: int, lr: float,
    batch_size: int, seed: int, desc: str, lr_step_epochs: int | None = None, lr_gamma: float = 0.5,
) -> list[float]:
    """Adam (+ optional StepLR) on size-bucketed batches; returns the per-epoch training losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, lr_step_epochs, lr_gamma) if lr_step_epochs else None
    history = []
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        history.append(_train_epoch(model, opt, ds, train_idx, batch_size, gen, desc))
        if sched is not None:
            sched.step()
    return history


def best_common_epoch(per_epoch: Sequence[Sequence[float]]) -> tuple[int, float, float]:
    """The protocol of Maron et al. (2019), also used by the IEGN/PPGN papers: average the test accuracy over folds at
    every epoch and report the best epoch (1-based) with that epoch's mean and std over folds. One epoch is selected
    for all folds together, but on the test folds, so this is optimistic; report the last-epoch accuracy next to it.

    Args:
        per_epoch: `(num_folds, num_epochs)` test accuracies.
    """
    t = torch.tensor([list(r) for r in per_epoch], dtype=torch.float64)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"per_epoch must be a non-empty (folds, epochs) table, got shape {tuple(t.shape)}")
    means = t.mean(dim=0)
    e = int(torch.argmax(means))  # first epoch among ties
    return e + 1, float(means[e]), (float(t[:, e].std(unbiased=False)) if t.shape[0] > 1 else 0.0)


def run_graph_cv(
    data_dir, name: str, protocol: GraphProtocol, kinds: Sequence[str] = ("reynet", "iegn"),
    on_epoch: Callable[[dict], None] | None = None, deadline: float | None = None,
    readouts: Sequence[str] | None = None, val_fraction: float = 0.1, selection_epochs: int | None = None,
    device: str = "cpu",
) -> dict:
    """Seeded stratified k-fold CV of each model kind on one TU dataset, all folds in lock-step.

    With `readouts` (e.g. `("sum", "mean")`), the readout of every (fold, kind) is first chosen by
    [`select_readouts`] on a validation split of the fold's training data; the final model is then trained on the whole
    training fold with the chosen readout and tested on the test fold (the test fold plays no part in the choice).
    Without it, the protocol's configs are used as they are.

    Every (fold, kind) gets its own model (seeded `protocol.seed + fold`, the same init seed for both kinds), Adam,
    StepLR and batch-order generator (seeded `protocol.seed + fold`, so both kinds see the same batches). After every
    epoch each model's test-fold accuracy is recorded and `on_epoch(result)` is called (to save progress). Training
    stops after `protocol.epochs[name]` epochs, or earlier when the next epoch would end after the wall-clock
    `deadline` (a `time.time()` value), estimated from the slowest epoch so far (the first epoch always runs); every
    fold then has the same count.

    `device` ("cpu", "cuda", ...) is where the models train; they are initialised on the CPU under the same seeds
    first, so a GPU run starts from the CPU run's weights and sees its batches (its float arithmetic differs).

    Returns:
        A dict with, per kind, `fold_accuracies` (last epoch), `mean`/`std` (last epoch), `per_epoch_accuracy`
        `(folds, epochs)`, `best_common_epoch` (see [`best_common_epoch`]), `train_loss`, `cpu_seconds` (process
        CPU time), `wall_seconds`.
    """
    if readouts and str(device) != "cpu":
        raise ValueError("readout selection runs on the CPU only; drop --select-readout or --device")
    graphs, num_classes, num_node_labels = load_gin_graphs(data_dir, name)
    ds = GraphDataset(graphs, num_node_labels)
    all_folds = stratified_kfold(ds.labels, protocol.num_folds, protocol.seed)
    ids = fold_indices(protocol, name)
    folds = [all_folds[k] for k in ids]
    max_epochs = protocol.epochs[name]
    result: dict = {
        "dataset": name, "num_graphs": len(ds), "num_classes": num_classes, "in_channels": num_node_labels + 1,
        "epochs": 0, "max_epochs": max_epochs, "schedule": protocol.schedule(name), "num_folds": protocol.num_folds,
        "eval_folds": len(folds), "fold_ids": ids, "stopped_at_deadline": False,
        "fold_sizes": [len(te) for _, te in folds], "device": str(device),
        "models": {kind: {"fold_accuracies": [], "per_epoch_accuracy": [[] for _ in folds],
                          "train_loss": [[] for _ in folds], "cpu_seconds": 0.0, "wall_seconds": 0.0}
                   for kind in kinds},
    }
    chosen: dict = {kind: [None] * len(folds) for kind in kinds}
    if readouts:

        def progress(sel: dict) -> None:
            result["readout_selection"] = sel
            if on_epoch is not None:
                on_epoch(result)

        sel = select_readouts(ds, [tr for tr, _ in folds], protocol, name, num_classes, readouts, kinds=kinds,
                              val_fraction=val_fraction, epochs=selection_epochs, on_epoch=progress, fold_ids=ids)
        result["readout_selection"] = sel
        chosen = {kind: sel["models"][kind]["chosen"] for kind in kinds}
        for kind in kinds:
            result["models"][kind]["readouts"] = chosen[kind]
        logger.info("%s chosen readouts: %s", name, chosen)
    state = {}
    for k, fold in enumerate(ids):
        for kind in kinds:
            torch.manual_seed(protocol.seed + fold)
            model = graph_model(kind, num_node_labels + 1, num_classes, protocol, pooling=chosen[kind][k]).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=protocol.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, protocol.step_epochs(name), protocol.lr_gamma)
            state[k, kind] = (model, opt, sched, torch.Generator().manual_seed(protocol.seed + fold))
            result["models"][kind]["num_parameters"] = sum(p.numel() for p in model.parameters())
    slowest = 0.0
    for epoch in tqdm(range(max_epochs), desc=f"{name} epochs"):
        if deadline is not None and epoch > 0 and time.time() + 1.1 * slowest > deadline:
            logger.warning("%s: stopping after %d epochs (next epoch would pass the deadline)", name, epoch)
            result["stopped_at_deadline"] = True
            break
        t_wall = time.time()
        for k, (train_idx, test_idx) in enumerate(folds):
            for kind in kinds:
                model, opt, sched, gen = state[k, kind]
                entry = result["models"][kind]
                t0, w0 = time.process_time(), time.perf_counter()
                loss = _train_epoch(model, opt, ds, train_idx, protocol.batch_size, gen,
                                    f"{name}/{kind}/fold{ids[k]}", device)
                sched.step()
                acc = _accuracy(model, ds, test_idx, protocol.batch_size, device)
                entry["cpu_seconds"] += time.process_time() - t0
                entry["wall_seconds"] += time.perf_counter() - w0
                entry["train_loss"][k].append(loss)
                entry["per_epoch_accuracy"][k].append(acc)
        slowest = max(slowest, time.time() - t_wall)
        result["epochs"] = epoch + 1
        for kind in kinds:
            _summarise_folds(result["models"][kind])
        logger.info("%s epoch %d: %s", name, epoch + 1,
                    {kind: round(result["models"][kind]["mean"], 4) for kind in kinds})
        if on_epoch is not None:
            on_epoch(result)
    return result


def fold_indices(protocol: GraphProtocol, name: str) -> list[int]:
    """The outer folds a run trains: `protocol.fold_ids` (validated, sorted) or the first `eval_folds[name]`."""
    if protocol.fold_ids is None:
        return list(range(protocol.eval_folds.get(name, protocol.num_folds)))
    ids = sorted(set(protocol.fold_ids))
    if not ids or len(ids) != len(protocol.fold_ids) or any(
        isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < protocol.num_folds for k in ids
    ):
        raise ValueError(f"fold_ids must be distinct fold indices in 0..{protocol.num_folds - 1}, got {protocol.fold_ids}")
    return ids


def merge_fold_runs(parts: Sequence[dict]) -> dict:
    """Join the per-dataset results of runs on disjoint fold subsets (same dataset and settings) into one result.

    Per-fold lists are concatenated in fold order, CPU seconds added, and the fold means, standard deviations and best
    common epoch recomputed. The parts must have trained the same number of epochs (a run stopped at a deadline is
    merged only with parts stopped at the same epoch), so every fold of the merged result has one common count.
    """
    if len(parts) < 2:
        raise ValueError(f"merging needs at least two fold subsets, got {len(parts)}")
    first = parts[0]
    fixed = ("dataset", "num_graphs", "num_classes", "in_channels", "epochs", "max_epochs", "schedule", "num_folds",
             "device")
    for p in parts[1:]:
        diff = [key for key in fixed if p.get(key) != first.get(key)]
        if diff:
            raise ValueError(f"fold subsets disagree on {diff}: they are not parts of one run")
        if set(p["models"]) != set(first["models"]):
            raise ValueError("fold subsets trained different model kinds")
    if any("fold_ids" not in p for p in parts):
        raise ValueError("every part needs its fold_ids (written by run_graph_cv)")
    ids = [k for p in parts for k in p["fold_ids"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"fold subsets overlap: {sorted(ids)}")
    order = sorted(range(len(ids)), key=ids.__getitem__)

    def joined(get) -> list:
        rows = [row for p in parts for row in get(p)]
        return [rows[i] for i in order]

    merged = {key: first[key] for key in fixed if key in first}
    merged.update({
        "eval_folds": len(ids), "fold_ids": sorted(ids), "fold_sizes": joined(lambda p: p["fold_sizes"]),
        "stopped_at_deadline": any(p["stopped_at_deadline"] for p in parts), "models": {},
    })
    if any("truncated_from_epochs" in p for p in parts):  # cut back to a common epoch count by truncate_fold_run
        merged["truncated_from_epochs"] = joined(
            lambda p: [p.get("truncated_from_epochs", p["epochs"])] * len(p["fold_ids"]))
    for kind in first["models"]:
        m = {
            "per_epoch_accuracy": joined(lambda p: p["models"][kind]["per_epoch_accuracy"]),
            "train_loss": joined(lambda p: p["models"][kind]["train_loss"]),
            "cpu_seconds": sum(p["models"][kind]["cpu_seconds"] for p in parts),
            "num_parameters": first["models"][kind]["num_parameters"],
        }
        if all("wall_seconds" in p["models"][kind] for p in parts):
            m["wall_seconds"] = sum(p["models"][kind]["wall_seconds"] for p in parts)
        if "readouts" in first["models"][kind]:
            m["readouts"] = joined(lambda p: p["models"][kind]["readouts"])
        merged["models"][kind] = _summarise_folds(m)
    return merged


def truncate_fold_run(result: dict, epochs: int) -> dict:
    """A copy of one dataset's `run_graph_cv` result cut back to its first `epochs` epochs.

    Fold-subset processes stopped by one wall-clock deadline can end an epoch apart; cutting every part to the
    smallest count gives the run that was planned for that many epochs, because the step schedule does not depend on
    the total. Accuracy curves and training losses are cut exactly; `cpu_seconds` and `wall_seconds` are not recorded
    per epoch, so they are scaled by `epochs / result["epochs"]` (an estimate, flagged as `time_scaled`).
    """
    done = result["epochs"]
    if not 1 <= epochs <= done:
        raise ValueError(f"can cut {result['dataset']} back to 1..{done} epochs, not {epochs}")
    out = json.loads(json.dumps(result))  # deep copy of a JSON-shaped dict
    if epochs == done:
        return out
    out["epochs"] = epochs
    out["truncated_from_epochs"] = done
    for m in out["models"].values():
        m["per_epoch_accuracy"] = [row[:epochs] for row in m["per_epoch_accuracy"]]
        m["train_loss"] = [row[:epochs] for row in m["train_loss"]]
        for key in ("cpu_seconds", "wall_seconds"):
            if key in m:
                m[key] *= epochs / done
        m["time_scaled"] = True
        _summarise_folds(m)
    return out


def _summarise_folds(entry: dict) -> dict:
    """Set a model entry's last-epoch `fold_accuracies`, their `mean`/`std` and its `best_common_epoch` from its
    `per_epoch_accuracy` `(folds, epochs)`; returns the entry."""
    entry["fold_accuracies"] = [row[-1] for row in entry["per_epoch_accuracy"]]
    entry["mean"], entry["std"] = mean_std(entry["fold_accuracies"])
    e, m, sd = best_common_epoch(entry["per_epoch_accuracy"])
    entry["best_common_epoch"] = {"epoch": e, "mean": m, "std": sd}
    return entry


# ----------------------------------------------------------------------------------------------------------------------
# readout selection on a validation split of each training fold (never the test fold)
# ----------------------------------------------------------------------------------------------------------------------
READOUT_CRITERION = (
    "highest validation accuracy after the last selection epoch; ties broken by the lower validation cross-entropy, "
    "then by candidate order"
)


def validation_split(
    train_idx: Sequence[int], labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded stratified split of a training fold into `(inner_train, validation)`, both subsets of `train_idx`.

    Per class, the class's members of `train_idx` are shuffled with `torch.Generator().manual_seed(seed)` and the first
    `round(fraction · count)` of them (at least one when the class has two or more members, never all) go to
    validation. Only `train_idx` and the labels of its members are read.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    if len(train_idx) < 2:
        raise ValueError(f"a training fold of {len(train_idx)} graph(s) cannot be split into train and validation")
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in sorted(train_idx):
        by_class.setdefault(int(labels[i]), []).append(i)
    val: list[int] = []
    for c in sorted(by_class):
        members = by_class[c]
        members = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        take = min(len(members) - 1, max(1 if len(members) >= 2 else 0, round(fraction * len(members))))
        val.extend(members[:take])
    val_set = set(val)
    if not val_set:
        raise ValueError("the validation split is empty: every class has a single training graph")
    return [i for i in sorted(train_idx) if i not in val_set], sorted(val)


def select_readouts(
    ds: GraphDataset, train_folds: Sequence[Sequence[int]], protocol: GraphProtocol, name: str,
    num_classes: int, readouts: Sequence[str], *, kinds: Sequence[str] = ("reynet", "iegn"), val_fraction: float = 0.1,
    epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None, fold_ids: Sequence[int] | None = None,
) -> dict:
    """Choose the readout (pooling) of every (fold, model kind) on a validation split of that fold's training data.

    For outer fold k (`fold_ids`, default 0, 1, ... for the entries of `train_folds`), [`validation_split`] (seed
    `protocol.seed + k`) carves `val_fraction` of its training fold out; every candidate readout is trained on the
    rest with exactly the settings of the final run (init seed `protocol.seed + k`, Adam, StepLR, batch order seed
    `protocol.seed + k`, `epochs` epochs; default the dataset's maximum), all folds,
    kinds and candidates in lock-step. The winner follows [`READOUT_CRITERION`]. Both kinds get the same procedure,
    budget, splits and seeds. This function never sees the test folds: it only receives the training indices.

    Returns:
        `{"candidates", "val_fraction", "epochs", "criterion", "val_sizes", "models": {kind: {"chosen": [per fold],
        "val_accuracy": {readout: (folds, epochs)}, "val_loss": {readout: (folds, epochs)}}}}`.
    """
    if len(readouts) < 1 or len(set(readouts)) != len(readouts):
        raise ValueError(f"readout candidates must be distinct and non-empty, got {list(readouts)}")
    epochs = protocol.epochs[name] if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"selection epochs must be >= 1, got {epochs}")
    in_channels = ds.tensors[0].shape[0]
    fold_ids = list(range(len(train_folds))) if fold_ids is None else list(fold_ids)
    if len(fold_ids) != len(train_folds):
        raise ValueError(f"{len(fold_ids)} fold ids for {len(train_folds)} training folds")
    splits = [validation_split(tr, ds.labels, val_fraction, protocol.seed + fold)
              for fold, tr in zip(fold_ids, train_folds)]
    sel: dict = {
        "candidates": list(readouts), "val_fraction": val_fraction, "epochs": 0, "planned_epochs": epochs,
        "criterion": READOUT_CRITERION, "val_sizes": [len(v) for _, v in splits],
        "models": {kind: {"chosen": [], "val_accuracy": {r: [[] for _ in splits] for r in readouts},
                          "val_loss": {r: [[] for _ in splits] for r in readouts}, "cpu_seconds": 0.0}
                   for kind in kinds},
    }
    state = {}
    for k, fold in enumerate(fold_ids):
        for kind in kinds:
            for r in readouts:
                torch.manual_seed(protocol.seed + fold)  # the same init as the final run of that fold
                model = graph_model(kind, in_channels, num_classes, protocol, pooling=r)
                opt = torch.optim.Adam(model.parameters(), lr=protocol.lr)
                sched = torch.optim.lr_scheduler.StepLR(opt, protocol.step_epochs(name), protocol.lr_gamma)
                state[k, kind, r] = (model, opt, sched, torch.Generator().manual_seed(protocol.seed + fold))
    for epoch in tqdm(range(epochs), desc=f"{name} readout selection"):
        for k, (inner, val) in enumerate(splits):
            for kind in kinds:
                entry = sel["models"][kind]
                for r in readouts:
                    model, opt, sched, gen = state[k, kind, r]
                    t0 = time.process_time()
                    _train_epoch(model, opt, ds, inner, protocol.batch_size, gen, f"{name}/{kind}/{r}/fold{k}/select")
                    sched.step()
                    acc, loss = _evaluate(model, ds, val, protocol.batch_size)
                    entry["cpu_seconds"] += time.process_time() - t0
                    entry["val_accuracy"][r][k].append(acc)
                    entry["val_loss"][r][k].append(loss if math.isfinite(loss) else float("inf"))
        sel["epochs"] = epoch + 1
        logger.info("%s selection epoch %d: %s", name, epoch + 1, {
            (kind, r): round(sum(row[-1] for row in sel["models"][kind]["val_accuracy"][r]) / len(splits), 4)
            for kind in kinds for r in readouts})
        if on_epoch is not None:
            on_epoch(sel)
    for kind in kinds:
        entry = sel["models"][kind]
        # max accuracy, then min loss, then candidate order (sorted() is stable, so equal keys keep that order)
        entry["chosen"] = [
            sorted(readouts, key=lambda r: (-entry["val_accuracy"][r][k][-1], entry["val_loss"][r][k][-1]))[0]
            for k in range(len(splits))
        ]
    return sel


def outcome_paragraph(folder: Path) -> str | None:
    """`folder/OUTCOME.md` (the reading of a supplementary run or pilot, written after it ran) as one labelled
    paragraph, or None when the folder has none."""
    outcome = Path(folder) / "OUTCOME.md"
    if not outcome.is_file():
        return None
    return "**Outcome (written after the run).** " + outcome.read_text().strip()


def write_diagnostic_readme(folder: Path, title: str, table: str) -> Path:
    """`folder/README.md` of a pilot or check: `# title`, its PURPOSE.md (written before the run), the table and its
    labelled OUTCOME.md (written after), each when present."""
    folder = Path(folder)
    purpose = folder / "PURPOSE.md"
    text = f"# {title}\n\n" + (purpose.read_text().strip() + "\n\n" if purpose.is_file() else "")
    text += table.rstrip("\n") + "\n"
    outcome = outcome_paragraph(folder)
    if outcome is not None:
        text += "\n" + outcome + "\n"
    path = folder / "README.md"
    path.write_text(text)
    return path


def save_diagnostic_run(folder: Path, name: str, result: dict) -> Path:
    """Write one run of a pilot or check as `folder/name` (JSON, one file per run, read back by `load_diagnostic_runs`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load_diagnostic_runs(folder: Path, pattern: str, script: str) -> list[dict]:
    """The runs of a pilot or check in `folder` matching `pattern`, by file name; exits naming `script` if none."""
    runs = [json.loads(f.read_text()) for f in sorted(Path(folder).glob(pattern))]
    if not runs:
        raise SystemExit(f"no runs in {folder}: run `python -m research.scripts.{script} run` first")
    return runs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), (float(t.std(unbiased=False)) if len(values) > 1 else 0.0)


def fmt_mse(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}"
