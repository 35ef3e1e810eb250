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
from conftest import TokenDataset, bad_batch_at, tiny_gpt2
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


def test_a_nan_last_update_is_reported_as_nan(tmp_path):
    """The end-of-run check names the loss it read: NaN, not the +inf the maximum over processes uses."""

    class NaNAfterLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == state.max_steps:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))

    guard = _guard()
    args = _args(tmp_path, max_steps=3, learning_rate=1e-3, save_strategy="no")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=64), callbacks=[guard, NaNAfterLastStep()]
            ).train()
    assert guard.divergence is not None and "loss here: nan" in guard.divergence["causes"][0]


def test_a_sane_last_update_changes_nothing(tmp_path):
    guard = _guard()
    args = _args(tmp_path, max_steps=4, learning_rate=1e-3, save_steps=2)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=64), callbacks=[guard])
    trainer.train()
    assert guard.divergence is None and guard.weights_validated and guard.events == []
    assert (tmp_path / "checkpoint-4").is_dir()  # its loss judged by the end-of-run check, kept under its name
    # but not validated: no gradient norm or block output was judged on its weights, so checkpoint-2 (validated by
    # step 3's full check) stays the last good one
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")
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


def test_a_rollback_at_the_last_step_is_not_judged_again_at_the_end(tmp_path):
    model, data = bad_batch_at(6)  # the last step's batch
    guard = _guard(on_divergence="rollback")
    output = Trainer(model=model, args=_args(tmp_path, max_steps=6, learning_rate=1e-3), train_dataset=data,
                     callbacks=[guard]).train()
    # the last update was discarded: the weights are the validated ones, and the tripping batch is not re-judged
    assert [(e["step"], e["action"]) for e in guard.events] == [(6, "rollback")]
    assert guard.divergence is None and guard.weights_validated and output.metrics["rksp/diverged"] == 0.0
    assert (tmp_path / "checkpoint-6").is_dir()


def test_an_exhausted_rollback_budget_without_restore_on_stop_keeps_the_weights_at_the_end(tmp_path):
    guard = _guard(on_divergence="rollback", max_rollbacks=0, restore_on_stop=False)
    args = _args(tmp_path, max_steps=6, learning_rate=1e-3, save_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=128),
                      callbacks=[guard, HugeLastRate()])
    trainer.train()
    assert guard.divergence["step"] == 6 and guard.divergence.get("restored_step") is None
    assert not guard.weights_validated and _max_weight(trainer.model) > 100


def test_a_trip_found_at_the_end_reaches_the_reporters(tmp_path):
    class Reporter(TrainerCallback):  # stands for TensorBoard / W&B, which the Trainer puts before user callbacks
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    guard, reporter = _guard(), Reporter()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6, learning_rate=1e-3, save_steps=3),
                      train_dataset=TokenDataset(n=128), callbacks=[guard, HugeLastRate()])
    guard.bind(trainer)
    trainer.callback_handler.callbacks.insert(1, reporter)
    trainer.train()
    assert any(entry.get("rksp/diverged") == 1.0 and entry.get("rksp/diverged_step") == 6.0
               for entry in reporter.seen)
    final = next(entry for entry in trainer.state.log_history if "train_runtime" in entry)
    assert final["rksp/diverged"] == 1.0  # and the final metrics agree


def test_a_resumed_trial_finds_its_own_folder_among_the_trials(tmp_path, monkeypatch):
    import time

    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: {"trial": trial.number})

    def trial(n):
        return SimpleNamespace(number=n, params={}, report=lambda *a, **k: None, should_prune=lambda: False)

    _trial_trainer(tmp_path, _guard(), max_steps=3, learning_rate=1e-3).train(trial=trial(1))
    time.sleep(0.05)  # trial 0's checkpoint-3 is the newer one on disk
    _trial_trainer(tmp_path, _guard(), max_steps=6, learning_rate=1e-3).train(trial=trial(0))
    guard = _guard()
    trainer = _trial_trainer(tmp_path, guard, max_steps=6, learning_rate=1e-3)
    trainer.add_callback(HugeLastRate())
    trainer.train(trial=trial(1), resume_from_checkpoint=str(tmp_path / "run-1" / "checkpoint-3"))
    assert guard.divergence is not None and guard._trial_folder == tmp_path / "run-1"
    assert sorted(p.name for p in (tmp_path / "run-0").iterdir()) == [f"checkpoint-{k}" for k in range(1, 7)]
    assert (tmp_path / "run-1" / RECORD_NAME).is_file() and not (tmp_path / "run-0" / RECORD_NAME).exists()
    assert (tmp_path / "run-1" / f"{SUSPECT_PREFIX}checkpoint-6").is_dir()


def test_a_resumed_run_judges_its_last_update_although_the_record_ends_with_a_rollback(tmp_path):
    model, data = bad_batch_at(6)
    args = _args(tmp_path, max_steps=6, learning_rate=1e-3, save_steps=3)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[_guard(on_divergence="rollback")]).train()
    # the record's last event is that run's rollback at step 6; the resumed run's own step 6 diverges
    model, data = bad_batch_at(None)
    guard = _guard(on_divergence="rollback")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[guard, HugeLastRate()]).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [(e["step"], e["action"]) for e in guard.events] == [(6, "rollback"), (6, "stop")]
    assert (tmp_path / f"{SUSPECT_PREFIX}checkpoint-6").is_dir()


