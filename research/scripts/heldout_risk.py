"""The held-out-family divergence study of issue #22 (plan: `results/heldout_risk/PURPOSE.md`), resumable.

    # the full study: 13 family variants x 4 shapes x 2 tasks x 2 seeds x 13 learning rates = 2,704 runs, 150 AdamW
    # steps each; measured cost: at most 11.0 CPU-hours of one core if no run stopped early, about 8-9 expected
    # (PURPOSE.md, "Budget"; Mamba's pure-PyTorch scan is 43% of it); single-threaded, low priority
    nohup nice -n 19 env OMP_NUM_THREADS=1 HF_KOOPMAN_DATA=../shared/data \\
        python -m research.scripts.heldout_risk --out results/heldout_risk > results/heldout_risk/run.log 2>&1 &
    # the same command resumes after any interruption (finished run_ids are skipped)
    # how far it is, without running anything
    python -m research.scripts.heldout_risk --out results/heldout_risk --status
    # the plan's analysis on the rows present (partial tables allowed): OUT/report.json and OUT/reliability.png
    python -m research.scripts.heldout_risk --out results/heldout_risk --report
    # the seconds-long grid of the smoke test
    python -m research.scripts.heldout_risk --grid smoke --out /tmp/heldout_smoke
    # the curvature features recomputed with the current estimator (no training; two processes share the inits),
    # then written into features.jsonl and runs.jsonl, then the report again
    nice -n 19 env OMP_NUM_THREADS=1 python -m research.scripts.heldout_risk --refresh-curvature --shard 0/2 &
    nice -n 19 env OMP_NUM_THREADS=1 python -m research.scripts.heldout_risk --refresh-curvature --shard 1/2
    python -m research.scripts.heldout_risk --merge-curvature && python -m research.scripts.heldout_risk --report
    # per-step timing of every variant x shape (no labels are read): the budget measurement of PURPOSE.md
    python -m research.scripts.heldout_risk --timing --out /tmp/heldout_timing

Rows go to `OUT/runs.jsonl` (one per run, with the init features of its model copied in) and the per-init features to
`OUT/features.jsonl`; load them with `datasets.load_dataset("json", data_files="results/heldout_risk/runs.jsonl")`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch


def _timing(out: Path, data_dir: str | None, steps: int) -> None:
    """Seconds per optimizer step (forward + backward + AdamW) and seconds of the init features, per variant x shape,
    at the lowest ladder rung (no divergence expected); the labels are not looked at."""
    from research.experiments.heldout_risk import (
        BATCH_SIZE, LR_LADDER, SHAPES, VARIANTS, ModelSpec, _as_dataset, build_model, init_features, task_data,
    )
    from research.experiments.runner import train_run

    out.mkdir(parents=True, exist_ok=True)
    path = out / "timing.jsonl"
    for task in ("assoc_recall",):  # the step cost depends on the model and the 16 x 64 batch, not on the task
        data = task_data(task, 99, data_dir=data_dir)
        dataset = _as_dataset(data)
        for family, norm in VARIANTS:
            for n_layers, d, std in SHAPES:
                spec = ModelSpec(family, norm, n_layers, d, std, task, 99)
                t0, c0 = time.perf_counter(), time.process_time()
                feats = init_features(build_model(spec), spec, data)
                feat_s, feat_c = time.perf_counter() - t0, time.process_time() - c0
                model = build_model(spec)
                c0 = time.process_time()
                res = train_run(model, dataset, learning_rate=LR_LADDER[0], max_steps=steps,
                                batch_size=BATCH_SIZE, warmup_steps=2, seed=99, stop_on_divergence=False)
                rec = {"variant": spec.variant, "task": task, "num_layers": n_layers, "hidden_size": d,
                       "init_std": std, "sec_per_step": res.train_seconds / steps,
                       "cpu_sec_per_step": (time.process_time() - c0) / steps, "features_seconds": feat_s,
                       "features_cpu_seconds": feat_c,
                       "spectrum_seconds": feats["spectrum_seconds"], "hessian_seconds": feats["hessian_seconds"],
                       "adam_seconds": feats["adam_seconds"], "num_parameters": feats["num_parameters"],
                       "curvature_error": feats["curvature_error"], "spectrum_error": feats["spectrum_error"]}
                print(json.dumps(rec), flush=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")


def _write_pages(out: Path, report: dict, rows: list[dict]) -> None:
    """The results page next to the output folder (`results/heldout_risk.md` for `results/heldout_risk`) and the
    issue-#22 keys merged into `out.parent / "summary.json"` when that file already exists."""
    from research.experiments.heldout_report import render_markdown, summary_keys
    from research.experiments.heldout_risk import study_grid

    md = render_markdown(report, rows, total_runs=len(study_grid()))
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    summary = out.parent / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        data.update(summary_keys(report))
        summary.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def _plots(out: Path, report: dict) -> None:
    """`reliability.png` (held-out reliability diagram) and `max_lr_bound.png` (why the max-lr goal is missed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from research.experiments.heldout_analysis import calibrated_within_2x

    prim = report["primary_leave_one_family_out"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for name in ("lr", "config+lr", "config+curvature+lr", "all"):
        bins = prim["models"][name]["reliability"]
        ax.plot([b["mean_prob"] for b in bins], [b["frac_positive"] for b in bins], "o-", ms=3,
                label=f"{name} (ECE {prim['models'][name]['ece']:.3f})")
    ax.set_xlabel("predicted P(diverge), held-out family")
    ax.set_ylabel("observed fraction diverged")
    ax.set_title(f"leave-one-family-out, {report['n_runs']} runs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)

    bound = prim.get("max_lr_bound")
    if not bound:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    grid = [i / 400 for i in range(1, 400)]
    ax.plot(grid, [calibrated_within_2x(w, 0.1) for w in grid], "k-", lw=1.2,
            label="calibrated logistic estimator, one slope")
    ax.axhline(bound["goal"], color="tab:red", ls="--", lw=1, label=f"goal ({bound['goal']:.0%} at risk 0.1)")
    ax.axvline(bound["required_within_2x_risk_0.5"], color="tab:red", ls=":", lw=1,
               label=f"needed at risk 0.5 ({bound['required_within_2x_risk_0.5']:.1%})")
    for i, (name, v) in enumerate(bound["per_model"].items()):
        point = (v["within_2x_risk_0.5"], v["measured_within_2x_risk_0.1"])
        ax.plot(*point, "o", ms=4)
        ax.annotate(name.replace(" (exploratory)", "*"), point, fontsize=6, xytext=(4, 7 * (i % 3) - 7),
                    textcoords="offset points")
    ax.set_xlim(min([0.4] + [v["within_2x_risk_0.5"] - 0.05 for v in bound["per_model"].values()]), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("suggested lr within 2x of the threshold, risk 0.5 (held-out families)")
    ax.set_ylabel("within 2x, risk 0.1")
    ax.set_title("max-lr goal: fitted models (dots) against the calibrated reference", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "max_lr_bound.png", dpi=120)
    plt.close(fig)


#: the report of the study's first analysis, kept when its curvature features were recomputed (`--merge-curvature`)
BEFORE_REFRESH = "report_before_curvature_refresh.json"


def _report(out: Path, n_resamples: int) -> None:
    """The plan's metrics on the rows present, written to `out/report.json` and a reliability diagram."""
    from research.experiments.heldout_analysis import analyse
    from research.experiments.heldout_risk import REFRESH_NAME, read_jsonl

    rows = read_jsonl(out / "runs.jsonl")
    if not rows:
        raise SystemExit(f"no rows in {out / 'runs.jsonl'}; run the study first.")
    report = analyse(rows, n_resamples=n_resamples)
    before = out / BEFORE_REFRESH
    if before.is_file() and (out / REFRESH_NAME).is_file():  # the curvature features were recomputed: before/after
        from research.experiments.heldout_report import curvature_refresh_summary

        report["curvature_refresh"] = curvature_refresh_summary(
            json.loads(before.read_text(encoding="utf-8")), report, read_jsonl(out / REFRESH_NAME))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    _write_pages(out, report, rows)
    _plots(out, report)
    prim = report["primary_leave_one_family_out"]
    for name, m in prim["models"].items():
        print(f"{name:22s} AUROC {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}]  "
              f"ECE {m['ece']:.3f}  log-loss {m['log_loss']:.3f}")
    for name, d in prim["paired_differences"].items():
        print(f"{name:34s} dAUROC {d['delta_auroc']:+.3f} [{d['delta_auroc_ci'][0]:+.3f}, "
              f"{d['delta_auroc_ci'][1]:+.3f}]  dlogloss {d['delta_log_loss']:+.3f} "
              f"[{d['delta_log_loss_ci'][0]:+.3f}, {d['delta_log_loss_ci'][1]:+.3f}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/heldout_risk"), help="output folder")
    parser.add_argument("--grid", choices=("full", "smoke"), default="full")
    parser.add_argument("--data-dir", default=None, help="offline data folder (default: $HF_KOOPMAN_DATA)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--status", action="store_true", help="print how many runs are done and exit")
    parser.add_argument("--timing", action="store_true", help="measure per-step and feature costs (budget)")
    parser.add_argument("--report", action="store_true", help="analyse the rows present (report.json)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of --report")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--shard", default="0/1", help="I/N: this process runs every N-th model init from the I-th")
    parser.add_argument("--refresh-curvature", action="store_true",
                        help="recompute every init's curvature features with the current hf_koopman.curvature "
                             "(no training) into OUT/curvature_refresh.jsonl; resumable, --shard applies")
    parser.add_argument("--merge-curvature", action="store_true",
                        help="write OUT/curvature_refresh.jsonl into features.jsonl and runs.jsonl (all inits done)")
    args = parser.parse_args(argv)
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        parser.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2.")
    shard = (int(index), int(count))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from research.experiments.heldout_risk import normalise_rows, read_jsonl, run_study, smoke_grid, study_grid

    if args.timing:
        _timing(args.out, args.data_dir, args.timing_steps)
        return 0
    if args.report:
        _report(args.out, args.bootstrap)
        return 0
    if args.refresh_curvature:
        from research.experiments.heldout_risk import refresh_curvature

        refresh_curvature(args.out, data_dir=args.data_dir, shard=shard, progress=not args.no_progress)
        return 0
    if args.merge_curvature:
        import shutil

        from research.experiments.heldout_risk import merge_curvature_refresh

        before = args.out / BEFORE_REFRESH
        if not before.exists():  # the analysis of the first features, for the before/after section of the report
            shutil.copyfile(args.out / "report.json", before)
        print(f"updated {merge_curvature_refresh(args.out)} run rows")
        return 0
    runs = smoke_grid() if args.grid == "smoke" else study_grid()
    if args.status:
        rows = read_jsonl(args.out / "runs.jsonl")
        ids = {r.run_id for r in runs}
        done = [r for r in rows if r["run_id"] in ids]
        secs = sum(r["run_seconds"] for r in done)
        print(json.dumps({"done": len(done), "total": len(runs), "diverged": sum(bool(r["diverged"]) for r in done),
                          "run_cpu_seconds": round(secs, 1), "features_done": len(read_jsonl(args.out / "features.jsonl"))}))
        return 0
    run_study(runs, args.out, data_dir=args.data_dir, limit=args.limit, progress=not args.no_progress, shard=shard)
    done = {r["run_id"] for r in read_jsonl(args.out / "runs.jsonl")}
    if all(r.run_id in done for r in runs):  # the table is complete: give every row the same key set
        normalise_rows(args.out / "runs.jsonl")
        normalise_rows(args.out / "features.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
