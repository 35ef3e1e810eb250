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


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # norm read after backward / before the optimizer step
@pytest.mark.parametrize("init_scale", [65536.0, 1e38])  # gradients x 65536 / an overflow on the first steps
def test_scaled_gradients_and_overflow_steps_are_not_divergences(tmp_path, max_grad_norm, init_scale):
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=6, learning_rate=1e-3,
                             max_grad_norm=max_grad_norm)
    guard = exact_guard(on_divergence="stop")
    trainer = _with_scaler(Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard]),
                           init_scale)
    metrics = trainer.train().metrics
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
        args = cpu_training_args(tmp_path / str(scale), TrainingArguments, max_steps=2, learning_rate=1e-3,
                                 max_grad_norm=max_grad_norm)
        guard = exact_guard(on_divergence="stop", grad_norm_threshold=0.5)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
        if scale is not None:
            _with_scaler(trainer, scale)
        trainer.train()
        assert guard.events and guard.events[0]["step"] == 1
        norms.append(guard.events[0]["grad_norm"])
    assert norms[0] > 0.5 and norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_a_divergence_under_the_scaler_still_trips(tmp_path):
    args = blow_up_args(tmp_path, max_grad_norm=1.0, save_strategy="no")
    guard = exact_guard(on_divergence="stop")
    trainer = _with_scaler(Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard]),
                           1024.0)
    trainer.train()
    assert guard.events and guard.events[0]["action"] == "stop"
    norm = guard.events[0]["grad_norm"]
    # judged in the loss's units: a finite norm far below the scaled one (x 1024), or the loss rule tripped alone
    assert norm is None or isinstance(norm, str) or norm < 1024 * 500
