"""The safety net where the model returns no loss (label smoothing, `compute_loss_func`: the guard judges the Trainer's
logged loss), checkpoints another callback writes after a stop, a divergence on step 1, the back-off of a resumed run
and the errors of `load_checkpoint_state`.

Setting as in `test_safety_net.py`: learning rate 1.0, a checkpoint every step; the loss passes 50 at step 4 (with
label smoothing 0.1 or a plain cross-entropy passed as `compute_loss_func` too), so checkpoint-2 is the last good
checkpoint and checkpoint-3 is suspect.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LearningRates, TokenDataset, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_koopman.training import DivergedModelError, KSSTrainer, KSSTrainingArguments, RKSPCallback
from hf_koopman.training.guard import CheckpointKeyError, checkpoint_problem, load_checkpoint_state


def causal_ce(outputs, labels, num_items_in_batch=None):
    """A user loss for `Trainer(compute_loss_func=...)`: the shifted cross-entropy the model would compute."""
    logits = outputs.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


class SaveOnLog(TrainerCallback):
    """A user's callback that asks for a save at every training log (it runs after the guard's on_step_end)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            control.should_save = True


class NaNAt(TrainerCallback):
    """After the update of step `step`, NaN in one weight: step `step + 1` trips."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and "checkpoint" in p.name)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- 1. the model returns no loss
def test_with_label_smoothing_the_logged_loss_trips_and_no_diverged_checkpoint_is_named_good(tmp_path, caplog):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, label_smoothing_factor=0.1),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train().metrics
    event = guard.divergence
    assert metrics["rksp/diverged"] == 1.0 and event["step"] == 4 and event["cause_flags"] == 1
    assert "logged loss > 50" in event["causes"][0] and event["loss"] > 50
    assert event["restored_step"] == 2 and guard.weights_validated
    # the Trainer logs step 4 before it saves it: the stop cancels that save; checkpoint-3 led to step 4's loss
    assert _checkpoints(tmp_path) == ["_suspect-checkpoint-3", "checkpoint-1", "checkpoint-2"]
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2") == get_last_checkpoint(str(tmp_path))
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["events"][0]["step"] == 4
    # said once, with why and what it costs
    assert caplog.text.count("the model returns no loss on training steps") == 1
    assert "label_smoothing_factor" in caplog.text and "judges the loss the Trainer logs instead" in caplog.text


def test_with_compute_loss_func_a_logged_trip_rolls_back_and_the_rollback_steps_checkpoint_waits_for_a_log(tmp_path):
    guard, rates = _guard(on_divergence="rollback"), LearningRates()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(n=128),
                      callbacks=[guard, rates], compute_loss_func=causal_ce)
    trainer.train()
    assert [(e["step"], e["action"], e["restored_step"]) for e in guard.events] == [(4, "rollback", 2)]
    assert guard.divergence is None and trainer.state.global_step == 6
    assert rates.lrs == [1.0] * 4 + [0.5] * 2
    # checkpoint-4 is written after the rollback: it holds the restored state of step 2, and the passing log of
    # step 5 (the first loss computed from it) validated it
    assert (tmp_path / "_suspect-checkpoint-3").is_dir() and not (tmp_path / "checkpoint-3").exists()
    four, two = _weights(tmp_path / "checkpoint-4"), _weights(tmp_path / "checkpoint-2")
    assert all(torch.equal(four[k], v) for k, v in two.items())
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-5")


def test_a_logged_mean_over_several_steps_sets_aside_every_checkpoint_it_covers(tmp_path, caplog):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, logging_steps=2, label_smoothing_factor=0.1),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "With logging_steps=2 that is the mean of 2 steps" in caplog.text and "logging_steps=1" in caplog.text
    event = guard.divergence
    step, first = event["step"], event["first_checked_step"]
    assert step % 2 == 0 and first == step - 1 and f"steps {first}-{step}" in caplog.text
    # the log covers the losses of steps first..step, computed with the weights of steps first - 1 .. step - 1; a
    # passing mean of 2 steps validates its checkpoints only when 2 x mean <= 50, so those of an undecided log before
    # it are set aside too: every checkpoint after the last good one
    good = int(Path(guard.last_good_checkpoint).name.split("-")[-1])
    assert good <= first - 2
    assert sorted((Path(p).name for p in event["suspect_checkpoints"]), key=lambda n: int(n.split("-")[-1])) == [
        f"_suspect-checkpoint-{s}" for s in range(good + 1, step)]
    assert not (tmp_path / f"checkpoint-{step}").exists()
    assert event["restored_step"] <= good and guard.weights_validated


def test_a_log_that_holds_a_rolled_back_step_is_not_judged_again(tmp_path):
    # step 2's gradient norm (~17) trips the per-step check; the Trainer's log of step 2 still holds its loss (~23)
    guard = _guard(on_divergence="rollback", loss_threshold=20.0, grad_norm_threshold=10.0, max_rollbacks=5)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=3, label_smoothing_factor=0.1),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    trainer.train()
    assert guard.events[0]["step"] == 2 and guard.events[0]["cause_flags"] == 2
    assert [e["step"] for e in guard.events].count(2) == 1


def test_with_logging_strategy_no_the_warning_says_the_loss_part_is_off(tmp_path, caplog):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, learning_rate=1e-3, save_strategy="no",
                                                    logging_strategy="no"),
                      train_dataset=TokenDataset(n=128), callbacks=[guard], compute_loss_func=causal_ce)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "the loss part of the rule is OFF" in caplog.text and "logging_strategy='steps'" in caplog.text


# ---------------------------------------------------------------- 2. a save another callback asks for after a stop
@pytest.mark.parametrize("restore_on_stop", [True, False])
def test_a_checkpoint_another_callback_writes_after_a_stop_is_set_aside(tmp_path, caplog, restore_on_stop):
    data = TokenDataset(n=128)
    guard = _guard(restore_on_stop=restore_on_stop)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=100), train_dataset=data,
                      callbacks=[guard, NaNAt(3), SaveOnLog()])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert guard.divergence["step"] == 4
    late = str(tmp_path / "_suspect-checkpoint-4")
    assert not (tmp_path / "checkpoint-4").exists() and Path(late).is_dir()
    assert guard.divergence["suspect_checkpoints"][-1] == guard.events[-1]["suspect_checkpoints"][-1] == late
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["events"][-1]["suspect_checkpoints"][-1] == late
    assert "was saved at step 4 after the guard stopped the run there" in caplog.text
    # checkpoint-3 holds the NaN (set aside by the trip); resume_from_checkpoint=True takes the last good checkpoint,
    # from before the divergence, so the back-off applies
    assert _checkpoints(tmp_path) == ["_suspect-checkpoint-3", "_suspect-checkpoint-4", "checkpoint-1",
                                      "checkpoint-2"]
    good = str(tmp_path / "checkpoint-2")
    assert guard.last_good_checkpoint == good == get_last_checkpoint(str(tmp_path))
    resumed, rates = _guard(), LearningRates()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5, save_steps=100), train_dataset=data,
            callbacks=[resumed, rates]).train(resume_from_checkpoint=True)
    assert rates.lrs == [0.5] * 3 and resumed.lr_scale == 0.5


def test_a_save_another_callback_asks_for_at_a_diverged_log_step_is_set_aside(tmp_path):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=100, label_smoothing_factor=0.1),
                      train_dataset=TokenDataset(n=128), callbacks=[guard, SaveOnLog()])
    trainer.train()
    # checkpoint-3 is suspect (step 4's loss came from it), and the save of step 4 came after the stop
    assert guard.divergence["step"] == 4
    assert _checkpoints(tmp_path) == ["_suspect-checkpoint-3", "_suspect-checkpoint-4", "checkpoint-1",
                                      "checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)) == guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")


# ---------------------------------------------------------------- 3. a divergence on step 1
@pytest.mark.parametrize("mode", ["stop", "rollback"])
def test_a_divergence_on_step_1_points_at_the_initialisation_not_the_learning_rate(tmp_path, caplog, mode):
    guard = _guard(on_divergence=mode)
    args = _args(tmp_path, KSSTrainingArguments, max_steps=3, learning_rate=1e-3)
    trainer = KSSTrainer(model=tiny_gpt2(initializer_range=30.0), args=args, train_dataset=TokenDataset(n=128),
                         callbacks=[guard])
    with caplog.at_level(logging.ERROR):
        trainer.train()
    assert guard.divergence["step"] == 1 and not guard.weights_validated
    with pytest.raises(DivergedModelError) as raised:
        trainer.save_model(str(tmp_path / "final"))
    for text in (str(raised.value), caplog.text):
        assert "before any optimizer update was applied" in text and "initializer_range" in text
        assert "train again from the initial weights" not in text
    if mode == "rollback":
        assert "to roll back to (the divergence is on step 1" in caplog.text


def test_a_later_divergence_with_nothing_validated_still_advises_a_lower_learning_rate():
    guard = RKSPCallback()
    guard.divergence = {"step": 2}
    assert "train again from the initial weights with a lower learning rate" in guard._what_to_do()
    guard.on_divergence = "rollback"
    assert "step 1" not in guard._why_no_rollback(False, 2) and "step 1" in guard._why_no_rollback(False, 1)


# ---------------------------------------------------------------- 4. the back-off of a resumed run
def _rolled_back_at_step_4(tmp_path) -> RKSPCallback:
    guard = _guard(on_divergence="rollback")
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(n=128),
            callbacks=[guard]).train()
    assert [(e["step"], e["action"]) for e in guard.events] == [(4, "rollback")]
    return guard


def test_a_resume_from_a_checkpoint_saved_after_a_rollback_records_its_back_off(tmp_path):
    _rolled_back_at_step_4(tmp_path)
    # checkpoint-4 was written after the rollback: its scheduler already runs at half the rate
    resumed, rates = _guard(on_divergence="rollback"), LearningRates()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(n=128),
                      callbacks=[resumed, rates])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert rates.lrs == [0.5, 0.5] and resumed.lr_scale == 0.5
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["lr_scale"] == 0.5


def test_the_same_callback_resumed_before_its_rollback_counts_the_back_off_once(tmp_path):
    guard = _rolled_back_at_step_4(tmp_path)
    # checkpoint-2's scheduler runs at the full rate; the recorded rollback at step 4 halves it once
    rates = LearningRates()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4), train_dataset=TokenDataset(n=128),
                      callbacks=[guard, rates])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert rates.lrs == [0.5, 0.5] and guard.lr_scale == 0.5


def test_a_resume_from_the_checkpoint_just_before_a_recorded_divergence_applies_its_back_off(tmp_path):
    _rolled_back_at_step_4(tmp_path)
    # the suspect checkpoint-3 (its rename undone by hand, or passed explicitly): the divergence at step 4 followed it
    (tmp_path / "_suspect-checkpoint-3").rename(tmp_path / "checkpoint-3")
    resumed, rates = _guard(on_divergence="rollback"), LearningRates()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5), train_dataset=TokenDataset(n=128),
            callbacks=[resumed, rates]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert rates.lrs[0] == 0.5  # not the full rate that diverged at step 4


# ---------------------------------------------------------------- 5. load_checkpoint_state names the fix
@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder of `tiny_gpt2()` with its weights and an AdamW `optimizer.pt`."""
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), tmp_path / "optimizer.pt")
    return tmp_path


