"""Prevention check behind results/kss_gradient_scale.md: control vs KSS alpha=0.15 with and without the gradient cap.

    python -m research.scripts.kss_prevention_check ARM TRIALS [OUT_DIR [SETTING]]
    python -m research.scripts.kss_prevention_check --summary [OUT_DIR]      # markdown table of the arms in OUT_DIR
    python -m research.scripts.kss_prevention_check max_lr - [OUT_DIR]       # max-LR grid's kss0.15 arm with the default cap
    ARM    = control | kss_uncapped | kss_ratio<r> (e.g. kss_ratio0.5; r = KSSConfig.max_grad_ratio, parameter-space
             norms) | kss_act<r> (the same ratio with KSSConfig.grad_cap = "activations")
    TRIALS = comma-separated trial indices (trial t: seed 100 + t, LR 0.0075 for even t, 0.01 for odd t)
    SETTING = nonorm (default, below) | moe_lr<LR> (Mixtral-style MoE of RESULTS.md 5b at that LR, e.g. moe_lr1;
              trial t: seed t; rows go to OUT_DIR/val2_moe_lr<LR>_<arm>.jsonl)

No-Norm research GPT (d = 32, L = 4), associative recall, 150 steps, through KSSTrainer (see research.experiments).
Appends one JSON line per trial to OUT_DIR/val2_<arm>.jsonl (default results/kss_gradient_scale/).
"""
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import torch


