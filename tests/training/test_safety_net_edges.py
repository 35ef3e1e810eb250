"""The safety net where 🤗 Trainer settings meet it: epoch saves, rotation, resumes, best-model loading, a train()
that raised, and misuse of the callback's arguments. The run diverges at step 4 (learning rate 1.0; see
`test_safety_net.py`), with checkpoint-2 the last good one and checkpoint-3 suspect."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TokenDataset, info_logs, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from transformers import Trainer, TrainerCallback, TrainerState

from hf_koopman.training import RKSPCallback
from hf_koopman.training.safety_net import SUSPECT_PREFIX
from hf_koopman.training.guard import DivergenceEvent


@pytest.mark.parametrize("restore_on_stop", [True, False])
def test_an_epoch_end_save_never_writes_the_stopping_step(tmp_path, restore_on_stop):
    # save_strategy="epoch" saves after on_epoch_end: the step that stopped the run must not become a checkpoint
    guard = _guard(restore_on_stop=restore_on_stop)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_strategy="epoch"),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    trainer.train()
    assert guard.divergence["step"] == 4
    assert not any(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("kwargs, error, named", [
    ({"loss_threshold": "abc"}, TypeError, "loss_threshold"),
    ({"loss_threshold": True}, TypeError, "loss_threshold"),
    ({"grad_norm_threshold": None}, TypeError, "grad_norm_threshold"),
    ({"restore_on_stop": "no"}, TypeError, "restore_on_stop"),
])
def test_bad_guard_arguments_name_the_argument(kwargs, error, named):
    with pytest.raises(error, match=named):
        RKSPCallback(**kwargs)


def test_bind_takes_only_a_trainer(tmp_path):
    with pytest.raises(TypeError, match="transformers.Trainer"):
        RKSPCallback().bind(_args(tmp_path))


def test_a_small_save_total_limit_is_warned_about_in_memory_mode_too(tmp_path, caplog):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, learning_rate=1e-3, save_total_limit=1),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "save_total_limit=1 can rotate away" in caplog.text


def test_messages_say_when_no_checkpoint_exists_or_rotation_removed_it(tmp_path):
    guard = RKSPCallback()
    assert "no checkpoint was validated" in guard._checkpoint_on_disk()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    assert "deleted since" in guard._checkpoint_on_disk()
    (tmp_path / "checkpoint-2").mkdir()
    assert guard._checkpoint_on_disk() == str(tmp_path / "checkpoint-2")


def test_when_rotation_removed_the_last_good_checkpoint_the_advice_names_what_is_left(tmp_path):
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-6").mkdir()  # later than the last good one: never advised
    assert "no earlier checkpoint of this run is on disk" in guard._what_to_do()
    assert "older checkpoint" not in guard._what_to_do()
    (tmp_path / "checkpoint-2").mkdir()  # on disk, but never validated by this guard (an earlier run's, say)
    assert "no earlier checkpoint of this run is on disk" in guard._what_to_do()
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-3").mkdir()
    guard._validated_paths = [str(tmp_path / f"checkpoint-{k}") for k in (1, 3, 4)]
    guard.events.append({"step": 5, "suspect_checkpoints": [str(tmp_path / "checkpoint-3")]})
    assert f"resume_from_checkpoint={str(tmp_path / 'checkpoint-1')!r}" in guard._what_to_do()  # 3 is suspect


def test_validated_checkpoints_rotated_away_leave_the_guards_list(tmp_path):
    # one path per save would grow without bound over a long run; rotated folders can never be advised again
    guard = RKSPCallback()
    for step in range(1, 51):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        guard._promote(str(folder))
        if step > 2:  # save_total_limit=2
            (tmp_path / f"checkpoint-{step - 2}").rmdir()
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-50")
    assert guard._validated_paths == [str(tmp_path / f"checkpoint-{k}") for k in (48, 49, 50)]


@pytest.mark.parametrize("on_divergence", ["stop", "rollback"])
def test_load_best_model_at_end_never_loads_a_suspect_checkpoint(tmp_path, monkeypatch, on_divergence):
    # greater_is_better=True on eval_loss makes the checkpoint before the blow-up the "best" one; a relative
    # output_dir checks that the paths are compared as folders
    monkeypatch.chdir(tmp_path)
    guard = _guard(on_divergence=on_divergence)
    args = _args("rel", max_steps=8, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=128),
                      eval_dataset=TokenDataset(n=8, seed=1), callbacks=[guard])
    trainer.train()
    # the names the suspect checkpoints had when they were saved (before the trip renamed them)
    suspects = {Path(p).name.removeprefix(SUSPECT_PREFIX) for e in guard.events for p in e["suspect_checkpoints"]}
    best = trainer.state.best_model_checkpoint
    assert suspects and Path(best).is_dir() and Path(best).name not in suspects
    assert trainer.state.best_global_step == int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])


def _tripped_at_step_4(tmp_path):
    """A guard whose trip at step 4 is about to be logged: last good checkpoint-2, suspect checkpoint-3."""
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    suspect = str(tmp_path / "checkpoint-3")
    event = DivergenceEvent(step=4, causes=["loss"], cause_flags=1, loss=1e3, grad_norm=None, first_bad_layer=None,
                            last_good_checkpoint=guard.last_good_checkpoint, suspect_checkpoints=[suspect])
    guard.events.append(event.to_dict())
    guard._to_log = event
    return guard, suspect


def test_a_suspect_best_checkpoint_whose_replacement_is_gone_is_forgotten(tmp_path, caplog):
    guard, suspect = _tripped_at_step_4(tmp_path)  # checkpoint-2 rotated away: not on disk
    state = TrainerState()
    state.best_model_checkpoint, state.best_global_step, state.best_metric = suspect, 3, 9.0
    with caplog.at_level("WARNING"):
        guard._log_event(SimpleNamespace(output_dir=str(tmp_path), metric_for_best_model="loss"), state, None)
    assert (state.best_model_checkpoint, state.best_global_step, state.best_metric) == (None, None, None)
    assert "is suspect" in caplog.text and "no validated checkpoint is on disk" in caplog.text


def test_two_guards_on_one_run_both_watch(tmp_path):
    strict, loose = _guard(loss_threshold=30.0), _guard(loss_threshold=50.0)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=TokenDataset(n=128),
                      callbacks=[strict, loose])
    trainer.train()
    assert strict.divergence is not None and strict.divergence["step"] < 4
    # the guard registered second watches too: one whose gradient-norm threshold any step crosses trips at step 1
    first, tight = _guard(loss_threshold=30.0), _guard(grad_norm_threshold=1e-6)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "b"), train_dataset=TokenDataset(n=128),
            callbacks=[first, tight]).train()
    assert tight.divergence is not None and tight.divergence["step"] == 1
    assert "gradient norm > 1e-06" in tight.divergence["causes"][0]


def test_a_callback_reused_for_a_fresh_run_starts_clean(tmp_path):
    guard = _guard(on_divergence="rollback")
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "a", max_steps=6), train_dataset=TokenDataset(n=128),
            callbacks=[guard]).train()
    assert guard.rollbacks >= 1 and guard.lr_scale < 1
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "b", max_steps=3, learning_rate=1e-3),
            train_dataset=TokenDataset(n=128), callbacks=[guard]).train()
    assert guard.events == [] and guard.lr_scale == 1.0
    assert guard.last_good_checkpoint.startswith(str(tmp_path / "b"))
    assert not (tmp_path / "b" / "rksp_guard.json").exists()


def test_checkpoint_mode_checks_every_step_until_a_checkpoint_is_validated(tmp_path):
    # no CPU copy to undo a window with: the first trip is caught on its own step, and only its update is skipped
    guard = _guard(rollback_source="checkpoint", check_every_n_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=10), train_dataset=TokenDataset(n=128),
                      callbacks=[guard])
    trainer.train()
    assert guard.divergence["step"] == 4 and guard.divergence["first_checked_step"] == 4


def test_save_strategy_best_never_saves_the_stopping_step(tmp_path):
    guard = _guard(restore_on_stop=False)
    args = _args(tmp_path, save_strategy="best", eval_strategy="steps", eval_steps=2, metric_for_best_model="eval_loss",
                 greater_is_better=True)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=128), eval_dataset=TokenDataset(n=8, seed=1),
            callbacks=[guard]).train()
    assert guard.divergence["step"] == 4 and not (tmp_path / "checkpoint-4").exists()


def test_a_resume_without_callback_state_keeps_the_initialisation_profile(tmp_path, caplog):
    data = TokenDataset(n=128)
    first = RKSPCallback(guard=False)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, learning_rate=1e-3), train_dataset=data,
            callbacks=[first]).train()
    before = (tmp_path / "rksp_profile.json").read_bytes()
    resumed = RKSPCallback(guard=False)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=3, learning_rate=1e-3), train_dataset=data,
                      callbacks=[resumed])
    with info_logs(caplog):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.profile is None and (tmp_path / "rksp_profile.json").read_bytes() == before
    assert "not recomputed on trained weights" in caplog.text
    # the initialisation's verdict comes from the resumed checkpoint, and this run's checkpoints keep it
    assert first.init_verdict is not None
    assert (resumed.init_verdict, resumed.init_score) == (first.init_verdict, first.init_score)
    saved = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["RKSPCallback"]["attributes"]["init_verdict"] == first.init_verdict


def test_a_fresh_run_sets_an_earlier_runs_record_aside(tmp_path):
    # the record of a run that diverged at step 5 must not back off a later, unrelated run resumed in the same folder
    old = {"events": [{"step": 5, "action": "stop", "suspect_checkpoints": []}], "last_good_checkpoint": None}
    (tmp_path / "rksp_guard.json").write_text(json.dumps(old))
    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=3, learning_rate=1e-3), train_dataset=TokenDataset(n=128),
            callbacks=[guard]).train()
    assert json.loads((tmp_path / "rksp_guard.previous-1.json").read_text()) == old
    assert not (tmp_path / "rksp_guard.json").exists()  # this run had no event
    resumed = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4, learning_rate=1e-3),
                      train_dataset=TokenDataset(n=128), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.lr_scale == 1.0 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_resuming_from_a_suspect_checkpoint_names_the_last_good_one(tmp_path, caplog):
    data = TokenDataset(n=128)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[_guard()]).train()
    resumed = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4), train_dataset=data, callbacks=[resumed])
    with caplog.at_level("ERROR"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "_suspect-checkpoint-3"))  # the trip renamed it
    assert "resuming from _suspect-checkpoint-3, which the guard recorded as suspect" in caplog.text
    assert str(tmp_path / "checkpoint-2") in caplog.text
    record = json.loads((tmp_path / "rksp_guard.json").read_text())
    assert record["last_good_checkpoint"] == str(tmp_path / "checkpoint-2")  # not lost by the resumed run


class RaiseAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom")


def test_the_hooks_of_a_train_that_raised_are_removed_by_the_next_guard(tmp_path):
    model = tiny_gpt2()
    crashed = _guard()
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=TokenDataset(n=128),
                callbacks=[crashed, RaiseAtStep()]).train()
    assert crashed._loss_tap is not None  # on_train_end never ran
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    Trainer(model=model, args=_args(tmp_path / "again", max_steps=1, learning_rate=1e-3),
            train_dataset=TokenDataset(n=128), callbacks=[_guard()]).train()
    assert crashed._loss_tap is None and crashed._grad_tap is None and crashed._watch is None
    assert sum(len(m._forward_hooks) for m in model.modules()) < hooks
    assert torch.isfinite(next(model.parameters())).all()


def test_remove_hooks_takes_the_guard_off_a_model_whose_train_raised(tmp_path):
    model = tiny_gpt2()
    before = sum(len(m._forward_hooks) for m in model.modules())
    crashed = _guard()
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=TokenDataset(n=128),
                callbacks=[crashed, RaiseAtStep()]).train()
    assert sum(len(m._forward_hooks) for m in model.modules()) > before
    crashed.remove_hooks()
    assert sum(len(m._forward_hooks) for m in model.modules()) == before


def test_train_again_on_the_same_model_keeps_its_initialisation_profile(tmp_path):
    callback = RKSPCallback(guard=False)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, learning_rate=1e-3, save_strategy="no"),
                      train_dataset=TokenDataset(n=128), callbacks=[callback])
    trainer.train()
    first, written = callback.profile, (tmp_path / "rksp_profile.json").read_bytes()
    trainer.train()  # continues from trained weights at step 0: not an initialisation
    assert callback.profile is first and (tmp_path / "rksp_profile.json").read_bytes() == written


def test_a_suspect_best_checkpoint_gives_way_to_the_best_validated_one(tmp_path):
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    guard, suspect = _tripped_at_step_4(tmp_path)
    state = TrainerState()
    state.log_history = [{"eval_loss": 1.0, "step": 1}, {"eval_loss": 2.0, "step": 2}, {"eval_loss": 0.5, "step": 3}]
    state.best_model_checkpoint, state.best_global_step, state.best_metric = suspect, 3, 0.5
    args = SimpleNamespace(output_dir=str(tmp_path), metric_for_best_model="loss", greater_is_better=False)
    guard._log_event(args, state, None)
    assert (state.best_model_checkpoint, state.best_global_step, state.best_metric) == (
        str(tmp_path / "checkpoint-1"), 1, 1.0)


def test_auto_never_restores_from_checkpoints_under_deepspeed():
    guard = RKSPCallback()
    guard._params, guard._sharded = [], False
    args = SimpleNamespace(save_strategy="steps", save_only_model=False, save_total_limit=None, world_size=1,
                           deepspeed="ds_config.json")
    assert guard._resolve_rollback_source(args) is False


@pytest.mark.parametrize("mode", ["stop", "rollback"])
def test_a_finite_loss_over_the_threshold_names_the_setting_to_raise(tmp_path, caplog, mode):
    # a loss scale unlike an LM's (here: the threshold below the untrained model's loss, ~4.2) trips on a finite value
    guard = _guard(on_divergence=mode, loss_threshold=1.0)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=3, save_strategy="no"),
                      train_dataset=TokenDataset(), callbacks=[guard])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert guard.events
    assert "raise loss_threshold (now 1) in RKSPCallback(...)" in caplog.text
    assert "grad_norm_threshold (now" not in caplog.text


class PoisonAfter(TrainerCallback):
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2:
            with torch.no_grad():
                model.transformer.wte.weight.fill_(float("nan"))


def test_a_non_finite_trip_does_not_suggest_raising_a_threshold(tmp_path, caplog):
    guard = _guard(on_divergence="stop")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=4, save_strategy="no"),
                      train_dataset=TokenDataset(), callbacks=[guard, PoisonAfter()])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert guard.events and guard.events[0]["loss"] == "nan"
    assert "raise loss_threshold" not in caplog.text and "raise grad_norm_threshold" not in caplog.text


def _logged_loss_args(tmp_path, **kw):
    # label smoothing: the Trainer computes the loss outside the model, so the guard judges the logged loss
    base = dict(learning_rate=1e-3, max_steps=12, save_steps=1, logging_steps=5, label_smoothing_factor=0.1)
    return _args(tmp_path, **{**base, **kw})


def _logged_loss_trainer(tmp_path, source: str, **kw) -> Trainer:
    guard = _guard(on_divergence="rollback", rollback_source=source)
    return Trainer(model=tiny_gpt2(), args=_logged_loss_args(tmp_path, **kw), train_dataset=TokenDataset(n=64),
                   callbacks=[guard])


def test_rotation_that_outruns_the_logged_validation_is_refused_for_checkpoint_rollbacks(tmp_path):
    trainer = _logged_loss_trainer(tmp_path, "checkpoint", save_total_limit=3)
    with pytest.raises(ValueError, match=r"save_total_limit=3 with logging_steps=5 and save_steps=1.*to 6 or more"):
        trainer.train()
    assert not list(Path(tmp_path).glob("checkpoint-*"))  # refused before anything was saved


def test_rotation_that_outruns_the_logged_validation_is_warned_about_in_memory_mode(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _logged_loss_trainer(tmp_path, "memory", save_total_limit=3, max_steps=2).train()
    assert "up to 5 checkpoints wait for a passing log" in caplog.text


def test_a_limit_that_keeps_the_last_good_checkpoint_passes(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _logged_loss_trainer(tmp_path, "checkpoint", save_total_limit=6, max_steps=2).train()
    assert "checkpoints wait for a passing log" not in caplog.text
