"""Fit the calibrated divergence-risk estimator and write it as JSON.

    # the estimator the package ships: every run of the held-out-family study, with the product's inputs
    python -m research.scripts.heldout_risk --report          # results/heldout_risk/report.json first
    python -m research.scripts.fit_risk --heldout results/heldout_risk/runs.jsonl   # -> hf_koopman/data/risk_estimator.json
    # the prediction sweep's own estimator (one architecture; held-out widths and seeds)
    python -m research.scripts.fit_risk                       # -> results/sweep_prediction/risk_estimator.json
    python -m research.scripts.fit_risk --runs results/quick/sweep_prediction/runs.jsonl --out /tmp/est.json --eval-out /tmp/eval.json
    python -m research.scripts.fit_risk --runs results/sweep_prediction_100steps/runs.jsonl --out /tmp/est100.json --eval-out /tmp/eval100.json
    OMP_NUM_THREADS=2 python -m research.scripts.fit_risk --reprofile   # init features recomputed with the default recipe

With `--heldout`, see `fit_heldout`. Otherwise the sweep fit: it fits on the `train` group (seen width/depth and
seeds), evaluates on the `heldout` group (unseen width/depth (48, 3) and/or unseen seed) against baselines that see
the same non-spectral inputs (log LR alone; normalisation type + log LR) and against the paper's raw
M≈1-as-probability. The written estimator is the one fitted on the train group, so the held-out numbers stored in its
metadata describe exactly that artefact. Writes the evaluation to
`results/risk_estimator_eval.json`.

The sweep tables hold the init features the sweep computed when it ran (the rank-32 randomized DMD recipe).
`--reprofile` rebuilds each run's model at initialisation from its stored spec (same seed, same probe)
and recomputes the features with the current default recipe (the full spectrum of the whitened DMD operator, via
`init_profile_features`); no run is retrained, the divergence labels are the stored ones. The fit on the stored
features is evaluated in the same run and recorded next to it (`previous_stored_features`), so old and new are
compared on identical rows and labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from research.experiments.analysis import fit_and_evaluate_estimators
from research.experiments.stats import auroc
from research.experiments.sweep import read_rows

N_BINS = 10
# the model at init depends only on these spec fields (not on the learning rate or the training schedule)
MODEL_KEYS = ("arch", "task", "norm", "hidden_size", "num_layers", "num_heads", "top_k", "seed")


def reprofile_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """`rows` with their init features recomputed by `init_profile_features` (the default recipe), one profile per
    distinct model; and one record per model (its spec and the estimator-relevant features) for the evaluation."""
    from dataclasses import fields

    from research.experiments.sweep import RunSpec, build_model, init_profile_features, task_datasets

    spec_names = {f.name for f in fields(RunSpec)}
    cache: dict[tuple, dict] = {}
    out = []
    for row in rows:
        key = tuple(row.get(k) for k in MODEL_KEYS)
        if key not in cache:
            spec = RunSpec(**{k: row[k] for k in spec_names if k in row})
            train_ds, _ = task_datasets(spec)  # same order as sweep.execute: data, model, init profile
            feats = init_profile_features(build_model(spec), train_ds, seed=spec.seed)
            cache[key] = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in feats.items()}
            print(f"re-profiled {dict(zip(MODEL_KEYS, key))}: M≈1 {cache[key]['near_unit_mass_mean']:.3f} "
                  f"(stored {row['near_unit_mass_mean']:.3f}), verdict {cache[key]['verdict']}", flush=True)
        new = dict(row)
        new.update({k: v for k, v in cache[key].items() if k not in spec_names})  # spec fields win, as in the sweep
        out.append(new)
    keep = ("near_unit_mass_mean", "unstable_mass_mean", "spectral_radius_max", "eigvec_condition_mean",
            "nonlinearity_mean", "verdict", "profile_seconds")
    models = [dict(zip(MODEL_KEYS, key)) | {k: feats.get(k) for k in keep} for key, feats in cache.items()]
    return out, models


def _widths(rows: list[dict], group: str) -> str:
    return "/".join(str(d) for d in sorted({int(r["hidden_size"]) for r in rows if r["group"] == group}))


def _in_sample_auroc(est, rows: list[dict]) -> float:
    train = [r for r in rows if r["group"] == "train"]
    return float(auroc(est.predict_proba_rows(train), [int(bool(r["diverged"])) for r in train]))


def fit(runs: Path, out: Path, eval_out: Path, *, l2: float = 1.0, n_resamples: int = 1000,
        reprofile: bool = False) -> dict:
    rows = [r for r in read_rows(runs) if "near_unit_mass_mean" in r]
    if not rows:
        raise SystemExit(f"no rows with init features in {runs}; run research/scripts/sweep.py first")
    previous = models = None
    if reprofile:
        old_est, old_results = fit_and_evaluate_estimators(rows, l2=l2, n_bins=N_BINS, n_resamples=n_resamples)
        previous = {
            "features": "as stored in the sweep table (rank-32 randomized DMD, the default before issue #19)",
            "in_sample_auroc": _in_sample_auroc(old_est, rows),
            "estimators": old_results, "estimator": old_est.to_dict(),
        }
        rows, models = reprofile_rows(rows)
    est, results = fit_and_evaluate_estimators(rows, l2=l2, n_bins=N_BINS, n_resamples=n_resamples)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    spec = results["spectral + log LR"]
    steps = sorted({int(r["max_steps"]) for r in rows})
    horizon = "/".join(map(str, steps))
    est.metadata = {
        "description": "P(divergence within the training horizon | init RKSP spectrum, learning rate); logistic, fitted "
        "on the associative-recall sweep of hf_koopman's RKSP research transformer (6 normalisations, d 32-48, "
        f"L 2-4, AdamW, {horizon} steps, batch 16, warmup 10). Outside that regime it is an extrapolation.",
        "horizon_steps": steps,
        "label": "loss > 50 or gradient norm > 500 at any step (non-finite counts), as in the RKSP paper",
        "sweep": str(runs),
        "n_train": spec["n_train"],
        "heldout": {
            "n": spec["n_heldout"], "n_diverged": spec["n_heldout_diverged"], "auroc": spec["auroc"],
            "auroc_ci95": spec["auroc_ci"], "ece": spec["ece"], "ece_bins": N_BINS,
            "baseline_log_lr_auroc": results["log LR only"]["auroc"],
            "baseline_norm_log_lr_auroc": results["norm type + log LR"]["auroc"],
        },
        "l2": l2,
        "in_sample_auroc": _in_sample_auroc(est, rows),
        "git_commit": commit,
    }
    if reprofile:
        est.metadata.update(
            features="init RKSP features recomputed with the default recipe (full spectrum of the whitened DMD "
            "operator, N = 2048) on the same runs' models at initialisation; labels as stored in the sweep",
            note="refitted on the full-spectrum features (issue #19); it was fitted on rank-32 features before. A later "
            f"issue (#22) replaces this estimator. Train rows have d = {_widths(rows, 'train')}, held-out rows d = "
            f"{_widths(rows, 'heldout')}: at d <= 32 the rank-32 recipe already kept every mode, so the features (and "
            "the fit) change little; they change for the wider held-out models.",
            previous_rank32={
                "heldout_auroc": previous["estimators"]["spectral + log LR"]["auroc"],
                "heldout_auroc_ci95": previous["estimators"]["spectral + log LR"]["auroc_ci"],
                "heldout_ece": previous["estimators"]["spectral + log LR"]["ece"],
                "in_sample_auroc": previous["in_sample_auroc"],
            },
        )
    est.save_json(out)
    eval_out.parent.mkdir(parents=True, exist_ok=True)
    report = {"n_bins": N_BINS, "estimators": results, "shipped": est.to_dict()}
    if reprofile:
        report |= {"features": est.metadata["features"], "note": est.metadata["note"],
                   "in_sample_auroc": est.metadata["in_sample_auroc"], "previous_stored_features": previous,
                   "reprofiled_models": models}
    eval_out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return results


# the model_type each held-out-study family is built as (the KAN transformer is the research GPT with KAN MLPs)
FAMILY_MODEL_TYPE = {"rksp_gpt": "rksp_gpt", "rksp_kan": "rksp_gpt", "gpt2": "gpt2", "llama": "llama",
                     "gpt_neox": "gpt_neox", "qwen2": "qwen2", "mixtral": "mixtral", "mamba": "mamba"}
# the product's inputs: everything `profile()` measures, plus the learning rate (the study's `spectrum+lr` set)
PRODUCT_FEATURES = (("learning_rate", "log10"), ("near_unit_mass_mean", "identity"),
                    ("unstable_mass_mean", "identity"), ("spectral_radius_max", "log10"),
                    ("eigvec_condition_mean", "log10"), ("nonlinearity_mean", "identity"))


def fit_heldout(runs: Path, report: Path, out: Path, *, l2: float = 1.0, n_bootstrap: int = 200) -> dict:
    """Fit the shipped estimator on every run of the held-out-family study (`research/experiments/heldout_risk.py`)
    with the product's inputs (`PRODUCT_FEATURES`), and store the study's leave-one-family-out numbers for the same
    input set (`report`, written by `python -m research.scripts.heldout_risk --report`) in its metadata: the shipped
    artefact is fitted on all families, and those numbers say how such a fit did on a family it had not seen."""
    import math

    from hf_koopman.risk import MODEL_KEYS as RANGE_KEYS, RiskEstimator
    from research.experiments.heldout_analysis import INIT_TIME
    from research.experiments.heldout_risk import HORIZON, WARMUP, read_jsonl

    rows = read_jsonl(runs)
    keys = [k for k, _ in PRODUCT_FEATURES]

    def usable(row: dict) -> bool:
        return all(isinstance(row.get(k), (int, float)) and not math.isnan(row[k]) for k in keys)

    # every run of the study trained with AdamW: recorded, so a run with another optimizer reads as outside
    kept = [dict(r, model_type=FAMILY_MODEL_TYPE[r["family"]], optimizer="adamw") for r in rows if usable(r)]
    if not kept:
        raise SystemExit(f"no usable rows in {runs}; run `python -m research.scripts.heldout_risk` first.")
    study = json.loads(report.read_text(encoding="utf-8"))
    primary = study["primary_leave_one_family_out"]
    held = primary["models"]["spectrum+lr"]
    families = sorted({r["family"] for r in kept})
    est = RiskEstimator.fit(
        kept, [int(bool(r["diverged"])) for r in kept], list(PRODUCT_FEATURES), l2=l2, families=families,
        n_bootstrap=n_bootstrap, range_keys=(*RANGE_KEYS, "optimizer"),
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    est.metadata = {
        "description": "P(divergence within the training horizon | init RKSP spectrum (full whitened DMD), learning "
        f"rate); logistic, fitted on {len(kept)} runs of the held-out-family study: {', '.join(families)} (tiny causal "
        f"LMs, L 2-4, d 32-64, init std 0.02/0.08, associative recall and byte-level WikiText-2, AdamW, warmup "
        f"{WARMUP}, {HORIZON} steps, batch 16, lr 1e-3 to 4.1). Outside that regime it is an extrapolation.",
        "horizon_steps": HORIZON,
        "label": "loss > 50 or gradient norm > 500 at any step (non-finite counts), as in the RKSP paper",
        "study": str(runs),
        "n_train": len(kept),
        "n_dropped_missing_features": len(rows) - len(kept),
        "n_diverged": sum(int(bool(r["diverged"])) for r in kept),
        "heldout_family": {
            "split": "leave one architecture family out (research/experiments/heldout_analysis.py), same inputs",
            "auroc": held["auroc"], "auroc_ci95": held["auroc_ci"], "ece": held["ece"],
            "log_loss": held["log_loss"],
            "baseline_log_lr_auroc": primary["models"]["lr"]["auroc"],
            # the plan's init-time sets only: exploratory rows are never selected (PURPOSE.md rule 6)
            "best_init_time": max(((k, m["auroc"]) for k, m in primary["models"].items() if k in INIT_TIME),
                                  key=lambda kv: kv[1]),
        },
        "l2": l2,
        "git_commit": commit,
    }
    est.save_json(out)
    return est.metadata


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("results/sweep_prediction/runs.jsonl"))
    p.add_argument("--out", type=Path, default=None,
                   help="default: hf_koopman/data/risk_estimator.json with --heldout, else "
                        "results/sweep_prediction/risk_estimator.json")
    p.add_argument("--eval-out", type=Path, default=Path("results/risk_estimator_eval.json"))
    p.add_argument("--l2", type=float, default=1.0)
    p.add_argument("--n-resamples", type=int, default=1000)
    p.add_argument("--heldout", type=Path, default=None, metavar="RUNS_JSONL",
                   help="fit on the held-out-family study's rows instead (results/heldout_risk/runs.jsonl); its "
                        "leave-one-family-out report (--heldout-report) goes into the metadata")
    p.add_argument("--heldout-report", type=Path, default=Path("results/heldout_risk/report.json"))
    p.add_argument("--reprofile", action="store_true",
                   help="recompute each run's init features with the default recipe (rebuilds the models at init, no "
                        "training) and fit on those; the fit on the stored features is recorded alongside")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.out is None:
        args.out = Path("hf_koopman/data/risk_estimator.json" if args.heldout is not None
                        else "results/sweep_prediction/risk_estimator.json")
    if args.heldout is not None:
        meta = fit_heldout(args.heldout, args.heldout_report, args.out, l2=args.l2)
        print(json.dumps(meta["heldout_family"], indent=1, default=float))
        print(f"wrote {args.out}")
        return 0
    results = fit(args.runs, args.out, args.eval_out, l2=args.l2, n_resamples=args.n_resamples,
                  reprofile=args.reprofile)
    for name, r in results.items():
        print(f"{name:35s} AUROC {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}]  ECE {r['ece']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
