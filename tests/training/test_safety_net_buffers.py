"""The validated state includes the buffers a model saves: a rollback or a restore after a divergence puts BatchNorm's
running statistics back with the weights, from the memory copy and from the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainerCallback, TrainingArguments

from hf_koopman.training.guard import StateSnapshot, load_checkpoint_state, model_buffers

from conftest import cpu_training_args, exact_guard


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    return ResNetForImageClassification(config)


class PoisonConvAfter(TrainerCallback):
    """Sets the stem convolution's weights to NaN after optimizer step `step`: the next forward trips the guard and
    writes NaN into the following BatchNorm's running statistics."""

    def __init__(self, step: int) -> None:
        self.step, self.done = step, False

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                model.resnet.embedder.embedder.convolution.weight.fill_(float("nan"))


def _norm(model):
    return model.resnet.embedder.embedder.normalization


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
@pytest.mark.parametrize("mode", ["rollback", "stop"])
def test_restore_puts_back_batchnorm_statistics(tmp_path, mode, source):
    model = _resnet()
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=8 if mode == "stop" else 10, learning_rate=1e-3,
                             save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    guard = exact_guard(on_divergence=mode, rollback_source=source)
    Trainer(model=model, args=args, train_dataset=Images(), callbacks=[guard, PoisonConvAfter(4)]).train()
    assert guard.events and guard.events[0]["restored_step"] is not None
    norm = _norm(model)
    assert torch.isfinite(norm.running_var).all() and torch.isfinite(norm.running_mean).all()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=Images(4).x).logits).all()
    if guard.last_good_checkpoint is not None:  # what the guard names good holds finite statistics too
        saved = load_file(f"{guard.last_good_checkpoint}/model.safetensors")
        assert torch.isfinite(saved["resnet.embedder.embedder.normalization.running_var"]).all()


def test_state_snapshot_restores_buffers_in_place():
    model = _resnet()
    norm = _norm(model)
    buffers = model_buffers(model)
    assert any(buf is norm.running_var for buf in buffers) and any(buf is norm.num_batches_tracked for buf in buffers)
    params = [p for p in model.parameters() if p.requires_grad]
    snap = StateSnapshot()
    snap.capture(params, None, 0, buffers)
    kept = norm.running_var.clone()
    norm.running_var.fill_(float("nan"))
    norm.num_batches_tracked.fill_(7)
    snap.restore(params, None, buffers)
    assert torch.equal(norm.running_var, kept) and int(norm.num_batches_tracked) == 0


def test_load_checkpoint_state_restores_the_buffers_the_checkpoint_holds(tmp_path):
    from safetensors.torch import save_file

    class WithTable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)
            self.register_buffer("table", torch.ones(3), persistent=False)

    model = WithTable()
    save_file({"norm.running_mean": torch.full((3,), 2.0), "norm.running_var": torch.ones(3),
               "norm.num_batches_tracked": torch.tensor(0), "norm.weight": torch.ones(3), "norm.bias": torch.zeros(3)},
              str(tmp_path / "model.safetensors"))
    model.table.fill_(5.0)
    load_checkpoint_state(model, None, tmp_path)
    assert torch.equal(model.norm.running_mean, torch.full((3,), 2.0))
    assert torch.equal(model.table, torch.full((3,), 5.0))  # not in the checkpoint: left as it is


def test_load_checkpoint_state_restores_the_checkpoints_buffers(tmp_path):
    model = _resnet()
    norm = _norm(model)
    norm.running_mean.uniform_()
    model.save_pretrained(tmp_path)
    kept = norm.running_mean.clone()
    norm.running_mean.fill_(float("nan"))
    load_checkpoint_state(model, None, tmp_path)
    assert torch.equal(norm.running_mean, kept)


def test_load_checkpoint_state_restores_a_buffer_saved_under_an_alias(tmp_path):
    from safetensors.torch import save_file

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Module(), torch.nn.Module()
            table = torch.zeros(3)
            self.a.register_buffer("stats", table)
            self.b.register_buffer("stats", table)  # one tensor, two names; the checkpoint holds the second

    model = Shared()
    save_file({"b.stats": torch.full((3,), 4.0)}, str(tmp_path / "model.safetensors"))
    load_checkpoint_state(model, None, tmp_path)
    assert torch.equal(model.a.stats, torch.full((3,), 4.0))
