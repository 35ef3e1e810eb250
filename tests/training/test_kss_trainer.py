"""KSSTrainer: exactness at alpha = 0, logged keys, every-k gating, gradient-accumulation scaling, guards, PEFT."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import GradCapture, TokenDataset, cpu_training_args, record_kss_terms, tiny_gpt2
from transformers import Trainer, TrainingArguments

import hf_koopman.training.trainer as trainer_module
from hf_koopman.koopman.shaping import SpectralShapingError, eigenvalue_modulus
from hf_koopman.training import KSSConfig, KSSTrainer, KSSTrainingArguments


KSS_SMALL = dict(kss_num_samples=256, kss_rank=8)


def _args(tmp_path, cls=KSSTrainingArguments, **kw):
    small = KSS_SMALL if cls is KSSTrainingArguments else {}
    return cpu_training_args(tmp_path, cls, **{"max_steps": 3, **small, **kw})


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_alpha_zero_reproduces_plain_trainer_exactly(tmp_path):
    plain = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "a", TrainingArguments), train_dataset=TokenDataset())
    plain.train()
    kss = KSSTrainer(
        model=tiny_gpt2(),
        args=_args(tmp_path / "b", kss_alpha=0.0, kss_every_n_steps=1),
        train_dataset=TokenDataset(),
    )
    kss.train()
    assert _losses(kss) == _losses(plain)  # bit-for-bit
    for (n1, p1), (n2, p2) in zip(plain.model.named_parameters(), kss.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert kss.kss_steps == []  # alpha = 0: no hooks, no capture
    assert not any(k.startswith("kss/") for h in kss.state.log_history for k in h)


def test_kss_changes_training_but_not_eval_loss(tmp_path):
    ds = TokenDataset()
    plain = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "a", TrainingArguments), eval_dataset=ds)
    kss = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path / "b", kss_alpha=1.0), eval_dataset=ds)
    assert kss.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]  # KSS only in training mode
    kss_train = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path / "c", kss_alpha=1.0, max_steps=1), train_dataset=ds)
    kss_train.train()
    plain_train = Trainer(
        model=tiny_gpt2(), args=_args(tmp_path / "d", TrainingArguments, max_steps=1), train_dataset=ds
    )
    plain_train.train()
    entry = kss_train.state.log_history[0]
    # the logged objective is the task loss plus alpha * penalty on a KSS step
    assert entry["loss"] == pytest.approx(_losses(plain_train)[0] + 1.0 * entry["kss/penalty"], rel=1e-5)


def test_logged_keys_and_every_k_gating(tmp_path, monkeypatch):
    created = record_kss_terms(monkeypatch)
    spectra = {}  # KSS step -> one list of per-layer eigenvalues per micro-batch
    group_eigenvalues = trainer_module.KSSTrainer._group_eigenvalues

    def keep(self, members, step):
        eigs = group_eigenvalues(self, members, step)
        spectra.setdefault(step, []).append([e.detach() for e in eigs])
        return eigs

    monkeypatch.setattr(trainer_module.KSSTrainer, "_group_eigenvalues", keep)
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=4),
        args=_args(tmp_path, max_steps=7, kss_every_n_steps=3, gradient_accumulation_steps=2),
        train_dataset=TokenDataset(n=32),
    )
    trainer.train()
    assert trainer.kss_steps == [0, 3, 6]
    # two micro-batches per KSS step, 50% of 4 blocks each
    assert created == [(0, 2), (0, 2), (3, 2), (3, 2), (6, 2), (6, 2)]
    keys = ("kss/penalty", "kss/near_unit_mass", "kss/spectral_radius")
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    for step, entry in logged.items():  # log at step s covers optimizer step s - 1
        has = all(k in entry for k in keys)
        assert has == ((step - 1) % 3 == 0), (step, entry)
        if has:
            # the logged masses are those of the penalised eigenvalues: per micro-batch, the mean over the sampled
            # layers of the share of |lambda| in [tau_l, tau_u] and of the largest |lambda|; averaged over the step
            cfg = trainer.kss_config
            batches = [[eigenvalue_modulus(e) for e in layers] for layers in spectra[step - 1]]
            near = sum(sum(((m >= cfg.tau_l) & (m <= cfg.tau_u)).double().mean() for m in mods) / len(mods)
                       for mods in batches) / len(batches)
            radius = sum(sum(m.max() for m in mods) / len(mods) for mods in batches) / len(batches)
            assert entry["kss/penalty"] > 0
            assert entry["kss/near_unit_mass"] == pytest.approx(float(near), abs=1e-4)
            assert entry["kss/spectral_radius"] == pytest.approx(float(radius), rel=1e-4)


@pytest.mark.parametrize(
    "scaled, ratio, cap",
    # the cap compares the KSS gradient with the task gradient; "trainer-divides" forces a task loss that is divided
    # twice (the model already scales by num_items_in_batch), so only the raw term's bookkeeping is tested there
    [(None, None, "parameters"), (False, None, "parameters"), (None, 1.0, "parameters"), (None, 1.0, "activations"),
     (False, 1e9, "activations")],
    ids=["loss-scaled-for-ga", "trainer-divides", "loss-scaled-for-ga-capped", "loss-scaled-for-ga-activation-cap",
         "trainer-divides-activation-cap-inactive"],
)
def test_gradient_accumulation_scaling(tmp_path, scaled, ratio, cap):
    """KSS gradient of one optimizer step with GA=4 (4 identical micro-batches) equals GA=1 (not 4x)."""

    def grads(alpha, ga, sub):
        capture = GradCapture()
        args = _args(
            tmp_path / sub,
            max_steps=1,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=ga,
            max_grad_norm=0.0,  # capture unclipped gradients
            kss_alpha=alpha,
            kss_every_n_steps=1,
            kss_layer_fraction=1.0,
            kss_max_grad_ratio=ratio,
            kss_grad_cap=cap,
        )
        trainer = KSSTrainer(
            model=tiny_gpt2(n_layer=2), args=args, train_dataset=TokenDataset(n=4, repeat_first=True),
            callbacks=[capture],
        )
        trainer.loss_is_scaled_for_ga = scaled
        trainer.train()
        return capture.grads

    kss_part = {}
    for ga in (1, 4):
        with_kss, without = grads(1.0, ga, f"k{ga}"), grads(0.0, ga, f"n{ga}")
        kss_part[ga] = torch.cat([(with_kss[n] - without[n]).flatten() for n in sorted(with_kss)])
    assert kss_part[1].norm() > 1e-3  # the spectral term really contributes
    ratio = (kss_part[4].norm() / kss_part[1].norm()).item()
    assert ratio == pytest.approx(1.0, abs=1e-3), f"KSS gradient scaled by {ratio:.3f} under GA=4"
    err = (kss_part[4] - kss_part[1]).abs().max().item()
    assert err <= 1e-3 * kss_part[1].abs().max().item(), err


def test_failed_decomposition_skips_the_term_with_a_warning(tmp_path, monkeypatch, caplog):
    def broken(X, Y, **kwargs):
        raise SpectralShapingError("forced failure", layers=[0])

    monkeypatch.setattr(trainer_module, "differentiable_dmd_eigenvalues", broken)
    trainer = KSSTrainer(
        model=tiny_gpt2(), args=_args(tmp_path / "a", max_steps=2, kss_every_n_steps=1), train_dataset=TokenDataset()
    )
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    plain = Trainer(
        model=tiny_gpt2(), args=_args(tmp_path / "b", TrainingArguments, max_steps=2), train_dataset=TokenDataset()
    )
    plain.train()
    assert _losses(trainer) == _losses(plain)  # no term, no NaN
    assert "skipping layer" in caplog.text
    assert trainer.state.log_history[0]["kss/skipped_layers"] == 2.0
    assert "kss/penalty" not in trainer.state.log_history[0]


def test_config_validation_and_arguments_round_trip(tmp_path):
    with pytest.raises(ValueError, match="layer_fraction"):
        KSSConfig(layer_fraction=0.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        _args(tmp_path, kss_every_n_steps=0)
    args = _args(tmp_path, kss_alpha=0.1, kss_gamma=0.3)
    cfg = args.kss_config()
    assert (cfg.alpha, cfg.gamma, cfg.rank, cfg.every_n_steps) == (0.1, 0.3, 8, 10)
    defaults = KSSConfig()
    assert (defaults.alpha, defaults.temperature, defaults.tau_u, defaults.tau_l, defaults.gamma) == (
        0.15, 20.0, 1.05, 0.90, 0.4,
    )
    assert (defaults.rank, defaults.every_n_steps, defaults.layer_fraction) == (None, 10, 0.5)  # full spectrum
    with pytest.raises(TypeError, match="KSSConfig"):
        KSSTrainer(model=tiny_gpt2(), args=args, kss_config={"alpha": 1})
    with pytest.raises(ValueError, match="max_grad_ratio"):
        KSSConfig(max_grad_ratio=-1.0)
    assert defaults.max_grad_ratio == 0.5
    assert _args(tmp_path, kss_max_grad_ratio=None).kss_config().max_grad_ratio is None
    with pytest.raises(ValueError, match="grad_cap must be 'parameters' or 'activations'"):
        KSSConfig(grad_cap="params")
    assert _args(tmp_path, kss_grad_cap="parameters").kss_config().grad_cap == "parameters"


def test_peft_lora_gradients_only_reach_lora_parameters(tmp_path):
    peft = pytest.importorskip("peft")

    def run(alpha, sub):
        model = peft.get_peft_model(
            tiny_gpt2(n_layer=2), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        )
        capture = GradCapture()
        trainer = KSSTrainer(
            model=model,
            args=_args(tmp_path / sub, max_steps=1, max_grad_norm=0.0, kss_alpha=alpha, kss_every_n_steps=1,
                       kss_layer_fraction=1.0),
            train_dataset=TokenDataset(),
            callbacks=[capture],
        )
        trainer.train()
        return trainer, capture.grads

    trainer, with_kss = run(1.0, "a")
    _, without = run(0.0, "b")
    # blocks are the base model's, found through the PeftModel
    assert [b.name for b in trainer._kss_blocks] == ["transformer.h.0", "transformer.h.1"]
    assert with_kss and all("lora_" in name for name in with_kss)  # frozen base weights get no gradient
    diff = sum((with_kss[n] - without[n]).abs().sum().item() for n in with_kss)
    assert diff > 1e-6  # the KSS gradient reaches the LoRA parameters


def test_kss_lowers_its_penalty_when_it_dominates_the_loss(tmp_path):
    """On a fixed batch, KSS-weighted steps must reduce L_KSS; the same run with a negligible alpha must not."""

    def penalties(alpha, sub, ratio=None):  # None: the raw Eq. 14 gradient, so KSS really dominates
        trainer = KSSTrainer(
            model=tiny_gpt2(n_layer=2),
            args=_args(tmp_path / sub, max_steps=8, kss_alpha=alpha, kss_every_n_steps=1, kss_layer_fraction=1.0,
                       learning_rate=3e-3, max_grad_norm=0.0, per_device_train_batch_size=2, kss_max_grad_ratio=ratio),
            train_dataset=TokenDataset(n=16, repeat_first=True),
        )
        trainer.train()
        return [h["kss/penalty"] for h in trainer.state.log_history if "kss/penalty" in h]

    shaped, control = penalties(20.0, "kss"), penalties(1e-6, "control")
    assert len(shaped) == len(control) == 8 and shaped[0] == pytest.approx(control[0])
    assert shaped[-1] < 0.75 * shaped[0], shaped
    assert shaped[-1] < 0.8 * control[-1], (shaped, control)


def _first_step(tmp_path, sub, alpha, ratio):
    """One step with the parameter-space cap (the activation-space one is tested in test_activation_cap.py)."""
    capture = GradCapture()
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path / sub, max_steps=1, max_grad_norm=0.0, kss_alpha=alpha, kss_every_n_steps=1,
                   kss_layer_fraction=1.0, kss_max_grad_ratio=ratio, kss_grad_cap="parameters"),
        train_dataset=TokenDataset(),
        callbacks=[capture],
    )
    trainer.train()
    return trainer, capture.grads


def test_gradient_cap_bounds_the_kss_gradient_and_keeps_the_loss_value(tmp_path):
    """With a large alpha the raw KSS gradient dwarfs the task gradient (as on No-Norm models at init); the cap
    rescales it to exactly `max_grad_ratio * ||g_task||` while the logged loss (the objective's value) is unchanged."""
    _, task = _first_step(tmp_path, "task", 0.0, None)
    raw_trainer, raw = _first_step(tmp_path, "raw", 20.0, None)
    capped_trainer, capped = _first_step(tmp_path, "capped", 20.0, 0.5)
    names = sorted(task)

    def kss_norm(grads):
        return torch.cat([(grads[n] - task[n]).flatten() for n in names]).norm().item()

    task_norm = torch.cat([task[n].flatten() for n in names]).norm().item()
    assert kss_norm(raw) > 2.0 * task_norm  # the cap is really active in this setting
    assert kss_norm(capped) == pytest.approx(0.5 * task_norm, rel=1e-3)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([(raw[n] - task[n]).flatten() for n in names]),
        torch.cat([(capped[n] - task[n]).flatten() for n in names]),
        dim=0,
    )
    assert cos.item() > 0.999  # same direction, only the length changes
    assert _losses(capped_trainer) == pytest.approx(_losses(raw_trainer), rel=1e-6)
    scale = capped_trainer.state.log_history[0]["kss/grad_scale"]
    assert scale == pytest.approx(0.5 * task_norm / kss_norm(raw), rel=1e-3)


