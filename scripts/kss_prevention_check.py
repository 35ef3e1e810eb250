"""Prevention check behind results/kss_gradient_scale.md: control vs KSS alpha=0.15 with and without the gradient cap.

    python scripts/kss_prevention_check.py ARM TRIALS [OUT_DIR]
    ARM    = control | kss_uncapped | kss_ratio<r> (e.g. kss_ratio0.5; r = KSSConfig.max_grad_ratio)
    TRIALS = comma-separated trial indices (trial t: seed 100 + t, LR 0.0075 for even t, 0.01 for odd t)

No-Norm research GPT (d = 32, L = 4), associative recall, 150 steps, through KSSTrainer (see hf_koopman.experiments).
Appends one JSON line per trial to OUT_DIR/val2_<arm>.jsonl (default results/kss_gradient_scale/).
"""
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
logging.disable(logging.WARNING)
from hf_koopman.experiments.sweep import RunSpec, execute
from hf_koopman.training import arguments as A

arm = sys.argv[1]; trials = [int(t) for t in sys.argv[2].split(",")]
orig = A.KSSTrainingArguments.kss_config
if arm.startswith("kss_ratio"):
    _r = float(arm[len("kss_ratio"):])
    A.KSSTrainingArguments.kss_config = lambda self: dataclasses.replace(orig(self), max_grad_ratio=_r)
if arm == "kss_uncapped":
    A.KSSTrainingArguments.kss_config = lambda self: dataclasses.replace(orig(self), max_grad_ratio=None)
from hf_koopman.experiments import runner as R
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
out_dir.mkdir(parents=True, exist_ok=True)
out = open(out_dir / f"val2_{arm}.jsonl", "a")
for t in trials:
    spec = RunSpec(norm="none", learning_rate=LRS[t % 2], seed=100 + t, num_layers=4, hidden_size=32, max_steps=150,
                   method="none" if arm == "control" else "kss0.15", backend="trainer", group="prevention")
    row = execute(spec)
    row["arm"] = arm
    row["max_grad_kss_steps"] = HIST["kss"]; row["max_grad_other_steps"] = HIST["other"]; row["grad_step0"] = HIST["step0"]
    keep = {k: row.get(k) for k in ("arm", "seed", "learning_rate", "diverged", "divergence_step", "divergence_reason",
                                     "steps_run", "final_loss", "eval_accuracy", "near_unit_mass_mean",
                                     "final_near_unit_mass_mean", "train_seconds",
                                     "max_grad_kss_steps", "max_grad_other_steps", "grad_step0")}
    out.write(json.dumps(keep) + "\n"); out.flush()
    print(json.dumps(keep), flush=True)
