"""FSDP helpers (`hf_koopman.training.fsdp`) and the KSS gradient cap's two implementations, in one process.

The two-process FSDP run itself is in `test_distributed.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TokenDataset, tiny_gpt2
from test_kss_trainer import GradCapture, _args

from hf_koopman.training import KSSTrainer
from hf_koopman.training.fsdp import enable_cpu_fsdp, fsdp_requested, is_fsdp_model, local_numel, sharding_summary


def test_fsdp_request_detection(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested(None)
    assert not fsdp_requested(_args(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config exports
    assert fsdp_requested(None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_requested(None)


def test_single_process_is_never_promoted_to_fsdp(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path), train_dataset=TokenDataset())
    assert not enable_cpu_fsdp(trainer)  # one process: nothing to shard
    assert str(trainer.accelerator.distributed_type) != "DistributedType.FSDP"
    assert not is_fsdp_model(trainer.model)


def test_sharding_summary_of_a_plain_model():
    model = tiny_gpt2(n_layer=2)
    held, full = local_numel(model)
    assert held == full == sum(p.numel() for p in model.parameters())
    summary = sharding_summary(model)
    assert summary == {
        "fsdp": False, "fsdp_modules": [], "dtensor_params": 0, "num_params": len(list(model.parameters())),
        "local_numel": full, "full_numel": full, "local_fraction": 1.0,
    }


def _first_step_grads(tmp_path, sub: str, fast: bool, ga: int = 1) -> tuple[KSSTrainer, dict[str, torch.Tensor]]:
    capture = GradCapture()
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path / sub, max_steps=1, max_grad_norm=0.0, kss_alpha=20.0, kss_every_n_steps=1,
                   kss_layer_fraction=1.0, kss_max_grad_ratio=0.5, kss_grad_cap="parameters",
                   per_device_train_batch_size=4 // ga,
                   gradient_accumulation_steps=ga),
        train_dataset=TokenDataset(),
        callbacks=[capture],
    )
    trainer._kss_fast_cap = fast
    trainer.train()
    return trainer, capture.grads


@pytest.mark.parametrize("ga", [1, 2])
def test_gradient_injection_equals_the_three_pass_cap(tmp_path, ga):
    """The default cap hands `g_task + scale * g_kss` to backward without a third pass; it must give the gradient,
    loss and cap factor of the three-pass version (task + scaled term through the ordinary backward), with GA too."""
    fast_trainer, fast = _first_step_grads(tmp_path, f"fast{ga}", True, ga)
    slow_trainer, slow = _first_step_grads(tmp_path, f"slow{ga}", False, ga)
    assert fast.keys() == slow.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-7)
    fast_log, slow_log = fast_trainer.state.log_history[0], slow_trainer.state.log_history[0]
    assert 0.0 < fast_log["kss/grad_scale"] < 1.0  # the cap is active, so both gradient parts matter
    assert fast_log["kss/grad_scale"] == pytest.approx(slow_log["kss/grad_scale"], rel=1e-6)
    assert fast_log["loss"] == pytest.approx(slow_log["loss"], rel=1e-6)
    assert fast_trainer._gradient_injection_ok(fast_trainer.model)
    assert not slow_trainer._gradient_injection_ok(slow_trainer.model)


def test_fsdp1_on_cpu_is_refused_with_the_fix(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, mixed_precision="no")
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(state=state),
        args=SimpleNamespace(fsdp="full_shard", fsdp_plugin_args={"fsdp_version": 1}),
    )
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        enable_cpu_fsdp(trainer)
    assert state.distributed_type == DistributedType.MULTI_CPU  # nothing was changed
    trainer.args.fsdp = ""  # not requested: left alone
    assert not enable_cpu_fsdp(trainer)
