"""The safety net after a stop: `load_best_model_at_end`, suspect checkpoints set aside (`suspect-checkpoint-N`) so
that `resume_from_checkpoint=True` and rotation skip them, what a resumed run counts and records, the messages when
nothing was validated, and the FSDP settings refused before anything is written.

Setting as in `test_safety_net.py`: learning rate 1.0, step 4 trips the rule (loss > 50), checkpoint-2 is the last
good checkpoint and checkpoint-3 is suspect. At learning rate 0.5 (the back-off) the run stays sane.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TokenDataset, cpu_training_args, tiny_gpt2
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_koopman.training import DivergedModelError, KSSTrainer, KSSTrainingArguments, RKSPCallback
from hf_koopman.training import callback as callback_module
from hf_koopman.training.guard import DivergenceEvent


def _args(tmp_path, cls=TrainingArguments, **kw):
    base = dict(max_steps=12, learning_rate=1.0, lr_scheduler_type="constant", save_strategy="steps", save_steps=1,
                train_sampling_strategy="sequential", per_device_train_batch_size=4)
    if cls is KSSTrainingArguments:
        base.update(kss_enabled=False)
    base.update(kw)
    return cpu_training_args(tmp_path, cls, **base)


def _guard(**kw):
    kw.setdefault("snapshot_every_n_steps", 1)
    kw.setdefault("profile_at_init", False)
    return RKSPCallback(**kw)


class StartStep(TrainerCallback):
    """The global step each train() call starts at."""

    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


# ---------------------------------------------------------------- 1. load_best_model_at_end after a stop
@pytest.mark.parametrize("restore_on_stop", [True, False])
def test_the_best_checkpoint_loaded_after_a_stop_is_what_save_model_writes(tmp_path, caplog, restore_on_stop):
    # eval loss rises with the training loss: the best checkpoint is an early, validated one
    guard = _guard(restore_on_stop=restore_on_stop)
    args = _args(tmp_path, KSSTrainingArguments, max_steps=8, eval_strategy="steps", eval_steps=1,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer = KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=128),
                         eval_dataset=TokenDataset(n=8, seed=1), callbacks=[guard])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert guard.divergence["step"] == 4 and Path(best).name in ("checkpoint-1", "checkpoint-2")
    step = int(best.rsplit("-", 1)[-1])
    assert guard.weights_validated  # the loaded checkpoint is a validated one
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["weights_validated"]
    with caplog.at_level(logging.WARNING):
        trainer.save_model(str(tmp_path / "final"))  # no DivergedModelError
    assert f"{best} (step {step}), a validated checkpoint that load_best_model_at_end loaded" in caplog.text
    assert "the guard restored" not in caplog.text
    final, loaded = load_file(str(tmp_path / "final" / "model.safetensors")), load_file(f"{best}/model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in loaded.items())


def test_a_best_checkpoint_that_is_not_validated_keeps_the_weights_unvalidated(tmp_path):
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    guard.divergence = {"step": 4}
    guard.events = [{"step": 4, "action": "stop", "suspect_checkpoints": [str(tmp_path / "suspect-checkpoint-3")]}]
    guard._note_best_loaded(str(tmp_path / "checkpoint-3"))  # later than the last good one: never validated
    assert not guard.weights_validated and "checkpoint-3 (step 3), which load_best_model_at_end loaded" in (
        guard._in_memory)
    guard._note_best_loaded(str(tmp_path / "checkpoint-1"))
    assert guard.weights_validated


# ---------------------------------------------------------------- 2. suspect checkpoints are set aside
def test_a_stop_sets_the_suspect_checkpoint_aside_so_a_resume_takes_the_last_good_one(tmp_path, caplog):
    data = TokenDataset(n=128)
    guard = _guard()
    with caplog.at_level(logging.WARNING):
        Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard]).train()
    suspect = str(tmp_path / "suspect-checkpoint-3")
    assert not (tmp_path / "checkpoint-3").exists() and (tmp_path / suspect / "model.safetensors").is_file()
    assert guard.divergence["suspect_checkpoints"] == guard.events[0]["suspect_checkpoints"] == [suspect]
    record = json.loads((tmp_path / "rksp_guard.json").read_text())
    assert record["events"][0]["suspect_checkpoints"] == [suspect]
    assert f"renamed to {suspect}" in caplog.text
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")

    # resume_from_checkpoint=True: the last good checkpoint, then through step 3 again at the backed-off rate; the
    # new checkpoint-3 does not collide with the suspect one, and is not reported as suspect
    caplog.clear()
    starts = StartStep()
    resumed = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5), train_dataset=data,
                      callbacks=[resumed, starts])
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert starts.steps == [2] and resumed.divergence is None and trainer.state.global_step == 5
    assert "recorded as suspect" not in caplog.text
    assert (tmp_path / "checkpoint-3").is_dir() and Path(suspect).is_dir()
    assert json.loads((tmp_path / "rksp_guard.json").read_text())["events"][0]["suspect_checkpoints"] == [suspect]

    caplog.clear()
    again = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4), train_dataset=data,
                    callbacks=[_guard(), StartStep()])
    with caplog.at_level(logging.ERROR):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # saved after the divergence: good
    assert "recorded as suspect" not in caplog.text


def test_rotation_never_deletes_a_suspect_checkpoint(tmp_path):
    guard = _guard(on_divergence="rollback")
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=8, save_total_limit=3),
            train_dataset=TokenDataset(n=128), callbacks=[guard]).train()
    suspects = [p for e in guard.events for p in e["suspect_checkpoints"]]
    assert suspects and all(Path(p).name.startswith("suspect-checkpoint-") and Path(p).is_dir() for p in suspects)
    assert len(list(tmp_path.glob("checkpoint-*"))) == 3


def _tripped_at_step_4(tmp_path):
    """A guard whose trip at step 4 is about to be logged: last good checkpoint-2, suspect checkpoint-3 on disk."""
    (tmp_path / "checkpoint-3").mkdir()
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    event = DivergenceEvent(step=4, causes=["loss"], cause_flags=1, loss=1e3, grad_norm=None, first_bad_layer=None,
                            last_good_checkpoint=guard.last_good_checkpoint,
                            suspect_checkpoints=[str(tmp_path / "checkpoint-3")])
    guard.events.append(event.to_dict())
    guard.divergence = event.to_dict()
    guard._to_log = event
    return guard


def test_a_taken_suspect_name_gets_a_suffix(tmp_path):
    guard = _tripped_at_step_4(tmp_path)
    (tmp_path / "suspect-checkpoint-3").mkdir()  # an earlier run's suspect checkpoint-3
    guard._log_event(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), None)
    assert (tmp_path / "suspect-checkpoint-3-2").is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert guard.events[0]["suspect_checkpoints"] == [str(tmp_path / "suspect-checkpoint-3-2")]
    assert callback_module._checkpoint_step(str(tmp_path / "suspect-checkpoint-3-2")) == 3


def test_other_processes_leave_the_renaming_to_the_main_one_and_take_its_names(tmp_path, monkeypatch):
    guard = _tripped_at_step_4(tmp_path)
    shared = []

    def main_process_names(values):  # the all-reduce: the main process renamed to suspect-checkpoint-3-2
        shared.append(values.tolist())
        return torch.full_like(values, 2.0)

    monkeypatch.setattr(callback_module, "is_distributed", lambda: True)
    monkeypatch.setattr(callback_module, "reduce_max", main_process_names)
    state = TrainerState(is_world_process_zero=False)
    guard._log_event(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert shared == [[0.0]]  # this process renamed nothing
    assert (tmp_path / "checkpoint-3").is_dir()  # the folder is the main process's to rename
    assert guard.divergence["suspect_checkpoints"] == [str(tmp_path / "suspect-checkpoint-3-2")]


# ---------------------------------------------------------------- 3. a resumed run counts its own rollbacks
def test_a_resumed_run_reports_only_its_own_rollbacks(tmp_path, caplog):
    data = TokenDataset(n=128)
    first = _guard(on_divergence="rollback")
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=data, callbacks=[first]).train()
    assert [e["step"] for e in first.events] == [4]
    caplog.clear()
    resumed = _guard(on_divergence="rollback")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=data, callbacks=[resumed])
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))  # step 6 again, no trip
    assert trainer.state.global_step == 6 and resumed.divergence is None
    assert [e["step"] for e in resumed.events] == [4]  # the record's event, not one of this call
    assert "rollback(s) in this" not in caplog.text


# ---------------------------------------------------------------- 4. the values that tripped on another process
def test_the_record_keeps_the_values_that_tripped_on_another_process(tmp_path, monkeypatch):
    calls = []

    def other_process_loss(values):  # the all-reduce: at the second step another process's loss is 120
        calls.append(values.numel())
        if values.numel() == 4 and calls.count(4) == 2:
            values[0] = torch.maximum(values[0], torch.tensor(120.0, dtype=values.dtype))
        return values

    monkeypatch.setattr(callback_module, "is_distributed", lambda: True)
    monkeypatch.setattr(callback_module, "reduce_max", other_process_loss)
    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, save_strategy="no", max_steps=4),
            train_dataset=TokenDataset(n=128), callbacks=[guard]).train()
    event = json.loads((tmp_path / "rksp_guard.json").read_text())["events"][0]
    assert event["step"] == 2 and event["loss"] < 50  # this process's own loss was sane
    assert event["loss_max_over_processes"] == 120.0 and event["grad_norm_max_over_processes"] < 500
    assert "on another process (step loss here: " in event["causes"][0] and "max over processes: 120.0" in (
        event["causes"][0])


# ---------------------------------------------------------------- 5. nothing validated
def test_a_trip_before_anything_was_validated_names_the_real_options(tmp_path, caplog):
    guard = _guard(on_divergence="rollback", loss_threshold=1.0)  # step 1 trips: nothing was validated yet
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, learning_rate=1e-3),
                         train_dataset=TokenDataset(n=128), callbacks=[guard])
    with caplog.at_level(logging.ERROR):
        trainer.train()
    assert guard.divergence["step"] == 1 and not guard.weights_validated
    assert "Training stops without a rollback: no step of this train() call had passed the rule" in caplog.text
    assert "after 0 rollback(s)" not in caplog.text
    with pytest.raises(DivergedModelError) as raised:
        trainer.save_model(str(tmp_path / "final"))
    message = str(raised.value)
    assert "resume from it" not in message and "none to resume from" in message
    assert "lower learning rate" in message and "allow_unvalidated=True" in message


def test_a_checkpoint_rollback_before_a_validated_checkpoint_says_there_was_none(tmp_path, caplog):
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    with caplog.at_level(logging.ERROR):
        Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=10, max_steps=5), train_dataset=TokenDataset(n=128),
                callbacks=[guard]).train()
    assert guard.divergence["step"] == 4
    assert "without a rollback: no checkpoint was validated before the divergence" in caplog.text
    assert "none to resume from" in caplog.text


# ---------------------------------------------------------------- 6. FSDP with rollback_source="checkpoint"
def test_checkpoint_rollback_under_fsdp_is_refused_before_anything_is_written(tmp_path):
    guard = RKSPCallback(rollback_source="checkpoint", num_samples=64, probe_batch_size=4)
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, learning_rate=1e-3),
                         train_dataset=TokenDataset(n=128), callbacks=[guard])
    # the Trainer runs FSDP (as enable_cpu_fsdp leaves a CPU run; the model itself stays unsharded here), and prepares
    # the model before on_train_begin
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="cannot restore sharded \\(FSDP\\) parameters"):
        guard.on_train_begin(trainer.args, TrainerState(), TrainerControl(), model=trainer.model,
                             train_dataloader=trainer.get_train_dataloader())
    assert not list(tmp_path.glob("rksp_*"))  # refused before the init profile wrote anything
    assert guard.profile is None


@pytest.mark.parametrize("source", ["checkpoint", "auto"])
def test_parameters_sharded_after_train_begin_follow_the_same_rule(monkeypatch, source):
    model = tiny_gpt2(n_layer=2)
    guard = RKSPCallback(rollback_source=source)
    guard._params, guard._params_first, guard._from_checkpoint = [], None, True
    monkeypatch.setattr(callback_module, "is_sharded", lambda params: True)
    monkeypatch.setattr(guard, "_is_check_step", lambda args, state: False)
    call = lambda: guard.on_pre_optimizer_step(SimpleNamespace(), TrainerState(), TrainerControl(), model=model)  # noqa: E731
    if source == "checkpoint":
        with pytest.raises(ValueError, match="cannot restore sharded"):
            call()
    else:  # "auto" promises memory under FSDP
        call()
        assert not guard._from_checkpoint


# ---------------------------------------------------------------- 7. FSDP version 1 on CPU
def test_an_fsdp1_launch_on_cpu_is_refused_before_accelerate_fails(tmp_path, monkeypatch):
    import transformers.trainer

    args = _args(tmp_path, KSSTrainingArguments)
    assert args.device.type == "cpu"  # set up the devices before the launch variables below exist
    # what `accelerate launch --config_file <fsdp_version: 1> --num_processes 2` exports on a CPU host
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SYNC_MODULE_STATES": "true",
                        "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(transformers.trainer, "Accelerator", lambda **kwargs: pytest.fail("Accelerator was built"))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        KSSTrainer(model=tiny_gpt2(n_layer=2), args=args, train_dataset=TokenDataset())
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2 goes on to the Accelerator
    with pytest.raises(pytest.fail.Exception, match="Accelerator was built"):
        KSSTrainer(model=tiny_gpt2(n_layer=2), args=args, train_dataset=TokenDataset())