def test_gradient_cap_is_inactive_when_kss_is_small(tmp_path):
    _, raw = _first_step(tmp_path, "raw", 1e-3, None)
    trainer, capped = _first_step(tmp_path, "capped", 1e-3, 1.0)
    assert trainer.state.log_history[0]["kss/grad_scale"] == 1.0
    for n in raw:
        # the capped path sums the task and KSS gradients in another order: float32 rounding at the tensor's scale
        scale = float(raw[n].abs().max())
        torch.testing.assert_close(capped[n], raw[n], rtol=1e-5, atol=1e-5 * scale + 1e-8)


def test_gradient_cap_with_reentrant_checkpointing_names_the_fix(tmp_path):
    args = _args(tmp_path, max_steps=1, kss_every_n_steps=1, gradient_checkpointing=True, kss_grad_cap="parameters",
                 gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="use_reentrant"):
        trainer.train()
    ok = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path / "b", max_steps=1, kss_every_n_steps=1, gradient_checkpointing=True,
                   kss_grad_cap="parameters"),
        train_dataset=TokenDataset(),
    )
    ok.train()  # non-reentrant checkpointing (the default) works with the cap
    assert 0.0 < ok.state.log_history[0]["kss/grad_scale"] <= 1.0


def test_gradient_cap_with_reentrant_checkpointing_under_lora_names_the_fix(tmp_path):
    # LoRA leaves every trainable parameter inside the checkpointed blocks: `autograd.grad` then returns None for all
    # of them instead of raising, and the step would train on a zero gradient
    from hf_koopman.testing_utils import tiny_peft_model

    args = _args(tmp_path, max_steps=1, kss_every_n_steps=1, gradient_checkpointing=True, kss_grad_cap="parameters",
                 gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = KSSTrainer(model=tiny_peft_model("gpt2", n_layer=2), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="use_reentrant"):
        trainer.train()


def test_training_argument_defaults_are_the_kss_config_defaults():
    # KSSTrainingArguments restates every KSSConfig field as kss_<name>; a default changed on one side only would make
    # `KSSTrainer(args=KSSTrainingArguments(...))` and `KSSConfig()` train differently
    import dataclasses

    args = {f.name: f for f in dataclasses.fields(KSSTrainingArguments)}
    for field in dataclasses.fields(KSSConfig):
        assert f"kss_{field.name}" in args, field.name
        assert args[f"kss_{field.name}"].default == field.default, field.name


def test_kss_layers_of_the_wrong_type_fail_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match=r"KSSTrainingArguments: kss_layers must be None .* got 5"):
        KSSTrainingArguments(str(tmp_path), kss_layers=5)
    with pytest.raises(ValueError, match=r"\(e\.g\. 'model\.layers'\)"):  # a module path keeps its own words
        KSSTrainingArguments(str(tmp_path), kss_layers=5)
    with pytest.raises(ValueError, match="KSSConfig: layers must be None"):
        KSSConfig(layers=5)