def summary(out_dir: Path) -> str:
    """Markdown table of the val2_<arm>.jsonl files in `out_dir`: divergences, accuracy and M≈1 after training."""
    lines = ["| arm | trials | diverged | seeds that diverged | eval accuracy (finished runs) | M≈1 after training "
             "(finished runs) | median of the per-run max grad norm on KSS steps |", "|---|---|---|---|---|---|---|"]
    for path in sorted(out_dir.glob("val2_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done = [r for r in rows if not r["diverged"]]
        div = sorted(r["seed"] for r in rows if r["diverged"])
        kss = sorted(r["max_grad_kss_steps"] for r in rows if r.get("max_grad_kss_steps") is not None)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        lines.append(
            f"| {path.stem[5:]} | {len(rows)} | {len(div)} | {', '.join(map(str, div)) or '-'} | "
            f"{mean([r['eval_accuracy'] for r in done]):.4f} | "
            f"{mean([r['final_near_unit_mass_mean'] for r in done if r['final_near_unit_mass_mean'] is not None]):.3f} | "
            f"{kss[len(kss) // 2] if kss else float('nan'):.2f} |"
        )
    return "\n".join(lines)


MAX_LR_FILE = "max_lr_kss0.15_activations.jsonl"


def max_lr_summary(out_dir: Path) -> str:
    """Max stable LR (< 20 % divergence) of the activation-cap KSS arm beside the RESULTS.md max-LR table's arms."""
    from research.experiments.analysis import max_stable_lr_table
    from research.experiments.sweep import read_rows

    act = [{**r, "method": "kss0.15 (activations)"} for r in read_rows(out_dir / MAX_LR_FILE)]
    old = read_rows(Path("results/sweep_max_lr/runs.jsonl"))
    base = [r for r in read_rows(Path("results/sweep_prediction_100steps/runs.jsonl"))
            if r["norm"] in ("pre_ln", "rmsnorm", "none") and r["hidden_size"] == 32 and r["num_layers"] == 4]
    table = max_stable_lr_table(base + old + act)
    arms = ("none", "kss0.15", "kss0.15 (activations)", "kss0.15-uncapped")
    lines = ["| norm | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for norm in ("pre_ln", "rmsnorm", "none"):
        cells = []
        for arm in arms:
            c = table.get(norm, {}).get(arm)
            cells.append("-" if c is None else ("≥" if c["censored"] else "") + f"{c['max_stable_lr']}"
                         + f" ({', '.join(f'{k}: {v:.2f}' for k, v in c['rates'].items())})")
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_ARM = re.compile(r"control|kss_uncapped|max_lr|kss_(ratio|act)\d+(\.\d+)?")
if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or (
        sys.argv[1] != "--summary" and (not _ARM.fullmatch(sys.argv[1]) or len(sys.argv) < 3 or not re.fullmatch(
            r"-" if sys.argv[1] == "max_lr" else r"\d+(,\d+)*", sys.argv[2]))):
    # the module docstring is the usage; an unknown ARM would otherwise run as a KSS trial under its name
    asked = len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help")
    print(__doc__ if asked else f"unknown or incomplete arguments {sys.argv[1:]}; usage:\n{__doc__}",
          file=sys.stdout if asked else sys.stderr)
    sys.exit(0 if asked else 2)

if len(sys.argv) >= 2 and sys.argv[1] == "--summary":  # python -m research.scripts.kss_prevention_check --summary DIR
    out_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "results/kss_gradient_scale")
    print(summary(out_dir))
    if (out_dir / MAX_LR_FILE).exists():
        print("\nMax stable LR (divergence rate per LR in brackets):\n\n" + max_lr_summary(out_dir))
    sys.exit(0)

torch.set_num_threads(1)
logging.disable(logging.WARNING)
from research.experiments.sweep import RunSpec, execute
from hf_koopman.training import arguments as A

arm = sys.argv[1]; trials = [] if arm == "max_lr" else [int(t) for t in sys.argv[2].split(",")]
orig = A.KSSTrainingArguments.kss_config
for _prefix, _cap in (("kss_ratio", "parameters"), ("kss_act", "activations")):  # capped arms: kss_ratio0.5, kss_act0.5
    if arm.startswith(_prefix):
        _overrides = {"max_grad_ratio": float(arm[len(_prefix):]), "grad_cap": _cap}
        A.KSSTrainingArguments.kss_config = lambda self: dataclasses.replace(orig(self), **_overrides)
if arm == "kss_uncapped":
    A.KSSTrainingArguments.kss_config = lambda self: dataclasses.replace(orig(self), max_grad_ratio=None)
if arm == "max_lr":  # python -m research.scripts.kss_prevention_check max_lr - OUT_DIR: the max-LR grid's KSS arm, default cap
    from research.experiments.grids import max_lr_grid
    from research.experiments.sweep import run_sweep

    out_dir = Path(sys.argv[3] if len(sys.argv) > 3 else "results/kss_gradient_scale/session3")
    run_sweep([s for s in max_lr_grid() if s.method == "kss0.15"], out_dir / MAX_LR_FILE, features=False)
    sys.exit(0)
from research.experiments import runner as R
_orig_finish = R._finish
HIST = {}
def _finish(losses, grads, *a, **k):
    HIST["kss"] = max([g for i, g in enumerate(grads) if i % 10 == 0], default=None)
    HIST["other"] = max([g for i, g in enumerate(grads) if i % 10 != 0], default=None)
    HIST["step0"] = grads[0] if grads else None
    return _orig_finish(losses, grads, *a, **k)
R._finish = _finish
LRS = (0.0075, 0.01)
out_dir = Path(sys.argv[3] if len(sys.argv) > 3 else "results/kss_gradient_scale")
setting = sys.argv[4] if len(sys.argv) > 4 else "nonorm"
if setting != "nonorm" and not (setting.startswith("moe_lr") and setting[6:].replace(".", "", 1).isdigit()):
    sys.exit(f"unknown setting {setting!r}: 'nonorm' (default) or 'moe_lr<LR>' (e.g. moe_lr1)")
out_dir.mkdir(parents=True, exist_ok=True)
out = open(out_dir / f"val2_{'' if setting == 'nonorm' else setting + '_'}{arm}.jsonl", "a")
for t in trials:
    method = "none" if arm == "control" else "kss0.15"
    if setting.startswith("moe_lr"):  # the Mixtral-style MoE of RESULTS.md 5b at one LR (trial t: seed t)
        spec = RunSpec(norm="rmsnorm", learning_rate=float(setting[6:]), seed=t, hidden_size=64, num_layers=4, task="synthetic_lm",
                       max_steps=150, method=method, backend="trainer", group="moe", arch="mixtral", top_k=2)
    else:
        spec = RunSpec(norm="none", learning_rate=LRS[t % 2], seed=100 + t, num_layers=4, hidden_size=32,
                       max_steps=150, method=method, backend="trainer", group="prevention")
    row = execute(spec)
    row["arm"] = arm
    row["max_grad_kss_steps"] = HIST["kss"]; row["max_grad_other_steps"] = HIST["other"]; row["grad_step0"] = HIST["step0"]
    keep = {k: row.get(k) for k in ("arm", "seed", "learning_rate", "diverged", "divergence_step", "divergence_reason",
                                     "steps_run", "final_loss", "eval_accuracy", "near_unit_mass_mean",
                                     "final_near_unit_mass_mean", "train_seconds",
                                     "max_grad_kss_steps", "max_grad_other_steps", "grad_step0")}
    out.write(json.dumps(keep) + "\n"); out.flush()
    print(json.dumps(keep), flush=True)