def test_a_shape_mismatch_names_the_fix(saved):
    with pytest.raises(ValueError, match="has shape") as raised:
        load_checkpoint_state(tiny_gpt2(n_embd=64), None, saved)
    assert "Pass a checkpoint this model's configuration wrote" in str(raised.value)


def test_missing_parameters_print_without_quotes_and_name_the_fix(saved):
    with pytest.raises(KeyError) as missing:
        load_checkpoint_state(tiny_gpt2(n_layer=6), None, saved)
    assert isinstance(missing.value, CheckpointKeyError) and isinstance(missing.value, ValueError)
    message = str(missing.value)
    assert message.startswith(str(saved)) and "['" not in message  # no repr quoting
    assert "Pass a full checkpoint this model wrote" in message and "rollback_source='memory'" in message
    assert checkpoint_problem(tiny_gpt2(n_layer=6), saved).startswith(f"CheckpointKeyError: {saved}")


def test_an_optimizer_state_for_other_parameter_groups_names_the_fix(saved):
    model = tiny_gpt2()
    params = list(model.parameters())
    two_groups = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:]}])
    with pytest.raises(ValueError, match="optimizer=None to restore the weights only"):
        load_checkpoint_state(model, two_groups, saved)


# ---------------------------------------------------------------- 6. what a passing logged mean validates
class Recorded:
    """`compute_loss_func` with the plain shifted cross-entropy that keeps each step's loss (no gradient
    accumulation: one call per step)."""

    def __init__(self):
        self.losses = []

    def __call__(self, outputs, labels, num_items_in_batch=None):
        loss = causal_ce(outputs, labels)
        self.losses.append(float(loss.detach()))
        return loss


