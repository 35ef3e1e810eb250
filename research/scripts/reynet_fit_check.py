"""Fit check for the ReyNet / IEGN graph models: how well does each fit a small training subset?

Why: on NCI109 ReyNet ends every cross-validated run with a higher training cross-entropy than IEGN, with one or three
pair-design blocks and with the triple design. This check asks whether ReyNet *can* fit the training graphs and only
gets there more slowly (optimisation), or stops higher (capacity of the model as configured). Each model is trained on
the same seeded subset of fold 0's training part, at a constant learning rate, for many epochs, and its training
cross-entropy is recorded after every epoch. Only training graphs are read; no validation or test fold is involved.

Usage:

    python -m research.scripts.reynet_fit_check run --dataset NCI109 --graphs 400 --epochs 100 --data-dir ../shared/data
    python -m research.scripts.reynet_fit_check table     # results/reynet_fit_check/*.json -> results/reynet_fit_check/README.md
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "results" / "reynet_fit_check"
logger = logging.getLogger("reynet_fit_check")
KINDS = {"reynet": "ReyNet (pairs)", "reynet3": "ReyNet (triples)", "reynet_wide": "ReyNet (pairs, wide)",
         "iegn": "IEGN"}
# "reynet_wide": the pair design at about IEGN's parameter count (`research.experiments.reynet.REYNET_WIDE`)
THRESHOLDS = (0.5, 0.3, 0.1)


def training_subset(labels, num_graphs: int, seed: int, num_folds: int = 10) -> list[int]:
    """`num_graphs` graphs of outer fold 0's training part (the main table's split), seeded shuffle; sorted."""
    import torch

    from research.data.graphs import stratified_kfold

    train_idx = stratified_kfold(labels, num_folds, seed)[0][0]
    if not 1 <= num_graphs <= len(train_idx):
        raise ValueError(f"graphs must be in 1..{len(train_idx)} (fold 0's training part), got {num_graphs}")
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(train_idx[i] for i in order[:num_graphs])


def run_fit_check(data_dir, dataset: str, *, num_graphs: int, epochs: int, kinds: list[str], lr: float = 1e-3,
                  seed: int = 1234) -> dict:
    """Train each model kind on the same training subset at a constant `lr` (the main protocol otherwise: widths,
    mean readout, batch 16 size-bucketed, init and batch-order seed `seed`).

    Returns:
        `{"dataset", "graphs", "epochs", "lr", "models": {kind: {"train_loss": [per epoch], "final_loss",
        "final_accuracy", "num_parameters", "cpu_seconds"}}}`; the final values are an eval-mode pass over the subset.
    """
    import torch
    from research.experiments.reynet import REYNET_WIDE, GraphProtocol, _evaluate, graph_model, train_graph_classifier

    from research.data.graphs import GraphDataset, load_gin_graphs

    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {kinds}")
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    graphs, num_classes, num_node_labels = load_gin_graphs(data_dir, dataset)
    ds = GraphDataset(graphs, num_node_labels)
    subset = training_subset(ds.labels, num_graphs, seed)
    protocol = GraphProtocol(seed=seed, lr=lr)
    res: dict = {"dataset": dataset, "graphs": len(subset), "epochs": epochs, "lr": lr, "seed": seed,
                 "subset": "seeded subset of outer fold 0's training part (split seed as the main table)",
                 "models": {}}
    for kind in kinds:
        if kind == "reynet3":
            protocol.reynet = {**GraphProtocol().reynet, "design_order": 3}
        elif kind == "reynet_wide":
            protocol.reynet = {**GraphProtocol().reynet, **REYNET_WIDE}
        else:
            protocol.reynet = GraphProtocol().reynet
        torch.manual_seed(seed)
        model = graph_model("iegn" if kind == "iegn" else "reynet", num_node_labels + 1, num_classes, protocol,
                            pooling="mean")
        t0 = time.process_time()
        losses = train_graph_classifier(model, ds, subset, epochs=epochs, lr=lr, batch_size=protocol.batch_size,
                                        seed=seed, desc=f"{dataset}/{kind}/fit")
        acc, loss = _evaluate(model, ds, subset, protocol.batch_size)
        res["models"][kind] = {"train_loss": losses, "final_loss": loss, "final_accuracy": acc,
                               "num_parameters": sum(p.numel() for p in model.parameters()),
                               "cpu_seconds": time.process_time() - t0}
        logger.info("%s %s: final training CE %.3f, accuracy %.3f", dataset, kind, loss, acc)
    return res


def fit_table(runs: list[dict]) -> str:
    """Markdown: per run and model, the training cross-entropy at a few epochs, the first epoch below each threshold,
    and the final eval-mode loss and accuracy on the subset."""
    groups: dict = {}
    for r in runs:  # runs of the same setting (one process per kind) share one table
        key = (r["dataset"], r["graphs"], r["epochs"], r["lr"], r.get("seed"))
        if key in groups:
            groups[key] = {**groups[key], "models": {**groups[key]["models"], **r["models"]}}
        else:
            groups[key] = r
    lines = []
    for r in groups.values():
        marks = sorted({e for e in (1, 10, 25, 50, 100, 200, r["epochs"]) if e <= r["epochs"]})
        head = " | ".join(f"CE ep. {e}" for e in marks)
        first = " | ".join(f"first epoch CE < {t}" for t in THRESHOLDS)
        lines += [f"**{r['dataset']}**, {r['graphs']} training graphs, {r['epochs']} epochs at constant lr {r['lr']:g}:",
                  "", f"| model | parameters | {head} | {first} | final CE (eval) | final accuracy (%) |",
                  "|---|---|" + "---|" * (len(marks) + len(THRESHOLDS)) + "---|---|"]
        for kind, m in r["models"].items():
            loss = m["train_loss"]
            at = " | ".join(f"{loss[e - 1]:.3f}" for e in marks)
            reach = " | ".join(str(next((i + 1 for i, v in enumerate(loss) if v < t), "—")) for t in THRESHOLDS)
            lines.append(f"| {KINDS[kind]} | {m['num_parameters']:,} | {at} | {reach} | {m['final_loss']:.3f} | "
                         f"{100 * m['final_accuracy']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["run", "table"])
    p.add_argument("--dataset", default="NCI109")
    p.add_argument("--graphs", type=int, default=400, help="size of the training subset")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kinds", default="reynet,iegn", help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--data-dir", default=None, help="folder with graphs/<NAME>/<NAME>.txt (default: $HF_KOOPMAN_DATA)")
    p.add_argument("--output-dir", default=str(DEFAULT_DIR))
    args = p.parse_args(argv)
    from research.experiments.reynet import load_diagnostic_runs, save_diagnostic_run, write_diagnostic_readme

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.output_dir)
    if args.stage == "run":
        kinds = [k for k in args.kinds.split(",") if k]
        res = run_fit_check(args.data_dir, args.dataset, num_graphs=args.graphs, epochs=args.epochs, kinds=kinds,
                            lr=args.lr)
        path = save_diagnostic_run(out, f"{args.dataset}_{args.graphs}graphs_{'-'.join(kinds)}.json", res)
        logger.info("wrote %s", path)
    else:
        runs = load_diagnostic_runs(out, "*graphs_*.json", "reynet_fit_check")
        path = write_diagnostic_readme(out, "ReyNet / IEGN fit check (training graphs only)", fit_table(runs))
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
