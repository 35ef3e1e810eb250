"""The guard under a loss scaler (fp16 mixed precision): it judges the gradient norm in the loss's own units, and the
scaler's overflow steps (non-finite scaled gradients, which the scaler skips) are not divergences.

accelerate builds its `GradScaler` for fp16 on a GPU only; here the Trainer's accelerator gets a CPU one, and its
`unscale_gradients` does what accelerate's does under fp16 before clipping (`scaler.unscale_` per optimizer). The
optimizer the Trainer prepares then carries the scaler, as it does under fp16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import TokenDataset, blow_up_args, cpu_training_args, exact_guard, tiny_gpt2


def _with_scaler(trainer: Trainer, init_scale: float) -> Trainer:
    accelerator = trainer.accelerator
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def unscale_gradients(optimizer=None):
        for opt in accelerator._optimizers if optimizer is None else [optimizer]:
            accelerator.scaler.unscale_(getattr(opt, "optimizer", opt))

    accelerator.unscale_gradients = unscale_gradients
    return trainer


def _scaled_run(tmp_path, init_scale: float | None, model=None, guard_kw=None, **args_kw):
    """Train `model` (a tiny GPT-2 by default) under a CPU loss scaler of `init_scale` (none: `None`) with a stopping
    exact guard; returns `(trainer, guard, metrics)`. `args_kw` override the short run's arguments."""
    base = dict(max_steps=2, learning_rate=1e-3, max_grad_norm=1.0)
    args = cpu_training_args(tmp_path, TrainingArguments, **{**base, **args_kw})
    guard = exact_guard(on_divergence="stop", **(guard_kw or {}))
    trainer = Trainer(model=model if model is not None else tiny_gpt2(), args=args, train_dataset=TokenDataset(),
                      callbacks=[guard])
    if init_scale is not None:
        _with_scaler(trainer, init_scale)
    return trainer, guard, trainer.train().metrics


class LossTerm(torch.nn.Module):
    """A tiny GPT-2 whose loss gets `term(loss, w)` added, with `w` `extra` extra weights (zeros)."""

    def __init__(self, term, extra: int = 1) -> None:
        super().__init__()
        self.inner = tiny_gpt2()
        self.w = torch.nn.Parameter(torch.zeros(extra))
        self.config = self.inner.config
        self.term = term

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = self.inner(input_ids=input_ids, labels=labels)
        out["loss"] = out["loss"] + self.term(out["loss"], self.w)
        return out


def _huge_gradient(loss, w):
    """Value 0, gradient 2.5e14 on each of 16 weights (norm 1e15, finite): scaled by 65536, the sum of their squares
    (4e39) exceeds float32."""
    return ((w - w.detach()) * 2.5e14).sum()


def _nan_gradient(loss, w):
    """Value 0, gradient NaN on the extra weight on every step (a finite loss)."""
    nan_grad = (w * torch.tensor(float("nan"))).sum()
    return (nan_grad - nan_grad.detach()).nan_to_num(0.0)


def _nan_loss(loss, w):
    """A NaN loss: its gradients overflow too, which the scaler would skip."""
    return loss * float("nan")


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # norm read after backward / before the optimizer step
@pytest.mark.parametrize("init_scale", [65536.0, 1e38])  # gradients x 65536 / an overflow on the first steps
def test_scaled_gradients_and_overflow_steps_are_not_divergences(tmp_path, max_grad_norm, init_scale):
    trainer, guard, metrics = _scaled_run(tmp_path, init_scale, max_steps=6, max_grad_norm=max_grad_norm)
    assert metrics["rksp/diverged"] == 0.0 and not guard.events
    assert trainer.state.global_step == 6
    if init_scale > 1e30:  # the scaler did skip updates, and lowered its scale
        assert trainer.accelerator.scaler.get_scale() < init_scale


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_the_norm_is_judged_in_the_losss_units(tmp_path, max_grad_norm):
    """A threshold below the first step's norm trips on step 1; the judged norm equals the one without a scaler (the
    scale, 2^16, is exact in float32). Dividing twice, or not at all, changes it by 65536x."""
    norms = []
    for scale in (None, 65536.0):
        _, guard, _ = _scaled_run(tmp_path / str(scale), scale, guard_kw={"grad_norm_threshold": 0.5},
                                  max_grad_norm=max_grad_norm)
        assert guard.events and guard.events[0]["step"] == 1
        norms.append(guard.events[0]["grad_norm"])
    assert norms[0] > 0.5 and norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_a_finite_gradient_too_large_for_float32_squares_is_judged_not_skipped(tmp_path):
    _, guard, _ = _scaled_run(tmp_path, 65536.0, model=LossTerm(_huge_gradient, extra=16))
    assert guard.events and guard.events[0]["step"] == 1
    assert guard.events[0]["grad_norm"] == pytest.approx(1e15, rel=1e-3)


def test_gradients_that_stay_non_finite_once_the_scale_is_down_to_one_trip(tmp_path):
    # the scaler halves its scale on each skipped step: from 8, steps 1-3 are overflows it skips (8, 4, 2), step 4 at
    # scale 1 is non-finite unscaled
    _, guard, _ = _scaled_run(tmp_path, 8.0, model=LossTerm(_nan_gradient), max_steps=8)
    assert guard.events and guard.events[0]["step"] == 4
    assert guard.events[0]["grad_norm"] == "nan"


def test_a_divergence_under_the_scaler_still_trips(tmp_path):
    args = blow_up_args(tmp_path, max_grad_norm=1.0, save_strategy="no")
    guard = exact_guard(on_divergence="stop")
    trainer = _with_scaler(Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard]),
                           1024.0)
    trainer.train()
    assert guard.events and guard.events[0]["action"] == "stop"
    norm = guard.events[0]["grad_norm"]  # judged in the loss's units, not x 1024 (or a non-finite / skipped step)
    assert norm is None or isinstance(norm, str) or norm < 1024


def test_a_non_finite_loss_on_a_skipped_step_trips_and_reports_no_gradient_norm(tmp_path):
    _, guard, _ = _scaled_run(tmp_path, 65536.0, model=LossTerm(_nan_loss))
    assert guard.events and guard.events[0]["loss"] == "nan"
    assert guard.events[0]["grad_norm"] is None  # the scaler skipped the step: no norm, not 0.0
