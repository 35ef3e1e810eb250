"""The `kss_*` settings reach the KSS term and its logs: gamma, beta and the near-unit band enter the logged penalty and
mass, the penalty is the mean (not the sum) over the sampled layers, `layer_fraction` rounds the block count up, the
parameter-space cap binds between `max_grad_ratio` and 1, the logged cap factor is a per-window mean, and the
arguments refuse a negative alpha and fewer than two token states."""

from __future__ import annotations

import pytest
import torch
from conftest import GradCapture, TokenDataset, cpu_training_args, record_kss_terms, tiny_gpt2

import hf_koopman.training.trainer as trainer_module
from hf_koopman.koopman.shaping import eigenvalue_modulus, kss_penalty
from hf_koopman.training import KSSConfig, KSSTrainer, KSSTrainingArguments


KSS_SMALL = dict(kss_num_samples=256, kss_rank=8)

# a band, target and weight far from the defaults (0.90, 1.05, 0.4, 10.0, T = 20); on the tiny GPT-2 at init every
# |lambda| of the rank-8 spectra lies in (1.1, 1.45), so the default band holds no mode and this one about half
CUSTOM = dict(kss_tau_l=0.5, kss_tau_u=1.2, kss_gamma=0.1, kss_beta=3.0, kss_temperature=10.0)


def _args(tmp_path, **kw):
    return cpu_training_args(tmp_path, KSSTrainingArguments, **{"max_steps": 1, **KSS_SMALL, **kw})


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------- one run with custom settings, spectra kept


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """One KSS step on a 3-block GPT-2 with every block sampled and the `CUSTOM` settings; returns the trainer, its
    training log and the eigenvalues of each sampled layer as the trainer computed them."""
    spectra: list[list[torch.Tensor]] = []  # one list of per-layer eigenvalues per micro-batch
    group_eigenvalues = trainer_module.KSSTrainer._group_eigenvalues

    def keep(self, members, step):
        eigs = group_eigenvalues(self, members, step)
        spectra.append([e.detach() for e in eigs])
        return eigs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.KSSTrainer, "_group_eigenvalues", keep)
        trainer = KSSTrainer(
            model=tiny_gpt2(n_layer=3),
            args=_args(tmp_path_factory.mktemp("custom"), kss_every_n_steps=1, kss_layer_fraction=1.0, **CUSTOM),
            train_dataset=TokenDataset(),
        )
        trainer.train()
    assert trainer.kss_steps == [0]
    assert len(spectra) == 1 and len(spectra[0]) == 3, [len(s) for s in spectra]  # one micro-batch, all 3 blocks
    (entry,) = _train_logs(trainer)
    return trainer, entry, spectra[0]


def _penalties(eigs, **settings):
    return torch.stack([kss_penalty(e, **settings) for e in eigs])


def _configured(trainer):
    cfg = trainer.kss_config
    return dict(temperature=cfg.temperature, tau_u=cfg.tau_u, tau_l=cfg.tau_l, gamma=cfg.gamma, beta=cfg.beta)


def test_custom_gamma_and_beta_reach_the_logged_penalty(custom_run):
    trainer, entry, eigs = custom_run
    settings = _configured(trainer)
    assert (settings["gamma"], settings["beta"]) == (CUSTOM["kss_gamma"], CUSTOM["kss_beta"])
    expected = float(_penalties(eigs, **settings).mean())
    # the settings matter here: the default gamma or the default beta would give another penalty
    assert float(_penalties(eigs, **{**settings, "gamma": 0.4}).mean()) != pytest.approx(expected, rel=1e-3)
    assert float(_penalties(eigs, **{**settings, "beta": 10.0}).mean()) != pytest.approx(expected, rel=1e-3)
    assert entry["kss/penalty"] == pytest.approx(expected, rel=1e-6)


def test_logged_penalty_is_the_mean_over_the_sampled_layers(custom_run):
    trainer, entry, eigs = custom_run
    per_layer = _penalties(eigs, **_configured(trainer))
    assert per_layer.numel() == 3 and bool((per_layer > 0).all())  # a sum would be 3x the mean
    assert entry["kss/penalty"] == pytest.approx(float(per_layer.mean()), rel=1e-6)
    assert entry["kss/penalty"] < 0.5 * float(per_layer.sum())


def test_logged_near_unit_mass_uses_the_configured_band(custom_run):
    trainer, entry, eigs = custom_run
    cfg = trainer.kss_config
    assert (cfg.tau_l, cfg.tau_u) == (CUSTOM["kss_tau_l"], CUSTOM["kss_tau_u"])
    mods = [eigenvalue_modulus(e) for e in eigs]

    def mass(lo, hi):
        return float(sum(((m >= lo) & (m <= hi)).double().mean() for m in mods) / len(mods))

    custom, default = mass(cfg.tau_l, cfg.tau_u), mass(0.90, 1.05)
    assert abs(custom - default) > 0.1, (custom, default)  # the band matters on these spectra
    assert entry["kss/near_unit_mass"] == pytest.approx(custom, abs=1e-9)


