"""Rollback vs stop on diverging CPU runs (issue 20): writes results/safety_net.json and the Results section of
results/safety_net.md (the part above "## Results", the plan, is kept as written before the run).

    python -m research.scripts.safety_net_check            # all regimes, ~8 minutes on 2 cores
    python -m research.scripts.safety_net_check --quick    # one seed per regime, 20 steps (smoke test)
    python -m research.scripts.safety_net_check --relative-loss-threshold 3 --out results/safety_net_relative
                                                           # the same runs with the guard's relative loss limit
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from research.experiments.sweep import RunSpec, build_model, task_datasets
from hf_koopman.training import RKSPCallback


REPO = Path(__file__).resolve().parents[2]
BACKOFF = 0.5
MAX_ROLLBACKS = 3
STEPS = 40
REGIMES = {
    "nonorm": (RunSpec(norm="none", learning_rate=0.03, seed=0, task="assoc_recall", max_steps=STEPS), 3),
    "moe1.5": (RunSpec(norm="rmsnorm", learning_rate=1.5, seed=0, hidden_size=64, task="synthetic_lm", max_steps=STEPS,
                       arch="mixtral", top_k=2), 2),
    "moe2": (RunSpec(norm="rmsnorm", learning_rate=2.0, seed=0, hidden_size=64, task="synthetic_lm", max_steps=STEPS,
                     arch="mixtral", top_k=2), 2),
    "poison": (RunSpec(norm="pre_ln", learning_rate=3e-3, seed=0, task="assoc_recall", max_steps=STEPS), 3),
}


class Poison(TrainerCallback):
    """Multiplies the token embeddings of one step's batch by 1e30 (a corrupt batch whose activations overflow)."""

    def __init__(self, step: int) -> None:
        self.step, self.handle = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:  # only that one batch: the evaluation after a stop must not see the poison
            self.handle.remove()
            self.handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            embed = model.get_input_embeddings()
            self.handle = embed.register_forward_hook(lambda module, inputs, out: out * 1e30)


def eval_loss(model: torch.nn.Module, dataset) -> float:
    data = dataset.with_format("torch")[:]
    batch = {k: torch.as_tensor(v) for k, v in data.items() if k in ("input_ids", "labels")}
    model.eval()
    with torch.no_grad():
        losses = [float(model(**{k: v[i : i + 64] for k, v in batch.items()}).loss) for i in range(0, len(batch["labels"]), 64)]
    model.train()
    return statistics.fmean(losses)


