"""Learning-rate pilot for the ReyNet / IEGN graph models, on validation data only.

Why: on NCI109 ReyNet fits the training folds worse than IEGN at the shared learning rate (1e-3) in every run so far
(20 and 40 epochs, one or three Reynolds blocks). This pilot asks whether the shared learning rate favours IEGN. It
trains both models, at each learning rate, on the inner-training part of the first K outer folds and scores them on a
seeded stratified validation split of the same training fold (`research.experiments.reynet.validation_split`). No test fold is
read. It is a diagnostic that can motivate a pre-registered run; it does not choose anything for the results tables.

`--variant wide` runs the same pilot with ReyNet at about IEGN's parameter count (`REYNET_WIDE`), the width pilot.

Usage (one process per learning rate, then the table):

    python -m research.scripts.reynet_lr_pilot run --dataset NCI109 --lr 0.003 --data-dir ../shared/data
    python -m research.scripts.reynet_lr_pilot table      # results/reynet_lr_pilot/*.json -> results/reynet_lr_pilot/README.md
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "results" / "reynet_lr_pilot"
logger = logging.getLogger("reynet_lr_pilot")


VARIANTS = ("main", "wide")


def run_pilot(data_dir, dataset: str, lr: float, *, folds: int = 2, epochs: int | None = None,
              val_fraction: float = 0.1, seed: int = 1234, variant: str = "main") -> dict:
    """Both models at learning rate `lr` on the validation splits of the first `folds` outer training folds.

    Everything else is the main table's protocol (`GraphProtocol` defaults: widths, schedule, batch order, seeds),
    with the mean readout for both models. `variant="wide"` gives ReyNet `REYNET_WIDE`'s widths (about IEGN's
    parameter count); IEGN is the same in both variants.

    Returns:
        `{"dataset", "lr", "folds", "epochs", "val_fraction", "val_sizes", "models": {kind: {"val_accuracy":
        (folds, epochs), "val_loss": (folds, epochs), "cpu_seconds"}}}`.
    """
    from research.experiments.reynet import REYNET_WIDE, GraphProtocol, select_readouts

    from research.data.graphs import GraphDataset, load_gin_graphs, stratified_kfold

    if lr <= 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    graphs, num_classes, num_node_labels = load_gin_graphs(data_dir, dataset)
    ds = GraphDataset(graphs, num_node_labels)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    protocol = GraphProtocol(seed=seed, lr=lr)
    if variant == "wide":
        protocol.reynet = {**protocol.reynet, **REYNET_WIDE}
    if dataset not in protocol.epochs and epochs is None:
        raise ValueError(f"no default epoch count for {dataset!r}: pass epochs")
    if epochs is not None:
        protocol.epochs = {**protocol.epochs, dataset: epochs}
    outer = stratified_kfold(ds.labels, protocol.num_folds, protocol.seed)
    if not 1 <= folds <= len(outer):
        raise ValueError(f"folds must be in 1..{len(outer)}, got {folds}")
    sel = select_readouts(ds, [tr for tr, _ in outer[:folds]], protocol, dataset, num_classes, ["mean"],
                          val_fraction=val_fraction)
    return {
        "dataset": dataset, "lr": lr, "variant": variant, "reynet": protocol.reynet, "folds": folds, "epochs": sel["epochs"], "val_fraction": val_fraction,
        "val_sizes": sel["val_sizes"], "schedule": protocol.schedule(dataset),
        "models": {kind: {"val_accuracy": m["val_accuracy"]["mean"], "val_loss": m["val_loss"]["mean"],
                          "cpu_seconds": m["cpu_seconds"]} for kind, m in sel["models"].items()},
        "num_parameters": {kind: _num_parameters(kind, protocol, ds, num_classes) for kind in sel["models"]},
    }


def _num_parameters(kind: str, protocol, ds, num_classes: int) -> int:
    from research.experiments.reynet import graph_model

    model = graph_model(kind, ds.tensors[0].shape[0], num_classes, protocol, pooling="mean")
    return sum(p.numel() for p in model.parameters())


def pilot_table(runs: list[dict]) -> str:
    """Markdown: per dataset, learning rate and model, the validation accuracy and cross-entropy after the last epoch
    and the best epoch of the fold-mean accuracy (all means over the pilot's folds)."""
    lines = ["| dataset | lr | model | folds | epochs | val accuracy, last epoch (%) | val cross-entropy, last epoch "
             "| best fold-mean val accuracy (%, epoch) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["dataset"], r["lr"], r.get("variant", "main"))):
        wide = r.get("variant", "main") == "wide"
        for kind, label in (("reynet", "ReyNet (wide)" if wide else "ReyNet"), ("iegn", "IEGN")):
            acc, loss = r["models"][kind]["val_accuracy"], r["models"][kind]["val_loss"]
            k = len(acc)
            per_epoch = [sum(row[e] for row in acc) / k for e in range(len(acc[0]))]
            best = max(range(len(per_epoch)), key=per_epoch.__getitem__)
            lines.append(f"| {r['dataset']} | {r['lr']:g} | {label} | {k} | {r['epochs']} | "
                         f"{100 * per_epoch[-1]:.1f} | {sum(row[-1] for row in loss) / k:.3f} | "
                         f"{100 * per_epoch[best]:.1f} (ep. {best + 1}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["run", "table"])
    p.add_argument("--dataset", default="NCI109")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variant", choices=VARIANTS, default="main",
                   help="ReyNet widths: the main table's, or 'wide' (about IEGN's parameter count)")
    p.add_argument("--folds", type=int, default=2, help="first K outer folds (their training parts only)")
    p.add_argument("--epochs", type=int, default=None, help="default: the main table's epochs for the dataset")
    p.add_argument("--data-dir", default=None, help="folder with graphs/<NAME>/<NAME>.txt (default: $HF_KOOPMAN_DATA)")
    p.add_argument("--output-dir", default=str(DEFAULT_DIR))
    args = p.parse_args(argv)
    from research.experiments.reynet import load_diagnostic_runs, save_diagnostic_run, write_diagnostic_readme

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.output_dir)
    if args.stage == "run":
        res = run_pilot(args.data_dir, args.dataset, args.lr, folds=args.folds, epochs=args.epochs,
                        variant=args.variant)
        suffix = "" if args.variant == "main" else f"_{args.variant}"
        path = save_diagnostic_run(out, f"{args.dataset}_lr{args.lr:g}{suffix}.json", res)
        logger.info("wrote %s", path)
    else:
        runs = load_diagnostic_runs(out, "*_lr*.json", "reynet_lr_pilot")
        kind = "width" if any(r.get("variant", "main") != "main" for r in runs) else "learning-rate"
        path = write_diagnostic_readme(out, f"ReyNet / IEGN {kind} pilot (validation data only)", pilot_table(runs))
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