@pytest.mark.parametrize("source", ["checkpoint", "memory"])
def test_a_passing_mean_validates_its_steps_only_when_n_times_the_mean_is_under_the_threshold(tmp_path, source):
    # label-smoothed losses of steps 3 and 4: 35.0 and 63.2; their logged mean, 49.1, passes, but 2 x 49.1 > 50: the
    # weights of step 3 (whose loss at step 4 was 63.2) must not count as validated, on disk or in memory
    guard = _guard(on_divergence="rollback", rollback_source=source)
    args = _args(tmp_path, logging_steps=2, save_steps=3, label_smoothing_factor=0.1)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
    trainer.train()
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert logged[2] * 2 <= 50 and logged[4] < 50 < 2 * logged[4]
    assert guard.events[0]["step"] == 6 and guard.events[0]["last_good_checkpoint"] is None
    assert all(e["restored_step"] in (None, 1) for e in guard.events)  # step 1's state: the first log validated it
    assert str(tmp_path / "checkpoint-3") not in [guard.last_good_checkpoint, *(e["last_good_checkpoint"]
                                                                              for e in guard.events)]
    assert (tmp_path / "_suspect-checkpoint-3").is_dir()
    assert guard.events[0]["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-3")]


def test_with_logging_strategy_epoch_a_mean_over_the_epoch_validates_nothing_above_the_bound(tmp_path):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=-1, num_train_epochs=3, save_strategy="epoch",
                                                    logging_strategy="epoch", label_smoothing_factor=0.1),
                      train_dataset=TokenDataset(), callbacks=[guard])
    trainer.train()
    # epoch 1's mean (31.2 over 4 steps) passes, but 4 x 31.2 > 50 (its step 4 had 63): nothing is validated, so the
    # stop at the end of epoch 2 restores no state of epoch 1 and sets its checkpoint aside
    assert guard.divergence["step"] == 8 and guard.divergence["restored_step"] is None
    assert not guard.weights_validated and guard.last_good_checkpoint is None
    assert guard.divergence["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-4")]


