"""KSSTrainer with `grad_cap="activations"`: one backward pass, the KSS gradient's direction kept, its size set on the
residual stream."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import GradCapture, TokenDataset, tiny_gpt2

import hf_koopman.training.trainer as trainer_module
from hf_koopman.profiling.recorder import _as_tokens
from hf_koopman.training import KSSTrainer, KSSTrainingArguments


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, kss_num_samples=256, kss_rank=8,
        max_grad_norm=0.0, kss_every_n_steps=1, kss_layer_fraction=1.0,
    )
    base.update(kw)
    return KSSTrainingArguments(**base)


def _first_step(tmp_path, sub, alpha, ratio, cap="activations", **kw):
    capture = GradCapture()
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path / sub, kss_alpha=alpha, kss_max_grad_ratio=ratio, kss_grad_cap=cap, **kw),
        train_dataset=TokenDataset(),
        callbacks=[capture],
    )
    trainer.train()
    return trainer, capture.grads


def _flat(grads, names, base=None):
    return torch.cat([(grads[n] - (0 if base is None else base[n])).flatten() for n in names])


def test_inactive_activation_cap_gives_the_raw_gradient_bit_for_bit(tmp_path):
    """Injection on the residual stream must reproduce autograd's own gradient of `task + alpha * L_KSS`."""
    _, raw = _first_step(tmp_path, "raw", 20.0, None, cap="parameters")
    trainer, act = _first_step(tmp_path, "act", 20.0, 1e9)
    assert trainer.state.log_history[0]["kss/grad_scale"] == 1.0
    for name in raw:
        torch.testing.assert_close(act[name], raw[name], rtol=1e-5, atol=1e-6)


def test_activation_cap_keeps_the_direction_and_the_loss_value(tmp_path):
    _, task = _first_step(tmp_path, "task", 0.0, None)
    raw_trainer, raw = _first_step(tmp_path, "raw", 20.0, None)
    act_trainer, act = _first_step(tmp_path, "act", 20.0, 0.5)
    names = sorted(task)
    raw_kss, act_kss = _flat(raw, names, task), _flat(act, names, task)
    task_norm = _flat(task, names).norm()
    assert raw_kss.norm() > 100 * task_norm  # the cap binds here
    scale = act_trainer.state.log_history[0]["kss/grad_scale"]
    assert 0.0 < scale < 1e-2
    assert torch.nn.functional.cosine_similarity(raw_kss, act_kss, dim=0).item() > 0.9999
    assert act_kss.norm().item() == pytest.approx(scale * raw_kss.norm().item(), rel=1e-3)
    # measured on the residual stream, the bound lands within a small factor of the parameter-space one
    # (0.5 * ||g_task||) on this model: 0.24 * ||g_task|| with the full-spectrum operator
    assert 0.1 * task_norm < act_kss.norm() < 1.0 * task_norm
    assert act_trainer.state.log_history[0]["loss"] == pytest.approx(raw_trainer.state.log_history[0]["loss"], rel=1e-6)


def test_activation_cap_scale_is_set_at_the_highest_activation(tmp_path, monkeypatch):
    """Recompute the factor independently: ratio * ||dL_task/dh_top|| / ||dL_KSS/d(states)||."""
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path, kss_alpha=20.0, kss_max_grad_ratio=0.5,
                                                                kss_grad_cap="activations"),
                         train_dataset=TokenDataset())
    seen = {}
    original = trainer_module.KSSTrainer._activation_capped_loss

    def spy(self, task_loss, term, sources, step):
        # expectations first: the hooks registered below would act on any later backward through these tensors
        pieces = [p for p, _, _ in sources]
        top = sources[-1][1]  # output of the last block: the first hooked activation the backward reaches
        g_top = torch.autograd.grad(task_loss, top, retain_graph=True)[0]
        g_states = torch.autograd.grad(term, pieces, retain_graph=True)
        kss_norm = torch.sqrt(sum(g.double().square().sum() for g in g_states))
        params = [p for p in self.model.parameters() if p.requires_grad]
        seen.update(
            n_pieces=len(pieces),
            expected=min(1.0, 0.5 * g_top.double().norm().item() / kss_norm.item()),
            params=params,
            g_task=torch.autograd.grad(task_loss, params, retain_graph=True),
            g_kss=torch.autograd.grad(term, params, retain_graph=True, allow_unused=True),
        )
        return original(self, task_loss, term, sources, step)

    monkeypatch.setattr(trainer_module.KSSTrainer, "_activation_capped_loss", spy)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)
    assert seen["n_pieces"] == 3  # input of block 0, its output (= input of block 1, rows shared), output of block 1
    expected, params, g_task, g_kss = seen["expected"], seen["params"], seen["g_task"], seen["g_kss"]
    loss.backward()
    assert trainer._kss_grad_scale_count == 1
    assert trainer._kss_grad_scale.item() == pytest.approx(expected, rel=1e-6)
    for p, gt, gk in zip(params, g_task, g_kss):
        want = gt if gk is None else gt + expected * gk
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 5, 3), (10, 3), (2, 3, 4, 5)])
def test_token_view_round_trip_matches_the_recorder(shape):
    x = torch.randn(shape)
    flat, _ = _as_tokens(x, "block")
    torch.testing.assert_close(trainer_module._token_view(x), flat)
    torch.testing.assert_close(trainer_module._from_token_view(flat, x), x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_cap_under_gradient_checkpointing(tmp_path, reentrant):
    """Unlike the parameter-space cap (which needs `torch.autograd.grad` through the checkpointed blocks), the
    activation cap works with reentrant checkpointing too: same gradient as the unchecked, uncapped run."""
    _, raw = _first_step(tmp_path, "raw", 20.0, None, cap="parameters")
    trainer, act = _first_step(tmp_path, "act", 20.0, 1e9, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert trainer.state.log_history[0]["kss/grad_scale"] == 1.0  # the hooks ran, the cap did not bind
    for name in raw:
        torch.testing.assert_close(act[name], raw[name], rtol=1e-5, atol=1e-6)


def test_frozen_residual_stream_warns_that_kss_has_no_gradient(tmp_path, caplog):
    model = tiny_gpt2(n_layer=2)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("transformer.ln_f"))  # nothing below the last block is trainable
    trainer = KSSTrainer(model=model, args=_args(tmp_path, kss_alpha=1.0, kss_max_grad_ratio=0.5,
                                                 kss_grad_cap="activations"), train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    entry = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(entry["loss"])) and "kss/penalty" in entry  # the value is still logged
    assert any("no captured activation has a trainable parameter below it" in r.getMessage() for r in caplog.records)
    assert "kss/grad_scale" not in entry  # no factor was ever computed
