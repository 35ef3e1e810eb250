"""Run a grid of RKSP research-model trainings, resumably, into a `datasets`-loadable JSON-lines table.

    # the prediction sweep (6 norms x 4 LRs x 3 width/depth configs x 3 seeds = 216 runs, 500 steps; 48 min wall
    #   on the shared 2-core machine in session 3) -> results/sweep_prediction/runs.jsonl
    #   (--steps 100 gives the session-1/2 table, kept in results/sweep_prediction_100steps/runs.jsonl)
    OMP_NUM_THREADS=1 nice -n 10 python -m research.scripts.sweep --grid prediction
    # the prevention comparison (No-Norm, LR 0.005-0.01): control / grad clip 0.5, 1.0 / KSS alpha 0.10, 0.15, 0.20,
    # capped and paper-literal
    OMP_NUM_THREADS=1 nice -n 10 python -m research.scripts.sweep --grid prevention --trials 24
    # max stable LR with / without KSS for Pre-LN, RMSNorm, No-Norm
    OMP_NUM_THREADS=1 nice -n 10 python -m research.scripts.sweep --grid max_lr
    # WikiText-2 byte LM and ViT on MNIST, baseline vs KSS (needs HF_KOOPMAN_DATA)
    HF_KOOPMAN_DATA=../shared/data python -m research.scripts.sweep --grid real_data
    # Mixtral-style MoE (8 experts, top-2) on the synthetic LM, with and without KSS (paper Table 16), plus a
    # replication with seeds 8-15 at LR 1 (the cell where the arms differed)
    OMP_NUM_THREADS=1 nice -n 10 python -m research.scripts.sweep --grid moe
    # fill in init-time spectral features for rows trained with --no-features
    python -m research.scripts.sweep --grid prediction --features-only
    # relabel KSS rows written before KSSTrainer capped the KSS gradient as "kss<alpha>-uncapped"
    python -m research.scripts.sweep --grid prevention --relabel-uncapped
    # record where the cap's norms were measured on rows that predate `kss_grad_cap` (session 2: parameters)
    python -m research.scripts.sweep --grid prevention --mark-grad-cap parameters

KSS arms are "kss<alpha>" (KSSTrainer's default gradient cap, kss_max_grad_ratio = 0.5) and "kss<alpha>-uncapped"
(the paper-literal gradient, kss_max_grad_ratio = None); each KSS row records the ratio it used and `kss_grad_cap`, where
the cap's norms were measured (the library default is "activations"; rows without the field measured them on
"parameters", which `--mark-grad-cap parameters` records).

The prediction sweep uses a plain AdamW loop (no regulariser involved); every other grid goes through
`hf_koopman.KSSTrainer` (alpha = 0 for non-KSS arms, i.e. the plain `Trainer` loss). Each run is labelled as in the
paper (loss > 50 or grad norm > 500 at any step, non-finite counts) and records the init spectral profile, the four
gradient baselines (initial grad norm, grad norm at step 100, grad-norm variance over steps 1-100, loss-spike count
over steps 1-500 - the run's horizon, 500 steps for the prediction sweep and 100-150 for the other grids - plus the
spike count over 1-100) and the final evaluation. `run_id`s contain the horizon (`-T500-`), so tables of different
horizons never mix. Re-running skips finished `run_id`s; Ctrl-C loses at most one run. Load a table with
`datasets.load_dataset("json", data_files="results/sweep_prediction/runs.jsonl")`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from research.experiments.grids import (
    PREDICTION_STEPS,
    max_lr_grid,
    moe_grid,
    moe_replication_grid,
    prediction_grid,
    prevention_grid,
    real_data_grid,
)
from research.experiments.sweep import (
    UNCAPPED_SUFFIX,
    RunSpec,
    build_model,
    dump_row,
    init_profile_features,
    mark_kss_grad_cap,
    read_rows,
    relabel_uncapped_kss,
    run_sweep,
    task_datasets,
)



def fill_features(path: Path) -> None:
    """Compute init-time spectral features for rows that lack them (the model is rebuilt from its seed)."""
    from tqdm.auto import tqdm

    rows = read_rows(path)
    fields = set(RunSpec.__dataclass_fields__)
    changed = 0
    for row in tqdm(rows, desc="init features"):
        if "near_unit_mass_mean" in row:
            continue
        spec = RunSpec(**{k: row[k] for k in fields if k in row})  # older rows predate `arch` / `top_k`
        train_ds, _ = task_datasets(spec)
        feats = init_profile_features(build_model(spec), train_ds, seed=spec.seed)
        row.update({k: v for k, v in feats.items()})
        changed += 1
    if changed:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(dump_row(r) + "\n" for r in rows))
        tmp.replace(path)
    print(f"filled features for {changed} of {len(rows)} rows in {path}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("prediction", "prevention", "max_lr", "real_data", "moe"), required=True)
    p.add_argument("--out", type=Path, default=None,
                   help="JSONL file (default results/sweep_<grid>/runs.jsonl; results/sweep_real/ for real_data)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {PREDICTION_STEPS} prediction, 100 max_lr, 150 otherwise)")
    p.add_argument("--trials", type=int, default=None, help="trials per method (prevention, default 24) / seeds (max_lr: 3, real_data: 2)")
    p.add_argument("--limit", type=int, default=None, help="run only the first N specs of the grid (quick mode)")
    p.add_argument("--no-features", action="store_true", help="skip the init-time profile (fill later)")
    p.add_argument("--features-only", action="store_true", help="only fill in missing init-time features")
    p.add_argument("--relabel-uncapped", action="store_true",
                   help="only relabel KSS rows trained before the gradient cap as 'kss<alpha>-uncapped'")
    p.add_argument("--seeds", type=int, default=None, help="moe: seeds per (LR, method), default 8")
    p.add_argument("--mark-grad-cap", choices=("parameters", "activations"), default=None,
                   help="only record kss_grad_cap on capped KSS rows that predate the field (session-2 rows: parameters)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = args.out or Path("results") / {"real_data": "sweep_real"}.get(args.grid, f"sweep_{args.grid}") / "runs.jsonl"
    if args.features_only:
        fill_features(out)
        return 0
    if args.mark_grad_cap:
        print(f"marked {mark_kss_grad_cap(out, args.mark_grad_cap)} capped KSS rows of {out} as "
              f"kss_grad_cap={args.mark_grad_cap!r}")
        return 0
    if args.relabel_uncapped:
        print(f"relabelled {relabel_uncapped_kss(out)} KSS rows of {out} as '<method>{UNCAPPED_SUFFIX}'")
        return 0
    if args.grid == "prediction":
        specs = prediction_grid(args.steps or PREDICTION_STEPS)
    elif args.grid == "prevention":
        specs = prevention_grid(args.steps or 150, args.trials or 24)
    elif args.grid == "max_lr":
        specs = max_lr_grid(args.steps or 100, args.trials or 3)
    elif args.grid == "moe":
        specs = moe_grid(args.steps or 150, seeds=tuple(range(args.seeds or 8))) + moe_replication_grid(args.steps or 150)
    else:
        specs = real_data_grid(args.steps or 150, seeds=tuple(range(args.trials or 2)))
    if args.limit is not None:
        specs = specs[: args.limit]
    run_sweep(specs, out, features=not args.no_features)
    rows = read_rows(out)
    print(f"{out}: {len(rows)} rows, {sum(bool(r['diverged']) for r in rows)} diverged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