def test_kss_on_fewer_token_states_than_twice_the_width_warns_once(tmp_path, caplog):
    # 4 sequences of 4 tokens: N = 16 token states per layer for d = 32, which the profile calls uninformative
    args = _args(tmp_path, max_steps=3, kss_every_n_steps=1, per_device_train_batch_size=4)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(seq=4))
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    assert caplog.text.count("get N = 16 token states for width d = 32") == 1
    assert "kss_enabled=False" in caplog.text and trainer.kss_steps == [0, 1, 2]
    caplog.clear()
    roomy = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path / "b", max_steps=1, kss_every_n_steps=1),
                       train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        roomy.train()
    assert "token states for width" not in caplog.text


@pytest.mark.parametrize("accumulation", [1, 2])
def test_task_loss_survives_a_penalty_far_larger_than_it(tmp_path, accumulation):
    # the first step's task loss is the plain Trainer's first loss (same weights, same batch); a logged loss of ~1e9
    # less the term would leave nothing of it in float32
    kw = dict(max_steps=1, logging_steps=1, gradient_accumulation_steps=accumulation)
    plain = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "a", TrainingArguments, **kw), train_dataset=TokenDataset())
    plain.train()
    big = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path / "b", kss_alpha=1e8, kss_every_n_steps=1, **kw),
                     train_dataset=TokenDataset())
    big.train()
    (log,) = [h for h in big.state.log_history if "loss" in h]
    assert log["loss"] > 1e6
    assert log["kss/task_loss"] == pytest.approx(_losses(plain)[0], abs=1e-3)