# ---------------------------------------------------------------------------------------------- layer sampling


def test_layer_fraction_rounds_the_number_of_sampled_blocks_up(tmp_path, monkeypatch):
    """Half of 3 blocks is 1.5: KSS samples 2 (ceil), not 1, on every KSS step."""
    counts = record_kss_terms(monkeypatch)
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=3),
        args=_args(tmp_path, max_steps=2, kss_every_n_steps=1, kss_layer_fraction=0.5),
        train_dataset=TokenDataset(),
    )
    trainer.train()
    assert counts == [(0, 2), (1, 2)]
    blocks = trainer._kss_select_blocks(trainer.model, 5)
    assert len(blocks) == 2 and len({b.name for b in blocks}) == 2


# ------------------------------------------------------------------------------------------------- gradient cap


def _one_capped_step(tmp_path, sub, alpha, ratio):
    """One KSS step (2 blocks, both sampled) with the parameter-space cap; the trainer and the gradients it applied."""
    capture = GradCapture()
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path / sub, max_grad_norm=0.0, kss_alpha=alpha, kss_every_n_steps=1, kss_layer_fraction=1.0,
                   kss_max_grad_ratio=ratio, kss_grad_cap="parameters"),
        train_dataset=TokenDataset(),
        callbacks=[capture],
    )
    trainer.train()
    return trainer, capture.grads


def test_parameter_cap_binds_when_the_kss_gradient_lies_between_the_cap_and_the_task_gradient(tmp_path):
    """`||g_KSS|| = 0.75 ||g_task||` with `max_grad_ratio=0.5`: the cap binds (factor 0.5 / 0.75), although the KSS
    gradient is smaller than the task gradient."""
    _, task = _one_capped_step(tmp_path, "task", 0.0, None)
    names = sorted(task)
    task_norm = torch.cat([task[n].flatten() for n in names]).norm().item()

    def kss_norm(grads):
        return torch.cat([(grads[n] - task[n]).flatten() for n in names]).norm().item()

    _, raw = _one_capped_step(tmp_path, "probe", 20.0, None)  # raw Eq. 14 gradient, linear in alpha
    ratio_at_20 = kss_norm(raw) / task_norm
    assert ratio_at_20 > 1.0
    alpha = 20.0 * 0.75 / ratio_at_20
    _, uncapped = _one_capped_step(tmp_path, "uncapped", alpha, None)
    assert kss_norm(uncapped) / task_norm == pytest.approx(0.75, rel=1e-3)  # the raw ratio sits between 0.5 and 1

    capped_trainer, capped = _one_capped_step(tmp_path, "capped", alpha, 0.5)
    scale = capped_trainer.state.log_history[0]["kss/grad_scale"]
    assert scale < 0.99
    assert scale == pytest.approx(0.5 / 0.75, rel=1e-3)
    assert kss_norm(capped) == pytest.approx(0.5 * task_norm, rel=1e-3)


@pytest.mark.parametrize("cap", ["parameters", "activations"])
def test_logged_grad_scale_is_the_mean_of_its_own_window(tmp_path, cap):
    """KSS on every step, a cap that never binds: each training log reports factor 1, not 1 / (number of logs)."""
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2),
        args=_args(tmp_path, max_steps=3, kss_alpha=1e-3, kss_every_n_steps=1, kss_max_grad_ratio=1.0,
                   kss_grad_cap=cap),
        train_dataset=TokenDataset(),
    )
    trainer.train()
    assert trainer.kss_steps == [0, 1, 2]
    scales = [h.get("kss/grad_scale") for h in _train_logs(trainer)]
    assert scales == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------- validation


def test_negative_alpha_is_refused_naming_kss_alpha(tmp_path):
    with pytest.raises(ValueError, match=r"kss_alpha must be >= 0"):
        cpu_training_args(tmp_path, KSSTrainingArguments, kss_alpha=-0.1)
    with pytest.raises(ValueError, match=r"alpha must be >= 0"):
        KSSConfig(alpha=-0.1)
    assert not KSSConfig(alpha=0.0).active  # 0 is the documented "off", still accepted


def test_fewer_than_two_token_states_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 2"):
        KSSConfig(num_samples=1)
    with pytest.raises(ValueError, match=r"kss_num_samples"):
        cpu_training_args(tmp_path, KSSTrainingArguments, kss_num_samples=1)
    assert KSSConfig(num_samples=2).num_samples == 2  # the smallest sample a DMD can use