def test_a_negative_logged_loss_ends_validation_by_logged_loss_with_one_warning(tmp_path, caplog):
    def shifted(outputs, labels, num_items_in_batch=None):
        return causal_ce(outputs, labels) - 10.0  # a loss below 0: n x mean bounds no step's loss

    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4, learning_rate=1e-3),
                      train_dataset=TokenDataset(), callbacks=[guard], compute_loss_func=shifted)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert caplog.text.count("is negative") == 1 and "no logged loss validates a state" in caplog.text
    assert guard.last_good_checkpoint is None and guard.divergence is None


# ---------------------------------------------------------------- 7. the steps after the last training log
def test_the_steps_after_the_last_log_are_judged_from_train_loss_and_their_weights_are_refused(tmp_path, caplog):
    # KSS off, label smoothing: logging_steps=3 logs step 3 only; steps 4 and 5 (losses 63 and 60) come after it
    guard = _guard()
    args = _args(tmp_path, KSSTrainingArguments, max_steps=5, logging_steps=3, label_smoothing_factor=0.1)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
    with caplog.at_level(logging.ERROR):
        metrics = trainer.train().metrics
    event = guard.divergence
    assert metrics["rksp/diverged"] == 1.0 and metrics["rksp/diverged_step"] == 5.0
    assert (event["step"], event["first_checked_step"], event["action"]) == (5, 4, "stop") and event["loss"] > 50
    assert "after the last training log, from the Trainer's final train_loss" in event["causes"][0]
    assert "Training had ended, so nothing was rolled back" in caplog.text
    assert not guard.weights_validated
    with pytest.raises(DivergedModelError):
        trainer.save_model(str(tmp_path / "final"))
    # every checkpoint not validated is set aside, checkpoint-5 (trained through the diverged steps) included
    assert "checkpoint-5" not in _checkpoints(tmp_path) and (tmp_path / "_suspect-checkpoint-5").is_dir()
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["events"][0]["step"] == 5


def test_a_resumed_calls_tail_is_its_train_loss_less_its_own_logs(tmp_path):
    # run A: steps 1-2 (no log); run B resumes checkpoint-2, logs step 3 and ends at 5: its train_loss covers 3-5
    data = TokenDataset()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, logging_steps=3), train_dataset=data,
            callbacks=[_guard()], compute_loss_func=causal_ce).train()
    guard, losses = _guard(), Recorded()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5, logging_steps=3), train_dataset=data,
                      callbacks=[guard], compute_loss_func=losses)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(losses.losses) == 3 and losses.losses[0] < 50
    event = guard.divergence
    assert (event["step"], event["first_checked_step"]) == (5, 4)
    assert event["loss"] == pytest.approx(sum(losses.losses[1:]) / 2, rel=1e-5)
    assert [Path(p).name for p in event["suspect_checkpoints"]] == [f"_suspect-checkpoint-{s}" for s in (3, 4, 5)]


