"""Tiny GPT-2 models, token datasets and a gradient-capturing callback shared by the training tests (CPU, seconds).

`HF_KOOPMAN_TEST_DEVICE=cuda` runs the Trainer-based tests on the GPU instead (`use_cpu=False`): the same assertions
on CUDA tensors, where a GPU is lent.
"""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments


VOCAB = 64
SEQ = 32


class TokenDataset(torch.utils.data.Dataset):
    """`n` random token sequences (fixed seed) with `labels = input_ids` (causal LM)."""

    def __init__(self, n: int = 16, seq: int = SEQ, seed: int = 0, repeat_first: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (n, seq), generator=g)
        if repeat_first:
            ids[:] = ids[0]
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def cpu_training_args(tmp_path, cls, **kw):
    """`cls` (`TrainingArguments` or a subclass) for a few logged steps on the CPU (`HF_KOOPMAN_TEST_DEVICE=cuda`: the
    GPU): no saving, no reports, seed 0; `kw` overrides or adds fields."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, logging_steps=1, report_to="none",
                use_cpu=os.environ.get("HF_KOOPMAN_TEST_DEVICE", "cpu") != "cuda", save_strategy="no", seed=0,
                disable_tqdm=True)
    base.update(kw)
    return cls(**base)


@contextlib.contextmanager
def info_logs(caplog):
    """hf_koopman's INFO records into `caplog` within the block: they follow the transformers verbosity, set to
    info for the block and given back after it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def blow_up_args(tmp_path, cls=TrainingArguments, **kw):
    """The safety-net tests' run: 12 steps at learning rate 1.0 (it blows up within a few steps), a checkpoint every
    step, batches in order, 4 per step; KSS off with `KSSTrainingArguments`."""
    from hf_koopman.training import KSSTrainingArguments

    base = dict(max_steps=12, learning_rate=1.0, lr_scheduler_type="constant", save_strategy="steps", save_steps=1,
                train_sampling_strategy="sequential", per_device_train_batch_size=4)
    if issubclass(cls, KSSTrainingArguments):
        base.update(kss_enabled=False)
    base.update(kw)
    return cpu_training_args(tmp_path, cls, **base)


def exact_guard(**kw):
    """`RKSPCallback` with exact "last passing step" semantics (a snapshot every step; "auto" depends on timing) and
    no init profile."""
    from hf_koopman.training import RKSPCallback

    kw.setdefault("snapshot_every_n_steps", 1)
    kw.setdefault("profile_at_init", False)
    return RKSPCallback(**kw)


def record_kss_terms(monkeypatch) -> list[tuple[int, int]]:
    """`(step, number of block snapshots)` of every KSS term `KSSTrainer` computes from now on in the test."""
    import hf_koopman.training.trainer as trainer_module

    calls: list[tuple[int, int]] = []
    term = trainer_module.KSSTrainer._kss_term

    def spy(self, snapshots, step, device):
        calls.append((step, len(snapshots)))
        return term(self, snapshots, step, device)

    monkeypatch.setattr(trainer_module.KSSTrainer, "_kss_term", spy)
    return calls


def tiny_gpt2(seed: int = 0, n_layer: int = 4, n_embd: int = 32, **kwargs) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=n_embd, n_layer=n_layer, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kwargs,
    )
    return GPT2LMHeadModel(config)


class LossBlowsUpOnZeros(GPT2LMHeadModel):
    """A GPT-2 whose loss is 1000x on a batch holding an all-zero row: one bad batch, sane weights."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if out.loss is not None and (input_ids == 0).all(dim=1).any():
            out.loss = out.loss * 1000
        return out


def bad_batch_at(step: int | None, n: int = 64) -> tuple[GPT2LMHeadModel, "TokenDataset"]:
    """`tiny_gpt2()`'s weights in a `LossBlowsUpOnZeros`, and `n` in-order rows (4 per step, no zero token) whose
    batch of step `step` holds an all-zero row, so that its loss trips the guard (`None`: no bad batch)."""
    data = TokenDataset(n=n)
    data.ids[data.ids == 0] = 1
    if step is not None:
        data.ids[(step - 1) * 4] = 0  # the first row of that step's batch
    source = tiny_gpt2()
    model = LossBlowsUpOnZeros(source.config)
    model.load_state_dict(source.state_dict())
    return model, data


def no_norm_gpt2(n_layer=4):
    """GPT-2 without LayerNorm in the blocks: the paper's No-Norm setting, high risk at init."""
    model = tiny_gpt2(n_layer=n_layer)
    for block in model.transformer.h:
        block.ln_1 = torch.nn.Identity()
        block.ln_2 = torch.nn.Identity()
    return model


@pytest.fixture
def dataset() -> TokenDataset:
    return TokenDataset()


class LearningRates(TrainerCallback):
    """The rate the optimizer really applies at every step."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


class GradCapture(TrainerCallback):
    """Copies every parameter gradient right before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