def run(spec: RunSpec, mode: str, *, poison: bool, train_ds, eval_ds, relative: float | None = None) -> dict:
    model = build_model(spec)
    init = eval_loss(model, eval_ds)
    guard = RKSPCallback(profile_at_init=False, check_activations=True, on_divergence=mode,
                         max_rollbacks=MAX_ROLLBACKS, lr_backoff=BACKOFF, relative_loss_threshold=relative)
    callbacks = [Poison(spec.max_steps // 2)] if poison else []
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate, warmup_steps=spec.warmup_steps, lr_scheduler_type="constant_with_warmup",
            weight_decay=0.01, max_grad_norm=0.0, seed=spec.seed, data_seed=spec.seed, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[*callbacks, guard])
        guard.bind(trainer)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    final = eval_loss(model, eval_ds)
    return {
        "mode": mode,
        "learning_rate": spec.learning_rate,
        "poison": poison,
        "finished": guard.divergence is None and trainer.state.global_step == spec.max_steps,
        "steps": trainer.state.global_step,
        "rollbacks": guard.rollbacks,
        "trips": [e["step"] for e in guard.events],
        "restored": [e.get("restored_step") for e in guard.events],
        "causes": [e["cause_flags"] for e in guard.events],
        "init_eval_loss": init,
        "reference_loss": guard.reference_loss,
        "final_eval_loss": final if math.isfinite(final) else str(final),
        "seconds": round(seconds, 2),
    }


def summarise(rows: list[dict]) -> dict:
    out = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        sub = [r for r in rows if r["regime"] == regime]
        arm = {m: [r for r in sub if r["arm"] == m] for m in ("stop", "rollback", "backed-off")}
        diffs = []
        for r in arm["rollback"]:
            base = [b for b in arm["backed-off"] if b["seed"] == r["seed"]]
            if base and isinstance(r["final_eval_loss"], float) and isinstance(base[0]["final_eval_loss"], float):
                diffs.append(r["final_eval_loss"] - base[0]["final_eval_loss"])
        out[regime] = {
            arm_name: {
                "runs": len(group),
                "finished": sum(g["finished"] for g in group),
                "rollbacks": [g["rollbacks"] for g in group],
                "first_trip": [g["trips"][0] if g["trips"] else None for g in group],
                "first_restored": [g["restored"][0] if g.get("restored") else None for g in group],
                "final_eval_loss": [g["final_eval_loss"] for g in group],
                "init_eval_loss": [g.get("init_eval_loss") for g in group],
            }
            for arm_name, group in arm.items() if group
        }
        out[regime]["rollback_minus_backed_off"] = diffs
    return out


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(summary: dict, meta: dict) -> str:
    cpu = f" ({meta['cpu_seconds']:.0f} CPU-s)" if "wall_seconds" in meta else ""
    lines = ["## Results", "", f"`{meta['command']}`, {meta.get('wall_seconds', meta['cpu_seconds']):.0f} s wall{cpu} on "
             f"{meta['threads']} threads, torch {meta['torch']}, transformers {meta['transformers']}.", "",
             "| regime | arm | finished | rollbacks per run | first trip (step) | restored to (step) "
             "| final eval loss per seed | init eval loss per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for regime, arms in summary.items():
        for arm in ("stop", "rollback", "backed-off"):
            if arm not in arms:
                continue
            a = arms[arm]
            lines.append(f"| {regime} | {arm} | {a['finished']}/{a['runs']} | {a['rollbacks']} | {a['first_trip']} | "
                         f"{a.get('first_restored', '-')} | {', '.join(fmt(v) for v in a['final_eval_loss'])} | "
                         f"{', '.join(fmt(v) for v in a.get('init_eval_loss', [])) or '-'} |")
    lines += ["", "Rollback minus backed-off final eval loss, per seed that has both:", ""]
    for regime, arms in summary.items():
        d = arms["rollback_minus_backed_off"]
        mean = f" (mean {statistics.fmean(d):+.3f})" if d else ""
        lines.append(f"* {regime}: {', '.join(f'{v:+.3f}' for v in d) or 'none'}{mean}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps per regime (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "safety_net")
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES),
                        help="re-run only these regimes and replace their rows in the existing JSON")
    parser.add_argument("--relative-loss-threshold", type=float, default=None,
                        help="the guard's relative_loss_threshold (default: off, the paper's rule alone)")
    args = parser.parse_args(argv)
    relative = args.relative_loss_threshold
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    for regime, (base, seeds) in REGIMES.items():
        if args.regimes and regime not in args.regimes:
            continue
        poison = regime == "poison"
        for seed in range(1 if args.quick else seeds):
            spec = replace(base, seed=seed, max_steps=20 if args.quick else base.max_steps)
            train_ds, eval_ds = task_datasets(spec, num_train=spec.max_steps * spec.batch_size, num_eval=256)
            for mode in ("stop", "rollback"):
                row = run(spec, mode, poison=poison, train_ds=train_ds, eval_ds=eval_ds, relative=relative)
                rows.append({"regime": regime, "seed": seed, "arm": mode, **row})
                print(regime, seed, mode, row, flush=True)
            k = rows[-1]["rollbacks"]
            if k:
                lowered = replace(spec, learning_rate=spec.learning_rate * BACKOFF**k)
                row = run(lowered, "stop", poison=False, train_ds=train_ds, eval_ds=eval_ds, relative=relative)
                rows.append({"regime": regime, "seed": seed, "arm": "backed-off", **row})
                print(regime, seed, "backed-off", row, flush=True)
    import transformers

    flags = (" --quick" if args.quick else "") + (f" --relative-loss-threshold {relative:g}" if relative else "")
    meta = {"command": "python -m research.scripts.safety_net_check" + flags,
            "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    out_json = args.out.with_suffix(".json")
    if args.regimes and out_json.exists():  # keep the other regimes' rows from the previous full run
        previous = json.loads(out_json.read_text(encoding="utf-8"))
        rows = [r for r in previous["runs"] if r["regime"] not in args.regimes] + rows
        rows.sort(key=lambda r: list(REGIMES).index(r["regime"]))
        old = previous["meta"]
        meta["wall_seconds"] += old.get("wall_seconds", old["cpu_seconds"])  # an older file holds wall time under cpu_seconds
        meta["cpu_seconds"] = meta["cpu_seconds"] + old["cpu_seconds"] if "wall_seconds" in old else float("nan")
        meta["rerun"] = {"regimes": args.regimes, "seconds": time.perf_counter() - t0}
        meta["command"] = previous["meta"]["command"] + "; then --regimes " + " ".join(args.regimes)
    summary = summarise(rows)
    if args.quick:
        print(markdown(summary, meta))
        return
    out_json.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1), encoding="utf-8")
    md = args.out.with_suffix(".md")
    text = md.read_text(encoding="utf-8") if md.exists() else ""
    head = text.split("## Results")[0] if "## Results" in text else text
    tail = ""
    for kept in ("## Reading", "## Overhead"):  # written by hand after a run: kept when the results are regenerated
        if kept in text:
            tail = f"\n{kept}" + text.split(kept, 1)[1]
            break
    md.write_text(head + markdown(summary, meta) + tail, encoding="utf-8")
    print(f"wrote {out_json} and {md}")


if __name__ == "__main__":
    main()
