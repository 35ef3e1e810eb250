"""Run one training trial and record what the RKSP evaluation needs: per-step loss and pre-clip gradient norm, the
paper's divergence label, the gradient baselines and a final evaluation.

Two back-ends with the same record:

* `train_run` - a plain AdamW loop (fast; used for the large prediction sweep, where no regulariser is involved);
* `train_with_trainer` - the Hugging Face `Trainer` (or `hf_koopman.KSSTrainer` with `KSSTrainingArguments`), i.e. the
  same code path as user models; used for every prevention comparison (control / clipping / KSS share it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .divergence import gradient_baselines, is_divergent_step, label_divergence

__all__ = ["RunResult", "train_run", "train_with_trainer", "evaluate_model", "total_grad_norm"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outcome of one trial. `losses` / `grad_norms` are per optimizer step (grad norm before any clipping); `losses`
    is the model's own (task) loss, `objective_losses` what the optimizer minimised (task loss plus any regulariser,
    e.g. alpha * L_KSS; empty when it equals `losses`)."""

    losses: list[float]
    grad_norms: list[float]
    diverged: bool
    divergence_step: int | None
    divergence_reason: str | None
    baselines: dict[str, float]
    eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    objective_losses: list[float] = field(default_factory=list)

    def to_dict(self, *, with_history: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_history:
            d.pop("losses")
            d.pop("grad_norms")
            d.pop("objective_losses")
        return d


def total_grad_norm(model: nn.Module) -> float:
    """L2 norm of all parameter gradients (`inf` / `nan` propagate)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _batch(ds_tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in ds_tensors.items()}


def _tensors(dataset) -> dict[str, torch.Tensor]:
    cols = [c for c in ("input_ids", "pixel_values", "labels") if c in dataset.column_names]
    rows = dataset.with_format("torch", columns=cols)[:]  # one dict of stacked tensors
    return {c: torch.as_tensor(rows[c]) for c in cols}


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, *, batch_size: int = 256) -> dict[str, float]:
    """Accuracy (classification heads: argmax vs `labels`; LM: next-token accuracy) and, for LMs, perplexity =
    exp(mean token CE). Non-finite logits give `accuracy = nan` rather than an error (a diverged model)."""
    model.eval()
    data = _tensors(dataset)
    n = len(data["labels"])
    correct, total, ce_sum = 0.0, 0, 0.0
    is_lm = data["labels"].ndim == 2
    for start in range(0, n, batch_size):
        b = {k: v[start : start + batch_size] for k, v in data.items()}
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
        if not torch.isfinite(logits).all():
            model.train()
            return {"accuracy": float("nan"), **({"perplexity": float("nan")} if is_lm else {})}
        if is_lm:
            lg, lb = logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1)
            ce_sum += float(F.cross_entropy(lg, lb, reduction="sum"))
            correct += float((lg.argmax(-1) == lb).sum())
            total += lb.numel()
        else:
            correct += float((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    model.train()
    out = {"accuracy": correct / total}
    if is_lm:
        out["perplexity"] = math.exp(min(ce_sum / total, 50.0))
    return out


def _finish(losses, grads, t0, model, eval_dataset) -> RunResult:
    lab = label_divergence(losses, grads)
    ev = evaluate_model(model, eval_dataset) if eval_dataset is not None else {}
    return RunResult(
        losses=losses, grad_norms=grads, diverged=lab.diverged, divergence_step=lab.step,
        divergence_reason=lab.reason, baselines=gradient_baselines(losses, grads), eval=ev,
        train_seconds=time.perf_counter() - t0,
    )


def train_run(
    model: nn.Module,
    train_dataset,
    *,
    learning_rate: float,
    max_steps: int,
    batch_size: int = 32,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = None,
    seed: int = 0,
    eval_dataset=None,
    stop_on_divergence: bool = True,
) -> RunResult:
    """Train with AdamW (linear warmup over `warmup_steps`, then constant LR) for `max_steps` steps.

    Stops at the first divergent step (loss > 50, grad norm > 500 or non-finite) when `stop_on_divergence`, since
    nothing after it changes the label. The gradient norm is measured before clipping.
    """
    if learning_rate <= 0 or max_steps < 1 or batch_size < 1 or warmup_steps < 0:
        raise ValueError(f"need learning_rate > 0, max_steps >= 1, batch_size >= 1, warmup_steps >= 0; got "
                         f"{learning_rate=}, {max_steps=}, {batch_size=}, {warmup_steps=}.")
    data = _tensors(train_dataset)
    n = len(data["labels"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    model.train()
    losses: list[float] = []
    grads: list[float] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.perf_counter()
    for _ in range(max_steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        batch = _batch(data, perm[pos : pos + batch_size])
        pos += batch_size
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = total_grad_norm(model)
        losses.append(float(loss.detach()))
        grads.append(g)
        if stop_on_divergence and is_divergent_step(losses[-1], g):
            break
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
    return _finish(losses, grads, t0, model, eval_dataset)


def train_with_trainer(
    model: nn.Module,
    train_dataset,
    args,
    *,
    trainer_cls=None,
    eval_dataset=None,
    callbacks: list | None = None,
    stop_on_divergence: bool = True,
) -> RunResult:
    """Train through a Hugging Face `Trainer` subclass (default: `transformers.Trainer`; pass
    `hf_koopman.KSSTrainer` with `KSSTrainingArguments` for KSS) and return the same `RunResult` as `train_run`.

    Per step, read inside the trainer because `logs["loss"]` hides NaN steps: the model's own loss (`outputs.loss`,
    the task loss), the objective `compute_loss` returned (task loss plus any regulariser) and the pre-clip gradient
    norm of that objective. The divergence label uses the task loss and the gradient norm: the paper's "loss > 50"
    is about the model's loss, and the KSS penalty's *value* can exceed 50 on its own when the spectrum is far outside
    the unit band while the task loss is fine (seen on the Mixtral MoE at LR 1: alpha * L_KSS = 5e9 at a KSS step, task
    loss ~10 before and after). Requires `gradient_accumulation_steps == 1` so that the gradient is complete after one
    `training_step`.
    """
    from transformers import Trainer, TrainerCallback

    if args.gradient_accumulation_steps != 1:
        raise ValueError("train_with_trainer needs gradient_accumulation_steps=1 to read per-step gradient norms.")
    base = trainer_cls or Trainer
    losses: list[float] = []
    objective: list[float] = []
    grads: list[float] = []
    task: list[float] = []

    class _Recording(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                own = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
                task.append(float(own.detach()))
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            task.clear()
            loss = super().training_step(model, inputs, num_items_in_batch)
            objective.append(float(loss.detach()))
            # single process, GA 1: one compute_loss call per step; fall back to the objective if none was seen
            losses.append(task[-1] if task else objective[-1])
            grads.append(total_grad_norm(self.accelerator.unwrap_model(model)))
            return loss

    class _StopOnDivergence(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_on_divergence and losses and is_divergent_step(losses[-1], grads[-1]):
                control.should_training_stop = True

    trainer = _Recording(
        model=model, args=args, train_dataset=train_dataset, callbacks=[_StopOnDivergence(), *(callbacks or [])]
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # sweeps run thousands of trials; the summary print is noise there
    t0 = time.perf_counter()
    trainer.train()
    result = _finish(losses, grads, t0, model, eval_dataset)
    result.train_seconds = time.perf_counter() - t0
    if any(a != b for a, b in zip(objective, losses)):
        result.objective_losses = objective
    return result
