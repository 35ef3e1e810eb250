"""Train ReyNet and its baselines, write results and Hub-ready checkpoints.

Stages (run separately so they can run in parallel, or `all`):

    # synthetic tasks (symmetry, diagonal, power, trace; 10k train / 1k test, U(0,10)) + size generalisation
    OMP_NUM_THREADS=1 python scripts/train_reynet.py synthetic --epochs 30
    # graph classification, seeded stratified 10-fold CV; default = the reduced protocol run for results/
    OMP_NUM_THREADS=1 python scripts/train_reynet.py graphs --data-dir ../shared/data
    #   the full protocol (all 10 folds, IEGN-paper epoch counts: MUTAG 130, PROTEINS 20, NCI109 99)
    python scripts/train_reynet.py graphs --data-dir ../shared/data --full-protocol
    # merge into results/reynet_summary.json + tables + plots
    python scripts/train_reynet.py summary
    # CI smoke test (seconds): everything tiny, into a scratch folder
    python scripts/train_reynet.py all --quick --output-dir /tmp/reynet --checkpoint-dir /tmp/reynet/ckpt

Checkpoints are written with `hf_koopman.models.publishing.save_for_hub` (config with a complete `auto_map`,
safetensors, remote-code files, model card from `model_cards/reynet.md`); `--push-to-hub ORG` uploads them when a token
and network are available (otherwise the folders stay local).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


logger = logging.getLogger("train_reynet")
REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CHECKPOINT_TASKS = ("symmetry", "trace")
FULL_PROTOCOL_EPOCHS = {"MUTAG": 130, "PROTEINS": 20, "NCI109": 99}  # IEGN's CHOSEN_EPOCH, reused by ReyNet's code
PUBLISHED_IEGN = {"MUTAG": (84.61, 10.0), "PROTEINS": (75.19, 4.3), "NCI109": (72.48, 2.5)}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["synthetic", "graphs", "summary", "all"])
    p.add_argument("--output-dir", default=str(REPO_ROOT / "results"))
    p.add_argument("--checkpoint-dir", default=str(REPO_ROOT / "checkpoints"))
    p.add_argument("--data-dir", default=None, help="folder with graphs/<NAME>/<NAME>.txt (default: $HF_KOOPMAN_DATA)")
    p.add_argument("--quick", action="store_true", help="tiny settings for CI smoke tests")
    p.add_argument("--seed", type=int, default=1234)
    # synthetic
    p.add_argument("--epochs", type=int, default=30, help="synthetic: training epochs")
    p.add_argument("--set-size", type=int, default=4, help="synthetic: n of training matrices")
    p.add_argument("--num-train", type=int, default=10_000)
    p.add_argument("--num-test", type=int, default=1_000)
    p.add_argument("--test-sizes", default="4,5,6,8,10,16", help="synthetic: n for size generalisation")
    # graphs
    p.add_argument("--datasets", default="MUTAG,PROTEINS,NCI109")
    p.add_argument("--num-folds", type=int, default=10)
    p.add_argument("--eval-folds", default=None,
                   help="evaluate only the first K folds: 'K' or 'MUTAG=10,PROTEINS=3' (default: MUTAG 10, others 3)")
    p.add_argument("--graph-epochs", default=None, help="e.g. 'MUTAG=20,PROTEINS=4,NCI109=4'")
    p.add_argument("--full-protocol", action="store_true", help="all folds, IEGN-paper epoch counts")
    p.add_argument("--resume", action="store_true", help="keep completed folds of results/reynet_graphs_<NAME>.json")
    p.add_argument("--checkpoint-dataset", default="MUTAG", help="dataset of the reference graph checkpoint")
    p.add_argument("--push-to-hub", default=None, help="Hub organisation; pushes each checkpoint as ORG/<name>")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# publishing
# ----------------------------------------------------------------------------------------------------------------------
def _publish(model, folder: Path, *, repo_id: str, description: str, training: str, results: str, caveats: str,
             tags: list[str], datasets: list[str], eval_results: list[dict], push_org: str | None) -> Path:
    import hf_koopman.models.reynet as reynet
    from hf_koopman.models.publishing import save_for_hub

    head = type(model).__name__
    if head == "ReyNetForGraphClassification":
        load = f'AutoModelForSequenceClassification.from_pretrained("{repo_id}", trust_remote_code=True)'
    else:
        load = (
            "transformers.dynamic_module_utils.get_class_from_dynamic_module("
            f'"modeling_reynet.{head}", "{repo_id}").from_pretrained("{repo_id}")'
        )
    metrics = sorted({r["metric_type"] for r in eval_results})
    return save_for_hub(
        model,
        folder,
        code_dir=Path(reynet.__file__).parent,
        auto_map=reynet.AUTO_MAP,
        card_template=REPO_ROOT / "model_cards" / "reynet.md",
        card_data={
            "license": "apache-2.0",
            "tags": ["reynet", "reynolds-network", "equivariance", "permutation-invariance", "graphs", "custom_code", *tags],
            "datasets": datasets,
            "metrics": metrics,
            "model_name": repo_id.split("/")[-1],
        },
        eval_results=eval_results,
        template_vars={
            "model_name": repo_id.split("/")[-1],
            "repo_id": repo_id,
            "description": description,
            "in_channels": model.config.in_channels,
            "head_class": head,
            "load_snippet": load,
            "training": training,
            "results": results,
            "caveats": caveats,
        },
        push_to_hub=f"{push_org}/{repo_id.split('/')[-1]}" if push_org else None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------------------
def run_synthetic(args) -> dict:
    import torch

    from reynet_experiments import SYNTHETIC_TASKS, evaluate_mse, fmt_mse, make_synthetic, synthetic_model, train_regression

    n = args.set_size
    test_sizes = [int(s) for s in args.test_sizes.split(",")]
    out: dict = {
        "protocol": {"n_train": n, "num_train": args.num_train, "num_test": args.num_test, "epochs": args.epochs,
                     "optimizer": "Adam lr 1e-3, weight decay 1e-5, batch 100", "entries": "U(0, 10)",
                     "seed": args.seed, "test_seed": args.seed + 20},
        "mse": {}, "size_generalisation": {}, "cpu_seconds": {},
    }
    trained = {}
    for t_i, task in enumerate(SYNTHETIC_TASKS):
        X, Y = make_synthetic(task, args.num_train, n, args.seed)
        Xt, Yt = make_synthetic(task, args.num_test, n, args.seed + 20)  # test set distinct from train
        out["mse"][task], out["size_generalisation"][task], out["cpu_seconds"][task] = {}, {}, {}
        for kind in ("reynet", "iegn", "mlp"):
            torch.manual_seed(args.seed)
            model = synthetic_model(kind, task, n)
            t0 = time.process_time()
            train_regression(model, X, Y, epochs=args.epochs, seed=args.seed, desc=f"{task}/{kind}")
            out["cpu_seconds"][task][kind] = time.process_time() - t0
            out["mse"][task][kind] = evaluate_mse(model, Xt, Yt)
            gen = {}
            for m in test_sizes:
                if kind == "mlp" and m != n:
                    gen[str(m)] = None  # a fixed-size MLP cannot take other n
                    continue
                Xm, Ym = make_synthetic(task, min(args.num_test, 500), m, args.seed + 30 + m)
                gen[str(m)] = evaluate_mse(model, Xm, Ym)
            out["size_generalisation"][task][kind] = gen
            logger.info("synthetic %s %s: test MSE %s, size gen %s", task, kind, fmt_mse(out["mse"][task][kind]), gen)
            if kind == "reynet":
                trained[task] = model

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reynet_synthetic.json").write_text(json.dumps(out, indent=2) + "\n")

    table = synthetic_table(out)
    for task in SYNTHETIC_CHECKPOINT_TASKS:
        if task not in trained:
            continue
        equivariant = SYNTHETIC_TASKS[task][0]
        _publish(
            trained[task],
            Path(args.checkpoint_dir) / f"reynet-synthetic-{task}",
            repo_id=f"{args.push_to_hub or 'hf-koopman'}/reynet-synthetic-{task}",
            description=(
                f"A tiny ReyNet trained on the synthetic **{task}** task of the ReyNet paper "
                f"({'matrix → matrix, equivariant' if equivariant else 'matrix → scalar, invariant'}): inputs are n×n "
                f"matrices with i.i.d. U(0,10) entries, trained at n = {n}."
            ),
            training=_synthetic_training_text(out),
            results=table,
            caveats="MSE on a held-out test set generated with a different seed; lower is better.",
            tags=["synthetic"],
            datasets=[],
            eval_results=[{
                "task_type": "tabular-regression", "dataset_type": f"synthetic-{task}",
                "dataset_name": f"Synthetic {task} (n={n}, U(0,10))", "metric_type": "mse",
                "metric_value": round(out["mse"][task]["reynet"], 6),
            }],
            push_org=args.push_to_hub,
        )
    return out


def _synthetic_training_text(res: dict) -> str:
    p = res["protocol"]
    return (
        f"{p['num_train']} training / {p['num_test']} test matrices of size n = {p['n_train']} with entries "
        f"{p['entries']}; {p['optimizer']}; {p['epochs']} epochs; full-matrix MSE loss (the paper's code instead trains "
        "on the top-left 2×2 corner only). Produced by `scripts/train_reynet.py synthetic`."
    )


def synthetic_table(res: dict) -> str:
    from reynet_experiments import fmt_mse

    lines = ["| task | ReyNet | IEGN | MLP |", "|---|---|---|---|"]
    for task, row in res["mse"].items():
        lines.append(f"| {task} | {fmt_mse(row['reynet'])} | {fmt_mse(row['iegn'])} | {fmt_mse(row['mlp'])} |")
    return "\n".join(lines)


def size_generalisation_table(res: dict) -> str:
    sizes = list(next(iter(next(iter(res["size_generalisation"].values())).values())).keys())
    lines = ["| task | model | " + " | ".join(f"n={s}" for s in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for task, models in res["size_generalisation"].items():
        for kind, row in models.items():
            cells = ["n/a" if row[s] is None else f"{row[s]:.3g}" for s in sizes]
            lines.append(f"| {task} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_dataset(spec: str | None, datasets: list[str]) -> dict[str, int]:
    """'7' -> every dataset 7; 'MUTAG=10,NCI109=3' -> those datasets."""
    if not spec:
        return {}
    if "=" not in spec:
        return {d: int(spec) for d in datasets}
    return {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}


def run_graphs(args) -> dict:
    import torch

    from hf_koopman.datasets.graphs import GraphDataset, load_gin_graphs
    from reynet_experiments import GraphProtocol, graph_model, run_graph_cv, train_graph_classifier

    datasets = [d for d in args.datasets.split(",") if d]
    protocol = GraphProtocol(num_folds=args.num_folds, seed=args.seed)
    if args.full_protocol:
        protocol.eval_folds = {d: args.num_folds for d in datasets}
        protocol.epochs = dict(FULL_PROTOCOL_EPOCHS)
    protocol.epochs.update(_per_dataset(args.graph_epochs, datasets))
    protocol.eval_folds.update(_per_dataset(args.eval_folds, datasets))
    missing = [d for d in datasets if d not in protocol.epochs]
    if missing:
        raise ValueError(f"no epoch count for {missing}: pass --graph-epochs NAME=E")
    if args.quick:
        protocol.epochs = {d: 1 for d in datasets}
        protocol.reynet = {**protocol.reynet, "phi_hidden_sizes": [8], "channel_hidden_sizes": [8], "head_hidden_sizes": [8]}
        protocol.iegn = {"channel_hidden_sizes": [8], "head_hidden_sizes": [8]}
    out: dict = {"protocol": {
        "split": f"seeded stratified {protocol.num_folds}-fold CV (seed {protocol.seed}); folds evaluated: { {d: protocol.eval_folds.get(d, protocol.num_folds) for d in datasets} }",
        "epochs": protocol.epochs, "optimizer": f"Adam lr {protocol.lr}, batch {protocol.batch_size} size-bucketed graphs",
        "reynet": protocol.reynet, "iegn": protocol.iegn, "full_protocol": bool(args.full_protocol),
    }, "datasets": {}}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in datasets:

        def save(res: dict, name: str = name) -> None:
            # one file per dataset (datasets can run as separate processes; `summary` merges them), rewritten after
            # every fold so that an interrupted run keeps its completed folds
            single = {"protocol": out["protocol"], "datasets": {name: res}}
            (out_dir / f"reynet_graphs_{name}.json").write_text(json.dumps(single, indent=2) + "\n")

        previous = None
        existing = out_dir / f"reynet_graphs_{name}.json"
        if args.resume and existing.is_file():
            previous = json.loads(existing.read_text())["datasets"][name]
        res = run_graph_cv(args.data_dir, name, protocol, on_fold=save, previous=previous)
        out["datasets"][name] = res
        logger.info("%s: %s", name, {k: (v["mean"], v["std"]) for k, v in res["models"].items()})

    # reference checkpoint: ReyNet trained on all graphs of one dataset, card with its CV numbers
    name = args.checkpoint_dataset
    if name not in datasets:
        return out
    graphs, num_classes, num_node_labels = load_gin_graphs(args.data_dir, name)
    ds = GraphDataset(graphs, num_node_labels)
    torch.manual_seed(protocol.seed)
    model = graph_model("reynet", num_node_labels + 1, num_classes, protocol)
    train_graph_classifier(model, ds, list(range(len(ds))), epochs=protocol.epochs[name], lr=protocol.lr,
                           batch_size=protocol.batch_size, seed=protocol.seed, desc=f"{name}/final")
    r = out["datasets"][name]["models"]["reynet"]
    _publish(
        model,
        Path(args.checkpoint_dir) / f"reynet-{name.lower()}",
        repo_id=f"{args.push_to_hub or 'hf-koopman'}/reynet-{name.lower()}",
        description=(
            f"ReyNet graph classifier for **{name}** (TU benchmark). Input: `(batch, {num_node_labels + 1}, n, n)` "
            "tensors (channel 0 the normalised adjacency D^-1/2 A D^-1/2, channels 1.. one-hot node labels on the "
            "diagonal plus the adjacency, as in the IEGN/ReyNet data pipeline; build them with "
            "`hf_koopman.datasets.graphs.graph_to_tensor`)."
        ),
        training=(
            f"Trained on all {len(ds)} graphs for {protocol.epochs[name]} epochs ({out['protocol']['optimizer']}). "
            f"Architecture: {json.dumps(protocol.reynet)}. Accuracy below is from "
            f"{out['protocol']['split']} with the same settings (`scripts/train_reynet.py graphs`)."
        ),
        results=graph_table(out),
        caveats=(
            "Published IEGN numbers are quoted from Maron et al. (2019) for context only; they used the official split "
            "files and the full epoch schedule. **Reduced protocol**: see the split/epochs above."
            if not args.full_protocol else "Full protocol (all folds, IEGN-paper epoch counts)."
        ),
        tags=["graph-classification"],
        datasets=[name],
        eval_results=[{
            "task_type": "graph-classification", "dataset_type": name, "dataset_name": name,
            "metric_type": "accuracy", "metric_value": round(r["mean"], 4),
        }],
        push_org=args.push_to_hub,
    )
    return out


def graph_table(res: dict) -> str:
    lines = [
        "| dataset | folds | epochs | ReyNet acc. (%) | IEGN (ours) acc. (%) | IEGN published (%) | ReyNet ≥ IEGN (ours) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in res["datasets"].items():
        r, i = d["models"]["reynet"], d["models"]["iegn"]
        pub = PUBLISHED_IEGN.get(name)
        pub_s = f"{pub[0]:.1f} ± {pub[1]:.1f}" if pub else "–"
        lines.append(
            f"| {name} | {d['eval_folds']}/{d['num_folds']} | {d['epochs']} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} | "
            f"{100 * i['mean']:.1f} ± {100 * i['std']:.1f} | {pub_s} | {'yes' if r['mean'] >= i['mean'] else 'no'} |"
        )
    return "\n".join(lines)


def run_summary(args) -> dict:
    out_dir = Path(args.output_dir)
    summary: dict = {"paper": "Sannai, Kawano, Kumagai, Invariant and Equivariant Reynolds Networks, JMLR 25(42), 2024"}
    md = ["# ReyNet results", ""]
    syn_path = out_dir / "reynet_synthetic.json"
    graph_parts = sorted(out_dir.glob("reynet_graphs_*.json"))
    if syn_path.is_file():
        syn = json.loads(syn_path.read_text())
        summary["synthetic"] = syn
        md += ["## Synthetic tasks (test MSE)", "", _synthetic_training_text(syn), "", synthetic_table(syn), "",
               "## Size generalisation (trained at n = %d, test MSE)" % syn["protocol"]["n_train"], "",
               size_generalisation_table(syn), ""]
        _plot_size_generalisation(syn, out_dir / "reynet_size_generalisation.png")
    if graph_parts:
        gr = {"protocol": None, "datasets": {}}
        order = {"MUTAG": 0, "PROTEINS": 1, "NCI109": 2}
        for part in sorted(graph_parts, key=lambda f: order.get(f.stem.split("_", 2)[-1], 9)):
            data = json.loads(part.read_text())
            gr["datasets"].update(data["datasets"])
            if gr["protocol"] is None:
                gr["protocol"] = data["protocol"]
            else:  # merge per-dataset settings of separately run datasets
                gr["protocol"]["epochs"].update(data["protocol"]["epochs"])
                gr["protocol"]["split"] = "seeded stratified k-fold CV; folds evaluated per dataset in the table"
        summary["graphs"] = gr
        summary["graphs"]["published_iegn"] = {k: {"mean": v[0], "std": v[1]} for k, v in PUBLISHED_IEGN.items()}
        summary["graphs"]["reynet_ge_iegn"] = {
            k: d["models"]["reynet"]["mean"] >= d["models"]["iegn"]["mean"] for k, d in gr["datasets"].items()
        }
        p = gr["protocol"]
        md += ["## Graph classification (accuracy, mean ± std over folds)", "",
               f"Split: {p['split']}. Epochs: {p['epochs']}. {p['optimizer']}. "
               f"{'Full protocol.' if p['full_protocol'] else 'REDUCED protocol (CPU budget), see epochs/folds.'}", "",
               graph_table(gr), "", f"ReyNet config: `{json.dumps(p['reynet'])}`; IEGN config: `{json.dumps(p['iegn'])}`.",
               "Published IEGN numbers: Maron et al. 2019 (official splits, full schedule), context only. With 3 epochs "
               "per fold both models are far from converged, and differences smaller than the fold std are not "
               "significant (on PROTEINS ReyNet led after 3 folds and trails after 6).", ""]
        _plot_graphs(gr, out_dir / "reynet_graphs.png")
    md += ["## How this differs from the paper's protocol", "",
           "- Synthetic: trained with the full-matrix MSE (the paper's code trains ReyNet on the 2×2 corner only); "
           "test set drawn with a different seed from validation (in the paper's script they coincide).",
           "- Graphs: ReyNet uses a channel-mixing φ (`phi_mode='joint'`) and narrower widths than the paper "
           "(`set_layers=[16,16,16]`, `channel_layers=[16,32,256]`, depthwise φ), to fit a 2-core CPU budget; IEGN uses "
           "widths [16, 32, 64] instead of [16, 32, 256]. Both use Adam lr 1e-3 (the IEGN paper tuned lr per dataset).",
           "- Splits are seeded stratified 10-fold splits made here (no official split files ship with the offline "
           "data); only the first folds listed above were run for PROTEINS/NCI109, with few epochs (reduced protocol). "
           "`scripts/train_reynet.py graphs --full-protocol` runs all folds with the IEGN-paper epoch counts.",
           "- No ReyNet accuracies from the paper were available to compare with; published IEGN numbers are context.",
           ""]
    bench = out_dir / "reynet_benchmark.txt"
    if bench.is_file():
        summary["benchmark_log"] = bench.name
        md += ["## Benchmark", "", "```", bench.read_text().strip(), "```", ""]
    (out_dir / "reynet_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "reynet_results.md").write_text("\n".join(md) + "\n")
    return summary


def _plot_size_generalisation(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["size_generalisation"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind, row in res["size_generalisation"][task].items():
            pts = [(int(s), v) for s, v in row.items() if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("test n")
    axes[0][0].set_ylabel(f"MSE (trained at n={res['protocol']['n_train']})")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_graphs(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["datasets"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3))
    for j, kind in enumerate(("reynet", "iegn")):
        means = [100 * res["datasets"][n]["models"][kind]["mean"] for n in names]
        stds = [100 * res["datasets"][n]["models"][kind]["std"] for n in names]
        ax.bar([i + 0.27 * (j - 0.5) * 2 for i in range(len(names))], means, 0.27, yerr=stds, label=kind.upper() if kind == "iegn" else "ReyNet")
    pub = [PUBLISHED_IEGN.get(n, (float("nan"), 0))[0] for n in names]
    ax.scatter(range(len(names)), pub, color="k", marker="_", s=400, label="IEGN published", zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.quick:
        args.epochs, args.num_train, args.num_test, args.test_sizes = 1, 200, 50, "4,5"
        args.datasets = "MUTAG"
        args.num_folds, args.eval_folds = 2, "2"
    if args.stage in ("synthetic", "all"):
        run_synthetic(args)
    if args.stage in ("graphs", "all"):
        run_graphs(args)
    if args.stage in ("summary", "all"):
        run_summary(args)


if __name__ == "__main__":
    main()