def test_a_second_stopping_guard_does_not_clear_the_first_ones_divergence_from_the_metrics(tmp_path):
    first, second = _guard(), _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6, learning_rate=1e-3, save_steps=3),
                      train_dataset=TokenDataset(n=128), callbacks=[first, second, HugeLastRate()])
    output = trainer.train()
    assert first.divergence["step"] == 6 and second.divergence is None  # the second judged the restored weights
    assert output.metrics["rksp/diverged"] == 1.0 and output.metrics["rksp/diverged_step"] == 6.0


def test_a_nan_in_the_log_history_does_not_hide_the_folder_a_run_saved(tmp_path):
    from hf_koopman.training import RKSPCallback

    history = [{"loss": 4.0, "grad_norm": float("nan"), "step": 1}]
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(
        json.dumps({"global_step": 1, "log_history": history}))  # NaN, as the Trainer writes it
    state = SimpleNamespace(global_step=1, log_history=[dict(history[0])])
    assert RKSPCallback._resumed_from(str(tmp_path / "checkpoint-1"), state) is True


def test_each_trial_of_a_search_writes_its_profile_into_its_own_folder(tmp_path, monkeypatch):
    """A hyperparameter search's trials profile at their own initialisation: each trial's rksp_profile.json and
    rksp_report.md go beside its checkpoints (`run-<n>`), none into the shared output_dir where one trial's files
    replaced another's; a trial that saves no checkpoint gets a folder named after its parameters."""
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: {"trial": trial.number})

    def trial(n):
        return SimpleNamespace(number=n, params={}, report=lambda *a, **k: None, should_prune=lambda: False)

    for n in (0, 1):
        callback = _guard(profile_at_init=True, num_samples=64, guard=False)
        _trial_trainer(tmp_path, callback, max_steps=2, learning_rate=1e-3 * (n + 1)).train(trial=trial(n))
        saved = json.loads((tmp_path / f"run-{n}" / "rksp_profile.json").read_text())
        assert saved["meta"]["trial_params"] == {"trial": n} and saved["meta"]["learning_rate"] == 1e-3 * (n + 1)
        assert (tmp_path / f"run-{n}" / "rksp_report.md").is_file()
    assert not (tmp_path / "rksp_profile.json").exists()
    assert not list(tmp_path.glob("rksp-trial-*"))  # the provisional folders were emptied into run-<n>
    callback = _guard(profile_at_init=True, num_samples=64, guard=False)
    _trial_trainer(tmp_path, callback, max_steps=2, learning_rate=1e-3, save_strategy="no").train(trial=trial(2))
    assert len(list(tmp_path.glob("rksp-trial-*/rksp_profile.json"))) == 1

    class Pruned(TrainerCallback):  # optuna's TrialPruned, raised before the trial's first save
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("pruned")

    trainer = _trial_trainer(tmp_path, _guard(profile_at_init=True, num_samples=64, guard=False), max_steps=4,
                             learning_rate=1e-3, save_steps=3)
    trainer.add_callback(Pruned())
    with pytest.raises(RuntimeError, match="pruned"):
        trainer.train(trial=trial(3))
    assert len(list(tmp_path.glob("rksp-trial-*/rksp_profile.json"))) == 2  # its files were written at init


def test_a_trial_named_by_hp_name_keeps_its_files_and_a_failed_move_keeps_the_provisional_copy(tmp_path, monkeypatch):
    """With hp_name the provisional folder is the trial's own run folder: the files stay there (they were removed as
    if moved); when moving fails, the provisional copy is kept (it was removed although nothing was written)."""
    import transformers.integrations

    import hf_koopman.training.callback as callback_module

    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: {"trial": trial.number})

    def trial(n):
        return SimpleNamespace(number=n, params={}, report=lambda *a, **k: None, should_prune=lambda: False)

    named = _trial_trainer(tmp_path, _guard(profile_at_init=True, num_samples=64, guard=False), max_steps=2,
                           learning_rate=1e-3)
    named.hp_name = lambda t: f"trial-{t.number}"
    named.train(trial=trial(0))
    assert (tmp_path / "trial-0" / "rksp_profile.json").is_file() and (tmp_path / "trial-0" / "checkpoint-1").is_dir()
    real = callback_module.move_into_place

    def failing(staging, out, *args, **kwargs):
        if out.name == "run-1":
            raise OSError("disk full")
        return real(staging, out, *args, **kwargs)

    monkeypatch.setattr(callback_module, "move_into_place", failing)
    _trial_trainer(tmp_path, _guard(profile_at_init=True, num_samples=64, guard=False), max_steps=2,
                   learning_rate=1e-3).train(trial=trial(1))
    assert len(list(tmp_path.glob("rksp-trial-*/rksp_profile.json"))) == 1