def test_a_passing_tail_validates_its_checkpoints(tmp_path):
    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5, logging_steps=3, learning_rate=1e-3),
            train_dataset=TokenDataset(), callbacks=[guard], compute_loss_func=causal_ce).train()
    # the log of step 3 validates checkpoint-2; the tail (steps 4-5, sum ~8 <= 50) checkpoint-4
    assert guard.divergence is None and guard.weights_validated
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-4")


def test_a_tail_whose_mean_passes_but_whose_sum_does_not_validates_nothing(tmp_path):
    def thirty(outputs, labels, num_items_in_batch=None):  # a loss of 30 at every step, with the CE's gradient
        loss = causal_ce(outputs, labels)
        return loss - loss.detach() + 30.0

    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5, logging_steps=3, learning_rate=1e-3),
            train_dataset=TokenDataset(), callbacks=[guard], compute_loss_func=thirty).train()
    # the log of step 3 (3 x 30 > 50) and the tail of steps 4-5 (2 x 30 > 50) bound no step's loss under 50
    assert guard.divergence is None and guard.last_good_checkpoint is None


def test_a_kss_tail_is_judged_on_the_task_loss_not_the_objective(tmp_path, caplog):
    # train_loss is the objective: with alpha=500 the KSS term alone puts the tail's mean far above 50, while the task
    # loss (kss/task_loss, ~4 in the log of step 3) is not; KSSTrainer's kss/tail_term takes the term out
    guard = _guard()
    args = _args(tmp_path, KSSTrainingArguments, max_steps=5, logging_steps=3, learning_rate=1e-3,
                 label_smoothing_factor=0.1, kss_enabled=True, kss_alpha=500.0, kss_every_n_steps=1)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train().metrics
    assert metrics["train_loss"] > 50 and metrics["kss/tail_term"] > 50
    assert metrics["rksp/diverged"] == 0.0 and guard.divergence is None and guard.weights_validated
    assert "could not be judged" not in caplog.text
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-4")  # the tail (task loss ~4 a step) passed


def test_a_diverging_kss_tail_is_reported_diverged(tmp_path):
    # lr 1.0: the task loss passes 50 at step 4, after the last log (step 3); the KSS term adds under 1 a step
    guard = _guard()
    args = _args(tmp_path, KSSTrainingArguments, max_steps=5, logging_steps=3, label_smoothing_factor=0.1,
                 kss_enabled=True, kss_alpha=0.15, kss_every_n_steps=1)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[guard])
    metrics = trainer.train().metrics
    assert metrics["rksp/diverged"] == 1.0 and guard.divergence["first_checked_step"] == 4
    assert 0 <= metrics["kss/tail_term"] < 5 and guard.divergence["loss"] > 50
    assert not guard.weights_validated
    with pytest.raises(DivergedModelError):
        trainer.save_model(str(tmp_path / "final"))


class EditFinalLog(TrainerCallback):
    """Changes the final log of train() before the guard reads it (listed before the guard)."""

    def __init__(self, edit):
        self.edit = edit

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_runtime" in (logs or {}):
            self.edit(logs)


@pytest.mark.parametrize("edit", [lambda logs: logs.pop("train_loss"), lambda logs: logs.update(train_loss=0.0)],
                         ids=["absent", "inconsistent"])
def test_a_tail_that_train_loss_cannot_give_is_unjudged_and_not_validated(tmp_path, caplog, edit):
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5, logging_steps=3, learning_rate=1e-3),
                      train_dataset=TokenDataset(), callbacks=[EditFinalLog(edit), guard], compute_loss_func=causal_ce)
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train().metrics
    assert "the loss of steps 4-5, after the last training log, could not be judged" in caplog.text
    assert metrics["rksp/diverged"] == 0.0 and not guard.weights_validated
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")


