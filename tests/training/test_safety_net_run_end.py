"""The guard at the end of a run and in hyperparameter-search trials.

* The weights the last update leaves are judged once training ends (one forward of the last batch): a diverged last
  update is never reported as validated, its checkpoint is set aside, and the validated state comes back where the
  guard restores.
* A trial of `hyperparameter_search` saves its checkpoints in `output_dir/run-<trial>/`: the guard finds them there
  (sets suspect ones aside, writes the trial's record there).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TokenDataset, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from transformers import Trainer, TrainerCallback

from hf_koopman.training import KSSTrainer, KSSTrainingArguments
from hf_koopman.training.guard import DivergedModelError
from hf_koopman.training.safety_net import RECORD_NAME, SUSPECT_PREFIX


class HugeLastRate(TrainerCallback):
    """The run's last update at learning rate 1e4: every earlier step trains normally."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == state.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = 1e4


def _max_weight(model: torch.nn.Module) -> float:
    return max(p.detach().abs().max().item() for p in model.parameters())


@pytest.mark.parametrize("on_divergence, restore_on_stop", [("stop", False), ("stop", True), ("rollback", True)])
def test_a_diverged_last_update_is_caught_after_training(tmp_path, on_divergence, restore_on_stop):
    guard = _guard(on_divergence=on_divergence, restore_on_stop=restore_on_stop)
    args = _args(tmp_path, KSSTrainingArguments, max_steps=6, learning_rate=1e-3, save_steps=3,
                 gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=128),
                         callbacks=[guard, HugeLastRate()])
    trainer.train()
    assert guard.divergence is not None and guard.divergence["step"] == 6
    assert "after its update" in guard.divergence["causes"][0]
    # the final checkpoint holds the diverged weights: set aside, so resume_from_checkpoint=True skips it
    assert not (tmp_path / "checkpoint-6").exists() and (tmp_path / f"{SUSPECT_PREFIX}checkpoint-6").is_dir()
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-3")
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert record["diverged"] and record["events"][-1]["step"] == 6
    assert trainer.state.log_history[-1]["rksp/diverged"] == 1.0  # the final metrics say so
    if restore_on_stop:  # the validated state is back in memory: saving it is allowed
        assert guard.weights_validated and _max_weight(trainer.model) < 100
        trainer.save_model(str(tmp_path / "final"))
    else:  # the diverged weights stay, named as such, and KSSTrainer refuses to save them
        assert not guard.weights_validated and _max_weight(trainer.model) > 100
        with pytest.raises(DivergedModelError):
            trainer.save_model(str(tmp_path / "final"))


def test_a_sane_last_update_changes_nothing(tmp_path):
    guard = _guard()
    args = _args(tmp_path, max_steps=4, learning_rate=1e-3, save_steps=2)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=64), callbacks=[guard])
    trainer.train()
    assert guard.divergence is None and guard.weights_validated and guard.events == []
    assert (tmp_path / "checkpoint-4").is_dir()  # unjudged by a training step, kept under its name
    assert model.training == trainer.model.training and not (tmp_path / RECORD_NAME).exists()


def _trial_trainer(tmp_path, guard, **kw):
    """A Trainer run as one `hyperparameter_search` trial of the optuna backend, without optuna: the trial object
    and `hp_params` are the few fields the Trainer reads."""
    from transformers.trainer_utils import HPSearchBackend

    trainer = Trainer(model_init=lambda *a: tiny_gpt2(), args=_args(tmp_path, save_total_limit=None, **kw),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    trainer.hp_search_backend = HPSearchBackend.OPTUNA
    trainer.hp_space = lambda trial: {}
    return trainer


def test_a_trial_of_a_hyperparameter_search_sets_its_own_suspect_checkpoints_aside(tmp_path, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: {"learning_rate": 1.0})
    guard = _guard()
    trial = SimpleNamespace(number=0, params={}, report=lambda *a, **k: None, should_prune=lambda: False)
    _trial_trainer(tmp_path, guard).train(trial=trial)
    run = tmp_path / "run-0"
    assert guard.divergence is not None
    step = guard.divergence["step"]
    assert guard.last_good_checkpoint == str(run / f"checkpoint-{step - 2}")
    assert (run / f"{SUSPECT_PREFIX}checkpoint-{step - 1}").is_dir() and not (run / f"checkpoint-{step - 1}").exists()
    record = json.loads((run / RECORD_NAME).read_text())  # the trial's record, in the trial's folder
    assert record["last_good_checkpoint"] == guard.last_good_checkpoint and record["last_good_checkpoint_on_disk"]
    assert all(Path(p).is_dir() for p in record["events"][-1]["suspect_checkpoints"])
    assert not (tmp_path / RECORD_NAME).exists()


def test_the_push_warning_says_which_hub_copies_a_later_save_does_not_replace():
    from hf_koopman.training.safety_net import _pushed_copies

    def args(strategy):
        return SimpleNamespace(push_to_hub=True, hub_strategy=strategy)

    assert "keeps them" in _pushed_copies(args("all_checkpoints"))
    assert "keeps them" not in _pushed_copies(args("every_save"))
    assert "last-checkpoint" in _pushed_copies(args("checkpoint"))
    assert _pushed_copies(args("end")) == "" and _pushed_copies(SimpleNamespace(push_to_hub=False)) == ""


def test_kss_trainer_takes_the_guard_hooks_off_when_training_raises(tmp_path):
    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    model = tiny_gpt2()
    trainer = KSSTrainer(model=model, args=_args(tmp_path, KSSTrainingArguments, max_steps=4, learning_rate=1e-3),
                         train_dataset=TokenDataset(n=64), callbacks=[_guard(), Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not any(m._forward_hooks for m in model.modules())
