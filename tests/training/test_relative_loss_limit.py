"""`relative_loss_threshold`: a loss limit on the scale of the run's own start.

Setting: the safety-net tests' tiny GPT-2 (batches in order, a checkpoint every step) with the learning rate warmed
up to 1.0 over 6 steps. Its step losses run 4.04, 4.04, 4.26, 6.47, 7.29, 6.84, 16.1, 27.0, 18.5, 17.4, 30.1, 35.9:
never above 50, so the paper's rule keeps every state as good and the run ends at 9x its first loss. With
`relative_loss_threshold=3` the limit is 3 x 4.04 = 12.1 and step 7 trips: checkpoint-5 is the last good one.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TokenDataset, info_logs, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, Trainer

from hf_koopman.training import RKSPCallback
from hf_koopman.training.divergence import DivergenceRule
from hf_koopman.training.safety_net import RECORD_NAME

WARMUP = dict(lr_scheduler_type="constant_with_warmup", warmup_steps=6)
FIRST_LOSS = 4.03625


def _run(out, guard, resume=None, **kw):
    trainer = Trainer(model=tiny_gpt2(), args=_args(out, **{**WARMUP, **kw}), train_dataset=TokenDataset(n=128),
                      callbacks=[guard])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_a_run_several_times_worse_than_its_start_trips_only_with_the_relative_limit(tmp_path, caplog):
    plain = _guard()
    _run(tmp_path / "plain", plain)
    assert plain.divergence is None  # loss > 50 never trips: the state at 9x the first loss is "good"
    assert plain.last_good_checkpoint == str(tmp_path / "plain" / "checkpoint-11")

    guard = _guard(relative_loss_threshold=3.0)
    with caplog.at_level(logging.WARNING):
        trainer = _run(tmp_path / "relative", guard)
    assert guard.reference_loss == pytest.approx(FIRST_LOSS, rel=1e-4)
    assert guard.loss_limit == pytest.approx(3 * FIRST_LOSS, rel=1e-4)
    event = guard.divergence
    assert event["step"] == 7 and event["action"] == "stop"
    assert event["causes"][0].startswith("loss > 12.1")
    assert guard.last_good_checkpoint == str(tmp_path / "relative" / "checkpoint-5")
    assert event["suspect_checkpoints"] == [str(tmp_path / "relative" / "_suspect-checkpoint-6")]
    # the in-memory model is back at the validated state of step 5 (= checkpoint-5)
    saved = load_file(str(tmp_path / "relative" / "checkpoint-5" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in saved.items())
    # the message says which limit was crossed and how to raise it
    assert "relative_loss_threshold (3) x this run's first checked loss (4.03625)" in caplog.text
    record = json.loads((tmp_path / "relative" / RECORD_NAME).read_text())
    assert record["rule"]["relative_loss_threshold"] == 3.0
    assert record["rule"]["reference_loss"] == pytest.approx(FIRST_LOSS, rel=1e-4)
    assert record["rule"]["loss_limit"] == pytest.approx(3 * FIRST_LOSS, rel=1e-4)


def test_a_rise_below_the_limit_does_not_trip(tmp_path):
    # constant lr 0.3: the loss climbs to 8.6 (2.1x its start) and comes back to 4.6
    guard = _guard(relative_loss_threshold=3.0)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=0.3, save_strategy="no"),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    trainer.train()
    assert guard.divergence is None and trainer.state.global_step == 12
    assert guard.reference_loss == pytest.approx(FIRST_LOSS, rel=1e-4)


def test_a_resumed_run_keeps_the_first_loss_of_the_run_not_the_resumed_models(tmp_path):
    # the first run stops at step 5 without a trip; the resumed one (callback states not restored) reads the reference
    # from the checkpoint's stored guard state, so step 7 trips as in the uninterrupted run. Taking the resumed
    # model's first loss (6.84 at step 6) would move the limit to 20.5 and the trip to step 8.
    first = _guard(relative_loss_threshold=3.0)
    _run(tmp_path, first, max_steps=5)
    assert first.divergence is None
    again = _guard(relative_loss_threshold=3.0)
    _run(tmp_path, again, resume=str(tmp_path / "checkpoint-5"))
    assert again.reference_loss == pytest.approx(FIRST_LOSS, rel=1e-4)
    assert again.divergence["step"] == 7
    assert again.last_good_checkpoint == str(tmp_path / "checkpoint-5")


def test_a_checkpoint_without_a_reference_takes_the_resumed_runs_first_loss_and_says_so(tmp_path, caplog):
    _run(tmp_path, _guard(), max_steps=5)  # saved by a run without the relative limit
    again = _guard(relative_loss_threshold=3.0)
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, again, resume=str(tmp_path / "checkpoint-5"))
    assert again.reference_loss == pytest.approx(6.84, abs=0.01)  # step 6's loss: the first this run checked
    assert again.divergence["step"] == 8
    assert "holds no reference loss (it was saved without relative_loss_threshold, or before the run's first check)" \
        in caplog.text


def test_a_new_run_on_the_same_callback_takes_its_own_first_loss(tmp_path):
    guard = _guard(relative_loss_threshold=3.0)
    _run(tmp_path / "a", guard, max_steps=2, save_strategy="no")
    guard.reference_loss = 100.0  # as if an earlier run had started far higher
    _run(tmp_path / "b", guard, max_steps=2, save_strategy="no")
    assert guard.reference_loss == pytest.approx(FIRST_LOSS, rel=1e-4)


class ShiftedLoss(GPT2LMHeadModel):
    """A GPT-2 whose loss is shifted down by `shift`: below 0 from the start (a negative log-likelihood of a density
    can be), or, by 4.5, just below 0 at the start (4.04 - 4.5) and above it as the warm-up run degrades."""

    shift = 0.0

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if out.loss is not None:
            out.loss = out.loss - self.shift
        return out


def _shifted(shift: float) -> ShiftedLoss:
    model = ShiftedLoss(tiny_gpt2().config)
    model.shift = shift
    return model


def test_a_non_positive_first_loss_turns_the_relative_limit_off_with_a_warning(tmp_path, caplog):
    model = _shifted(100.0)
    guard = _guard(relative_loss_threshold=3.0)
    trainer = Trainer(model=model, args=_args(tmp_path, learning_rate=0.05, save_strategy="no", max_steps=4),
                      train_dataset=TokenDataset(n=128), callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert guard.reference_loss is None and guard.loss_limit == 50.0
    assert guard.divergence is None and trainer.state.global_step == 4
    assert "needs a positive first loss" in caplog.text and "the relative limit is off for this run" in caplog.text


def test_with_label_smoothing_the_first_logged_loss_is_the_reference(tmp_path):
    # the model returns no loss: the guard judges the logged loss, and the first one sets the limit
    guard = _guard(relative_loss_threshold=3.0)
    trainer = _run(tmp_path, guard, label_smoothing_factor=0.1, logging_steps=1)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert guard.reference_loss == pytest.approx(logged[0], rel=1e-4)
    assert guard.divergence is not None
    assert guard.divergence["step"] == next(i + 1 for i, v in enumerate(logged) if v > 3 * logged[0])
    assert guard.divergence["causes"][0].startswith("logged loss > 12.1")  # the limit, not loss_threshold


def test_the_setting_and_the_reference_survive_the_callback_state():
    guard = RKSPCallback(relative_loss_threshold=2.5)
    guard.reference_loss = 4.0
    saved = guard.state()
    assert saved["args"]["relative_loss_threshold"] == 2.5 and saved["attributes"]["reference_loss"] == 4.0
    restored = RKSPCallback(**saved["args"])
    for name, value in saved["attributes"].items():
        setattr(restored, name, value)
    assert restored.loss_limit == 10.0 and restored.loss_threshold == 50.0


@pytest.mark.parametrize("value", [1.0, 0.5, float("inf"), float("nan")])
def test_a_factor_that_is_no_limit_is_refused(value):
    with pytest.raises(ValueError, match="relative_loss_threshold must be a finite number > 1"):
        RKSPCallback(relative_loss_threshold=value)


@pytest.mark.parametrize("value", ["3", True])
def test_a_factor_of_the_wrong_type_is_refused(value):
    with pytest.raises(TypeError, match="relative_loss_threshold must be None"):
        RKSPCallback(relative_loss_threshold=value)


def test_the_rule_takes_the_lower_limit_and_says_so():
    rule = DivergenceRule(relative_loss_threshold=3.0)
    assert rule.loss_limit == 50.0 and not rule.limited_by_relative
    assert "3 x the run's first checked loss, once checked" in rule.describe()
    low, high = rule.with_reference(4.0), rule.with_reference(20.0)
    assert low.loss_limit == 12.0 and low.limited_by_relative and low.loss_diverged(12.5) and not low.loss_diverged(12)
    assert high.loss_limit == 50.0 and not high.limited_by_relative and not high.loss_diverged(55.0 - 6)
    assert "loss > 12 (the lower of 50 and 3 x the first checked loss 4)" in low.describe()


def test_logged_losses_validate_the_first_window_by_loss_threshold_and_warn_when_the_limit_validates_nothing(
        tmp_path, caplog):
    # label smoothing: the guard judges the Trainer's logged mean of 4 steps. The first log (steps 1-4, mean ~4.05)
    # sets the limit 12.1 and is validated by 4 x mean <= 50; later logs would need 4 x mean <= 12.1, i.e. a mean
    # below 3.04, which this healthy run never reaches: checkpoint-2 stays the last good one, and a warning says why
    guard = _guard(relative_loss_threshold=3.0)
    with caplog.at_level(logging.WARNING):
        trainer = _run(tmp_path, guard, learning_rate=0.01, lr_scheduler_type="constant", warmup_steps=0,
                       label_smoothing_factor=0.1, logging_steps=4, save_steps=2)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert guard.divergence is None and guard.reference_loss == pytest.approx(logged[0], rel=1e-4)
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")
    assert "a logged mean of 4 steps validates them only when 4 x mean <= 12.1" in caplog.text
    assert "Set logging_steps=1 to validate every step" in caplog.text


def test_a_loss_above_both_limits_names_both_settings(tmp_path, caplog):
    from conftest import bad_batch_at

    model, data = bad_batch_at(4)
    guard = _guard(relative_loss_threshold=3.0, grad_norm_threshold=1e9)
    trainer = Trainer(model=model, args=_args(tmp_path, learning_rate=0.01, save_strategy="no"), train_dataset=data,
                      callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert guard.divergence["step"] == 4 and guard.divergence["loss"] > 50
    assert "raise loss_threshold (now 50) and relative_loss_threshold (now 3) in RKSPCallback" in caplog.text


def test_a_windowed_check_says_which_steps_its_reference_covers(tmp_path, caplog):
    guard = _guard(relative_loss_threshold=3.0, check_every_n_steps=4)
    with info_logs(caplog):
        _run(tmp_path, guard, save_strategy="no")
    assert guard.reference_loss == pytest.approx(6.47, abs=0.01)  # the largest of steps 1-4
    assert "(the largest over steps 1-4)" in caplog.text


def test_a_limit_turned_off_stays_off_when_the_run_resumes(tmp_path):
    first = _guard(relative_loss_threshold=3.0)
    trainer = Trainer(model=_shifted(4.5), args=_args(tmp_path, **WARMUP, max_steps=5),
                      train_dataset=TokenDataset(n=128), callbacks=[first])
    trainer.train()
    assert first.relative_limit_off and first.reference_loss is None
    again = _guard(relative_loss_threshold=3.0)
    trainer = Trainer(model=_shifted(4.5), args=_args(tmp_path, **WARMUP),
                      train_dataset=TokenDataset(n=128), callbacks=[again])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    # the resumed model's first loss (2.3 at step 6) would set a limit of 7 that step 7 (11.6) crosses
    assert again.relative_limit_off and again.reference_loss is None
    assert again.divergence is None and trainer.state.global_step == 12
    # a fresh run on the same callback judges its own first loss again
    _run(tmp_path / "fresh", again, max_steps=2, save_strategy="no")
    assert not again.relative_limit_off and again.reference_loss == pytest.approx(FIRST_LOSS, rel=1e-4)


def test_a_callback_reused_to_resume_another_run_takes_that_runs_reference(tmp_path):
    other = _guard(relative_loss_threshold=3.0)
    _run(tmp_path / "b", other, max_steps=5)
    other_reference = other.reference_loss
    reused = _guard(relative_loss_threshold=3.0)
    reused.reference_loss = 100.0  # left by an earlier run of this callback
    _run(tmp_path / "b", reused, resume=str(tmp_path / "b" / "checkpoint-5"))
    assert reused.reference_loss == other_reference and reused.divergence["step"] == 7


def test_the_steps_after_the_last_log_are_validated_against_the_limit_in_force(tmp_path):
    # logged losses of 4 steps; steps 5-7 come after the last log and are judged from train_loss at the end: their
    # sum (~12.2) passes loss_threshold (50) but not the limit 2.5 x 4.05 = 10.1, so checkpoints 4-6 stay pending
    guard = _guard(relative_loss_threshold=2.5)
    _run(tmp_path, guard, learning_rate=0.01, lr_scheduler_type="constant", warmup_steps=0,
         label_smoothing_factor=0.1, logging_steps=4, max_steps=7)
    assert guard.divergence is None and guard.loss_limit == pytest.approx(2.5 * guard.reference_loss)
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-3")