@pytest.mark.parametrize("where", ["log", "tail"])
def test_under_ddp_the_cause_names_the_mean_over_processes(tmp_path, monkeypatch, where):
    import hf_koopman.training.safety_net as safety_net

    # one process through the DDP code paths: the all-reduces of hf_koopman.training.guard stay the identity
    monkeypatch.setattr(safety_net, "is_distributed", lambda: True)
    guard = _guard()
    steps = {} if where == "log" else dict(max_steps=5, logging_steps=3)  # a trip at the log of step 4, or after 3
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, label_smoothing_factor=0.1, **steps), train_dataset=TokenDataset(),
            callbacks=[guard]).train()
    cause = guard.divergence["causes"][0]
    if where == "log":
        assert "the Trainer's logged mean over processes;" in cause and "value and processes" not in cause
    else:
        assert "the mean over steps 4-5 and over processes after the last training log" in cause


# ---------------------------------------------------------------- 8. the two CPU copies of the logged-loss mode
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_two_copies_over_the_auto_budget_are_warned_about_and_the_candidate_is_freed(tmp_path, caplog, monkeypatch,
                                                                                     smoothing):
    import psutil

    model = tiny_gpt2()
    one_copy = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # one copy fits the "auto" budget (half of the free memory), two do not
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 3 * one_copy})())
    guard = _guard()  # rollback_source="auto"
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, learning_rate=1e-3,
                                              label_smoothing_factor=smoothing),
                      train_dataset=TokenDataset(), callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    warned = "keeps two CPU copies of the training state" in caplog.text
    assert warned == (smoothing > 0)
    if warned:
        assert "rollback_source='checkpoint'" in caplog.text and "GB in all" in caplog.text
    assert guard._candidate.nbytes() == 0 and guard._snapshot.empty  # both freed when train() ends


# ---------------------------------------------------------------- 9. the back-off of a resume of a resumed run
def test_resuming_a_resumed_runs_checkpoint_applies_the_back_off_once(tmp_path):
    data = TokenDataset()

    def run(resume=None, callbacks=()):
        guard, rates = _guard(on_divergence="rollback"), LearningRates()
        args = _args(tmp_path, learning_rate=1e-3, restore_callback_states_from_checkpoint=True)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[guard, rates, *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        return rates.lrs

    run(callbacks=[NaNAt(3), NaNAt(7)])  # rollbacks at steps 4 and 8
    # B resumes checkpoint-2, before both: x 0.25; its checkpoint-3 holds that back-off and both events
    assert run(str(tmp_path / "checkpoint-2")) == [0.25e-3] * 10
    assert run(str(tmp_path / "checkpoint-3")) == [0.25e-3] * 9


def test_save_model_warns_when_the_guard_could_not_judge_the_last_steps(tmp_path, caplog):
    guard = _guard()
    args = _args(tmp_path, KSSTrainingArguments, max_steps=5, logging_steps=3, learning_rate=1e-3,
                 label_smoothing_factor=0.1)
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
                         callbacks=[EditFinalLog(lambda logs: logs.pop("train_loss")), guard])
    trainer.train()
    assert guard.divergence is None and not guard.weights_validated
    with caplog.at_level(logging.WARNING):
        trainer.save_model(str(tmp_path / "final"))  # written: nothing diverged, but the last steps are unchecked
    assert "writing in-memory weights the divergence guard could not check" in caplog.text
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_a_rollback_judged_on_the_logged_loss_keeps_the_schedule_rate(tmp_path):
    """With a loss computed by a Trainer subclass, the guard judges the logged loss and rolls back after the
    scheduler stepped: the next step runs at the schedule's rate times the back-off, not at the rate the validated
    snapshot was taken at (a warmup makes the two differ)."""

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = causal_ce(outputs, labels)
            if (labels == 0).all(dim=1).any():  # one bad batch: loss > 50, gradient norm < 500
                loss = loss * 30
            return (loss, outputs) if return_outputs else loss

    data = TokenDataset(n=64)
    data.ids[data.ids == 0] = 1
    data.ids[4 * 4] = 0  # the first row of step 5's batch
    rates = LearningRates()
    args = _args(tmp_path, max_steps=8, learning_rate=8e-3, lr_scheduler_type="linear", warmup_steps=8,
                 save_strategy="no")
    trainer = OwnLoss(model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[_guard(on_divergence="rollback"),
                                                                                    rates])
    trainer.train()
    assert [h["rksp/rollbacks"] for h in trainer.state.log_history if "rksp/rollbacks" in h][-1] == 1.0
    scheduled = [8e-3 * step / 8 for step in range(8)]  # linear warmup: step s (1-based) runs at 8e-3 (s-1)/8
    assert rates.lrs[:5] == pytest.approx(scheduled[:5])
    assert rates.lrs[5:] == pytest.approx([0.5 * r for r in scheduled[5:]])  # the back-off on the schedule's rate