class _PlusOne(KSSTrainer):
    """A subclass that adds its own term to the loss our compute_loss returns."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        return loss + 1.0


def test_task_loss_means_the_same_in_windows_with_and_without_a_kss_term(tmp_path):
    trainer = _PlusOne(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4, logging_steps=1, kss_every_n_steps=2,
                                                      kss_alpha=1e-6), train_dataset=TokenDataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the subclass's +1 is in `loss`, not in the task loss, whichever window: no jump of 1.0 between them
    assert [round(h["loss"] - h["kss/task_loss"], 2) for h in logs] == [1.0] * 4


def test_task_loss_of_data_parallel_micro_batches_is_their_mean(tmp_path):
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=TokenDataset())
    trainer._kss_window_start = trainer.state.global_step
    trainer.current_gradient_accumulation_steps = 1  # as train() sets it
    trainer.task_loss = torch.tensor([4.0, 6.0])  # DataParallel: one loss per device
    trainer._track_task_loss(torch.tensor(5.0), None)
    assert float(trainer._kss_task_sum) == pytest.approx(5.0)
    off = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path / "off", kss_enabled=False), train_dataset=TokenDataset())
    off.train()
    assert float(off._kss_task_sum) == 0.0  # KSS off: nothing tracked (no float64 work, MPS has none)


def test_the_guard_judges_the_last_steps_on_their_task_loss_however_large_the_term(tmp_path):
    from hf_koopman import RKSPCallback

    # label smoothing: the model returns no loss, so the guard judges logged losses; steps 4 come after the last log
    args = _args(tmp_path, max_steps=4, logging_steps=3, gradient_accumulation_steps=2, learning_rate=0.0,
                 label_smoothing_factor=0.1, kss_alpha=3e8, kss_every_n_steps=1, seed=2)
    guard = RKSPCallback(num_samples=64, rank=8)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
    trainer.train()
    final = trainer.state.log_history[-1]
    assert final["kss/tail_task_loss"] < 10 and guard.divergence is None and guard.weights_validated
