"""KSS on the faithful operator in the paper's No-Norm regime (issue #23; plan: `results/kss_v2/PURPOSE.md`).

    python -m research.scripts.kss_v2 timing            # step 0: 30-step runs, seconds per step
    python -m research.scripts.kss_v2 pilot             # step 1: control, L in {4, 6, 8}, seeds 900-905
    python -m research.scripts.kss_v2 ratio             # step 2: KSS / task gradient at the pilot's setting
    python -m research.scripts.kss_v2 compare [--arms A,B] [--deadline HH:MM]   # step 3: 24 trials per arm
    python -m research.scripts.kss_v2 max_lr [--deadline HH:MM]                  # step 4: max stable LR
    python -m research.scripts.kss_v2 report            # results/kss_v2.md and the summary.json keys, from the rows

Rows: one JSON line per trial in `results/kss_v2/{timing,pilot,ratio,runs,max_lr}.jsonl`; every stage skips the
trials already in its file, so a stage can be restarted. `--deadline` (UTC) stops starting trials that would end
after it (estimated from the longest trial so far). Cost: one CPU core; see `results/kss_v2/PURPOSE.md` for the
measured seconds per trial and the budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

OUT = Path("results/kss_v2")
STAGE_FILES = {"timing": "timing.jsonl", "pilot": "pilot.jsonl", "ratio": "ratio.jsonl", "compare": "runs.jsonl",
               "max_lr": "max_lr.jsonl"}


def _deadline(hhmm: str | None) -> float | None:
    if not hhmm:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    h, m = (int(x) for x in hhmm.split(":"))
    return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()


def _run(specs, path: Path, deadline: float | None) -> None:
    from research.experiments.sweep import dump_row, execute, read_rows

    done = {r["run_id"] for r in read_rows(path)}
    todo = [s for s in specs if s.run_id not in done]
    print(f"{len(done)} done, {len(todo)} to go -> {path}", flush=True)
    longest = 0.0
    for i, spec in enumerate(todo):
        if deadline is not None and time.time() + longest > deadline:
            print(f"deadline: stopping with {len(todo) - i} trials not started", flush=True)
            return
        t0 = time.time()
        row = execute(spec, features=True)
        row["wall_seconds"] = time.time() - t0
        longest = max(longest, row["wall_seconds"])
        with path.open("a", encoding="utf-8") as f:
            f.write(dump_row(row) + "\n")
        print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {spec.run_id}: diverged={row['diverged']} "
              f"step={row['divergence_step']} steps={row['steps_run']} {row['wall_seconds']:.1f}s", flush=True)


def _setting():
    from research.experiments.kss_v2 import pick_setting
    from research.experiments.sweep import read_rows

    return pick_setting(read_rows(OUT / STAGE_FILES["pilot"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["timing", "pilot", "ratio", "compare", "max_lr", "report"])
    p.add_argument("--arms", default=None, help="comma-separated arms of the comparison (default: all six)")
    p.add_argument("--deadline", default=None, help="UTC HH:MM after which no trial may end")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.disable(logging.WARNING)  # transformers / KSS per-step warnings would flood the log of a sweep
    from research.experiments import kss_v2 as K
    from research.experiments.sweep import read_rows

    OUT.mkdir(parents=True, exist_ok=True)
    deadline = _deadline(args.deadline)
    if args.stage == "timing":
        _run(K.timing_specs(), OUT / STAGE_FILES["timing"], deadline)
    elif args.stage == "pilot":
        _run(K.pilot_specs(K.STEPS), OUT / STAGE_FILES["pilot"], deadline)
    elif args.stage == "ratio":
        setting = _setting()
        path = OUT / STAGE_FILES["ratio"]
        done = {(r["seed"], r["step"]) for r in read_rows(path)}
        for i, seed in enumerate(K.RATIO_SEEDS):
            for step in (0, K.WARMUP) if i == 0 else (0,):  # after warmup: first seed only (budget, PURPOSE.md)
                if (seed, step) in done:
                    continue
                row = K.gradient_ratio(setting["num_layers"], seed, K.LRS[i % len(K.LRS)], steps_before=step)
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    elif args.stage == "compare":
        setting = _setting()
        arms = args.arms.split(",") if args.arms else list(K.REQUIRED_ARMS + K.OPTIONAL_ARMS)
        unknown = set(arms) - set(K.REQUIRED_ARMS + K.OPTIONAL_ARMS)
        if unknown:
            p.error(f"unknown arms {sorted(unknown)}; choose from {K.REQUIRED_ARMS + K.OPTIONAL_ARMS}")
        _run(K.comparison_specs(setting["num_layers"], K.STEPS, arms=arms), OUT / STAGE_FILES["compare"], deadline)
    elif args.stage == "max_lr":
        _run(K.max_lr_specs(_setting()["num_layers"], K.STEPS), OUT / STAGE_FILES["max_lr"], deadline)
    else:
        rows = {stage: read_rows(OUT / name) for stage, name in STAGE_FILES.items()}
        setting = K.pick_setting(rows["pilot"]) if rows["pilot"] else None
        markdown, keys = K.report(timing=rows["timing"], pilot=rows["pilot"], ratios=rows["ratio"],
                                  runs=rows["compare"], max_lr=rows["max_lr"], setting=setting, steps=K.STEPS)
        Path("results/kss_v2.md").write_text(markdown, encoding="utf-8")
        if keys:
            summary_path = Path("results/summary.json")
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            summary_path.write_text(json.dumps(K.merge_summary(summary, keys), indent=2, default=float) + "\n")
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
