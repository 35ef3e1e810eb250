"""The safety net after a stop: `load_best_model_at_end`, suspect checkpoints set aside (`_suspect-checkpoint-N`) so
that `resume_from_checkpoint=True`, rotation and Hub uploads skip them (on every saving process), the checkpoint a
resumed run started from, what a resumed run counts and records, the messages when nothing was validated, and the
FSDP settings refused before anything is written.

Setting as in `test_safety_net.py`: learning rate 1.0, step 4 trips the rule (loss > 50), checkpoint-2 is the last
good checkpoint and checkpoint-3 is suspect. At learning rate 0.5 (the back-off) the run stays sane.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.trainer
from conftest import TokenDataset, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from hf_koopman.training import DivergedModelError, KSSTrainer, KSSTrainingArguments, RKSPCallback
from hf_koopman.training import safety_net
from hf_koopman.training.guard import DivergenceEvent


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
    guard.events = [{"step": 4, "action": "stop", "suspect_checkpoints": [str(tmp_path / "_suspect-checkpoint-3")]}]
    guard._note_best_loaded(str(tmp_path / "checkpoint-3"))  # later than the last good one: never validated
    assert not guard.weights_validated and "checkpoint-3 (step 3), which load_best_model_at_end loaded" in (
        guard._in_memory)
    guard._note_best_loaded(str(tmp_path / "checkpoint-1"))
    assert guard.weights_validated


# ---------------------------------------------------------------- 2. suspect checkpoints are set aside
class _Hub:
    """Stands in for `huggingface_hub.HfApi` (no network): records the folder uploads the Trainer asks for."""

    def __init__(self):
        self.uploads = []

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        done = Future()
        done.set_result(None)
        return done


def _uploaded(trainer, monkeypatch):
    """The files (relative to `output_dir`) that transformers' own Hub pushes would upload from `output_dir`: the
    end-of-training `Trainer.push_to_hub` and the push after each save (`_push_from_checkpoint`), filtered as
    huggingface_hub filters them, with the ignore patterns the Trainer passes."""
    hub = _Hub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    monkeypatch.setattr(trainer, "create_model_card", lambda **kwargs: None)
    trainer.hub_model_id, trainer.push_in_progress = "user/model", None  # as init_hf_repo leaves them
    out = Path(trainer.args.output_dir)
    trainer._push_from_checkpoint(str(out / "checkpoint-2"))
    trainer.push_to_hub()
    roots = [u for u in hub.uploads if Path(u["folder_path"]) == out]
    assert len(roots) == 2 and all(u["ignore_patterns"] for u in roots)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    return {f for u in roots for f in filter_repo_objects(files, ignore_patterns=u["ignore_patterns"])}


def test_a_stop_sets_the_suspect_checkpoint_aside_so_a_resume_takes_the_last_good_one(tmp_path, caplog, monkeypatch):
    data = TokenDataset(n=128)
    guard = _guard()
    first = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard])
    with caplog.at_level(logging.WARNING):
        first.train()
    suspect = str(tmp_path / "_suspect-checkpoint-3")
    assert not (tmp_path / "checkpoint-3").exists() and (tmp_path / suspect / "model.safetensors").is_file()
    assert guard.divergence["suspect_checkpoints"] == guard.events[0]["suspect_checkpoints"] == [suspect]
    record = json.loads((tmp_path / "rksp_guard.json").read_text())
    assert record["events"][0]["suspect_checkpoints"] == [suspect]
    # the rename warning names the explicit resume (resume_from_checkpoint=True is that one only without later ones)
    good = str(tmp_path / "checkpoint-2")
    assert f"renamed to {suspect}" in caplog.text and f"trainer.train(resume_from_checkpoint={good!r})" in caplog.text
    # transformers' newest-checkpoint lookup, save_total_limit rotation and Hub uploads all skip the suspect folder
    assert get_last_checkpoint(str(tmp_path)) == good
    assert sort_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-1"), good]
    uploaded = _uploaded(first, monkeypatch)
    assert "model.safetensors" in uploaded and (tmp_path / suspect / "optimizer.pt").is_file()
    assert not [f for f in uploaded if "checkpoint" in f]

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
    assert suspects and all(Path(p).name.startswith("_suspect-checkpoint-") and Path(p).is_dir() for p in suspects)
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
    (tmp_path / "_suspect-checkpoint-3").mkdir()  # an earlier run's suspect checkpoint-3
    guard._log_event(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), None)
    assert (tmp_path / "_suspect-checkpoint-3-2").is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert guard.events[0]["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-3-2")]
    assert safety_net._checkpoint_step(str(tmp_path / "_suspect-checkpoint-3-2")) == 3


def test_processes_that_do_not_save_leave_the_renaming_to_those_that_do_and_take_their_names(tmp_path, monkeypatch):
    guard = _tripped_at_step_4(tmp_path)
    shared = []

    def saving_process_names(values):  # the all-reduce: the saving process renamed to _suspect-checkpoint-3-2
        shared.append(values.tolist())
        return torch.full_like(values, 2.0)

    monkeypatch.setattr(safety_net, "is_distributed", lambda: True)
    monkeypatch.setattr(safety_net, "reduce_max", saving_process_names)
    state = TrainerState(is_world_process_zero=False)
    guard._log_event(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, None)
    assert shared == [[0.0]]  # this process renamed nothing
    assert (tmp_path / "checkpoint-3").is_dir()  # the folder is the saving process's to rename
    assert guard.divergence["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-3-2")]


def test_each_node_that_saved_renames_its_copy_and_one_renamed_by_another_node_counts(tmp_path, monkeypatch, caplog):
    # save_on_each_node=True: each node's main process wrote checkpoint-3 and renames it (args.should_save), though
    # only one of them is the world main process
    monkeypatch.setattr(safety_net, "is_distributed", lambda: True)
    monkeypatch.setattr(safety_net, "reduce_max", lambda values: values)
    guard = _tripped_at_step_4(tmp_path)
    guard._log_event(SimpleNamespace(output_dir=str(tmp_path), should_save=True),
                     TrainerState(is_world_process_zero=False), None)
    assert (tmp_path / "_suspect-checkpoint-3").is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert guard.divergence["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-3")]

    # on a shared filesystem another node's main process renames the folder between this one's look and its rename
    other = tmp_path / "shared"
    other.mkdir()
    guard = _tripped_at_step_4(other)
    real_rename = Path.rename

    def other_node_first(source, target):
        real_rename(source, source.with_name("_suspect-checkpoint-3"))
        raise FileNotFoundError(2, "No such file or directory", str(source))

    monkeypatch.setattr(Path, "rename", other_node_first)
    monkeypatch.setattr(safety_net, "reduce_max", lambda values: torch.maximum(values, torch.ones_like(values)))
    with caplog.at_level(logging.WARNING):
        guard._log_event(SimpleNamespace(output_dir=str(other), should_save=True), TrainerState(), None)
    assert "could not rename" not in caplog.text
    assert guard.divergence["suspect_checkpoints"] == [str(other / "_suspect-checkpoint-3")]


def test_a_failed_rename_says_resume_true_takes_that_checkpoint_and_names_the_last_good_one(tmp_path, monkeypatch,
                                                                                            caplog):
    guard = _tripped_at_step_4(tmp_path)
    (tmp_path / "checkpoint-2").mkdir()

    def refused(source, target):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(Path, "rename", refused)
    with caplog.at_level(logging.WARNING):
        guard._log_event(SimpleNamespace(output_dir=str(tmp_path), should_save=True), TrainerState(), None)
    good = str(tmp_path / "checkpoint-2")
    assert "it keeps its name, so resume_from_checkpoint=True resumes from it" in caplog.text
    assert f"trainer.train(resume_from_checkpoint={good!r})" in caplog.text
    assert guard.divergence["suspect_checkpoints"] == [str(tmp_path / "checkpoint-3")]  # the path it still has


def test_the_rename_warning_says_when_resume_true_would_take_a_later_checkpoint(tmp_path, caplog):
    guard = _tripped_at_step_4(tmp_path)
    for name in ("checkpoint-2", "checkpoint-10"):  # checkpoint-10: an earlier run's, in the same output_dir
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING):
        guard._log_event(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), None)
    good = str(tmp_path / "checkpoint-2")
    assert f"trainer.train(resume_from_checkpoint={good!r}) (not resume_from_checkpoint=True: it would take " \
           f"{tmp_path / 'checkpoint-10'}" in caplog.text


# ---------------------------------------------------------------- 2b. the checkpoint a run resumed from
class Preempted(Exception):
    """The process ends here (a preemption): no later hook of the run runs."""


class PreemptAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Preempted


@pytest.mark.parametrize("logging_steps", [1, 100])  # 100: no log entries before the resume (folder unconfirmed)
def test_the_checkpoint_a_run_resumed_from_is_set_aside_when_its_first_step_trips(tmp_path, caplog, logging_steps):
    data = TokenDataset(n=128)
    # preempted right after saving checkpoint-3: no event, so no record; checkpoint-3's stored guard state names
    # checkpoint-2 as the last good one
    with pytest.raises(Preempted):
        Trainer(model=tiny_gpt2(), args=_args(tmp_path, logging_steps=logging_steps), train_dataset=data,
                callbacks=[_guard(), PreemptAfterSave(3)]).train()
    assert (tmp_path / "checkpoint-3").is_dir() and not (tmp_path / "rksp_guard.json").exists()
    resumed = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, logging_steps=logging_steps), train_dataset=data,
                      callbacks=[resumed])
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)  # checkpoint-3: step 4 trips on its weights
    good, suspect = str(tmp_path / "checkpoint-2"), str(tmp_path / "_suspect-checkpoint-3")
    assert resumed.divergence["step"] == 4 and resumed.divergence["suspect_checkpoints"] == [suspect]
    assert Path(suspect).is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert resumed.last_good_checkpoint == resumed.divergence["last_good_checkpoint"] == good
    assert "no checkpoint was validated" not in caplog.text and f"resume_from_checkpoint={good!r}" in caplog.text
    # no in-memory copy existed yet: the stop put the last good checkpoint's state back in memory (restore_on_stop)
    assert resumed.weights_validated and resumed.divergence["restored_step"] == 2
    saved = load_file(f"{good}/model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in saved.items())

    # the next resume_from_checkpoint=True takes the last good checkpoint, backs off, and does not trip again
    starts = StartStep()
    again = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5), train_dataset=data,
            callbacks=[again, starts]).train(resume_from_checkpoint=True)
    assert starts.steps == [2] and again.divergence is None and again.lr_scale == 0.5


def test_the_checkpoint_a_run_resumed_from_becomes_the_last_good_one_when_its_first_step_passes(tmp_path):
    data = TokenDataset(n=128)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=2, learning_rate=1e-3), train_dataset=data,
            callbacks=[_guard()]).train()
    resumed = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=3, learning_rate=1e-3), train_dataset=data,
            callbacks=[resumed]).train(resume_from_checkpoint=True)
    assert resumed.last_good_checkpoint == str(tmp_path / "checkpoint-2")  # step 3 validated it


def test_only_the_folder_holding_the_resumed_state_is_held_as_the_resumed_checkpoint(tmp_path):
    history = [{"loss": 4.0, "step": 1}, {"loss": 5.0, "step": 2}]
    (tmp_path / "checkpoint-2").mkdir()
    saved = {"global_step": 2, "log_history": history}
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(saved))
    args = SimpleNamespace(output_dir=str(tmp_path))

    def held(state, recorded_suspect=False):
        guard = RKSPCallback()
        guard._hold_resumed_checkpoint(args, state, recorded_suspect)
        return [path for _, path in guard._pending_checkpoints]

    assert held(TrainerState(global_step=2, log_history=list(history))) == [str(tmp_path / "checkpoint-2")]
    # resumed from a copy in another folder, or from another save of step 2: another history
    assert held(TrainerState(global_step=2, log_history=[{"loss": 4.5, "step": 1}, {"loss": 5.0, "step": 2}])) == []
    assert held(TrainerState(global_step=2, log_history=list(history)), recorded_suspect=True) == []
    assert held(TrainerState(global_step=3, log_history=list(history))) == []  # no checkpoint-3 here


def test_a_resume_merges_each_recorded_event_once_per_occurrence_with_its_current_paths(tmp_path):
    # a rollback at step 4 renamed checkpoint-3; a run resumed from checkpoint-2 rolled back at step 4 again: the
    # record holds both events. The checkpoint resumed from holds the first, with the path it had before the rename.
    first = {"step": 4, "action": "rollback", "suspect_checkpoints": [str(tmp_path / "_suspect-checkpoint-3")]}
    second = {"step": 4, "action": "rollback", "suspect_checkpoints": [str(tmp_path / "_suspect-checkpoint-3-2")]}
    (tmp_path / "rksp_guard.json").write_text(json.dumps({"events": [first, second], "last_good_checkpoint": None}))
    guard = _guard(on_divergence="rollback")
    guard.events = [{**first, "suspect_checkpoints": [str(tmp_path / "checkpoint-3")]}]  # restored callback state
    guard._resume_backoff(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(global_step=6), None, None)
    assert guard.events == [first, second]


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


def test_a_resumed_run_has_a_rollback_budget_of_its_own(tmp_path, caplog):
    """A run that stopped once its `max_rollbacks` were spent is resumed from its last good checkpoint, as the stop
    message says: the resumed call rolls back again (its own budget), and logs its own count."""
    from conftest import bad_batch_at

    model, data = bad_batch_at(4)
    data.ids[(7 - 1) * 4] = 0  # a second bad batch at step 7
    args = _args(tmp_path, max_steps=10, learning_rate=1e-3)
    first = _guard(on_divergence="rollback", max_rollbacks=1)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[first]).train()
    assert [(e["step"], e["action"]) for e in first.events] == [(4, "rollback"), (7, "stop")]
    good = first.last_good_checkpoint
    assert good is not None
    model, _ = bad_batch_at(None)
    resumed = _guard(on_divergence="rollback", max_rollbacks=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[resumed])
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=good)  # step 7's batch trips again
    assert (7, "rollback") in [(e["step"], e["action"]) for e in resumed.events]
    assert resumed.divergence is None and trainer.state.global_step == 10
    # the history the checkpoint holds (the first run's rollback at step 4) comes first
    logged = [h["rksp/rollbacks"] for h in trainer.state.log_history if h.get("rksp/rollback_step", 0) >= 7]
    assert logged == [1]
    assert "1 rollback(s) in this train() call, 2 in the run record" in caplog.text


# ---------------------------------------------------------------- 4. the values that tripped on another process
def test_the_record_keeps_the_values_that_tripped_on_another_process(tmp_path, monkeypatch):
    calls = []

    def other_process_loss(values):  # the all-reduce: at the second step another process's loss is 120
        calls.append(values.numel())
        if values.numel() == 4 and calls.count(4) == 2:
            values[0] = torch.maximum(values[0], torch.tensor(120.0, dtype=values.dtype))
        return values

    monkeypatch.setattr(safety_net, "is_distributed", lambda: True)
    monkeypatch.setattr(safety_net, "reduce_max", other_process_loss)
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


def test_checkpoint_rollback_under_fsdp1_or_a_requested_fsdp_is_refused_before_anything_is_written(tmp_path,
                                                                                                    monkeypatch):
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fsdp1Unit(FullyShardedDataParallel):  # an FSDP1 unit as auto-wrapping leaves one (no process group here)
        def __init__(self):
            torch.nn.Module.__init__(self)

    model = tiny_gpt2(n_layer=2)  # a plain Trainer, not bound to the guard: only the model tells
    model.transformer.add_module("fsdp_unit", Fsdp1Unit())
    args = _args(tmp_path)
    begin = lambda guard, model: guard.on_train_begin(args, TrainerState(), TrainerControl(), model=model)  # noqa: E731
    with pytest.raises(ValueError, match="cannot restore sharded \\(FSDP\\) parameters"):
        begin(RKSPCallback(rollback_source="checkpoint"), model)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an FSDP launch config; the model itself stays unwrapped here
    with pytest.raises(ValueError, match="cannot restore sharded \\(FSDP\\) parameters"):
        begin(RKSPCallback(rollback_source="checkpoint"), tiny_gpt2(n_layer=2))
    assert not list(tmp_path.glob("rksp_*"))


@pytest.mark.parametrize("source", ["checkpoint", "auto"])
def test_parameters_sharded_after_train_begin_follow_the_same_rule(monkeypatch, source):
    model = tiny_gpt2(n_layer=2)
    guard = RKSPCallback(rollback_source=source)
    guard._params, guard._params_first, guard._from_checkpoint = [], None, True
    monkeypatch.setattr(safety_net, "is_sharded", lambda params: True)
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


# ---------------------------------------------------------------- third review
def test_save_model_allowed_unvalidated_also_pushes_when_args_push(tmp_path, monkeypatch):
    """With `args.push_to_hub`, `Trainer.save_model` calls `push_to_hub` itself: the flag given to save_model
    covers that push, and the push is not refused after the weights were written."""
    guard = _guard(restore_on_stop=False)
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, max_steps=8),
                         train_dataset=TokenDataset(n=128), callbacks=[guard])
    trainer.train()
    assert guard.divergence is not None and not guard.weights_validated
    pushes = []
    monkeypatch.setattr(Trainer, "push_to_hub", lambda self, *a, **k: pushes.append(k))
    trainer.args.push_to_hub = True
    trainer.save_model(str(tmp_path / "final"), allow_unvalidated=True)
    assert (tmp_path / "final" / "model.safetensors").exists() and len(pushes) == 1
    with pytest.raises(DivergedModelError, match="refusing to push"):
        trainer.push_to_hub()  # on its own, still refused
    assert len(pushes) == 1

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model(str(tmp_path / "again"), allow_unvalidated=True)
    with pytest.raises(DivergedModelError, match="refusing to push"):
        trainer.push_to_hub()  # a failed save_model leaves no permission behind
    assert len(pushes) == 1


@pytest.mark.parametrize(("push", "strategy", "expected"), [
    (False, "every_save", None), (True, "end", None), (True, "every_save", "Hub repository's root may"),
    (True, "checkpoint", "root and last-checkpoint may"), (True, "all_checkpoints", "Hub's copy of its checkpoint folder keeps them"),
])
def test_the_rename_warning_names_only_the_copies_the_pushes_made(tmp_path, push, strategy, expected):
    args = TrainingArguments(str(tmp_path), push_to_hub=push, hub_strategy=strategy, report_to="none")
    clause = safety_net._pushed_copies(args)
    assert (clause == "") if expected is None else (expected in clause)


def test_a_resume_without_log_entries_cannot_name_its_folder(tmp_path):
    """An empty log history matches every folder at the step: such a folder is held, so that a trip sets it aside,
    but a passing check never makes it the last good checkpoint (it may hold another run's diverged weights)."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    state = TrainerState(global_step=3, log_history=[])
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    assert RKSPCallback._resumed_from(str(folder), state) == "unsure"
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    guard._hold_resumed_checkpoint(SimpleNamespace(output_dir=str(tmp_path)), state, recorded_suspect=False)
    assert guard._pending_checkpoints == [(3, str(folder))]  # a trip would set it aside
    guard._promote(str(folder))  # a passing check
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")
    history = [{"loss": 4.0, "step": 1}]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": history}))
    assert RKSPCallback._resumed_from(str(folder), TrainerState(global_step=3, log_history=list(history)))
    assert not RKSPCallback._resumed_from(str(folder), TrainerState(global_step=3, log_history=[{"loss": 9.0}]))


def _resumed_folder(tmp_path, step, history):
    folder = tmp_path / f"checkpoint-{step}"
    folder.mkdir(exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    return folder


def test_a_resume_from_the_last_good_checkpoint_holds_nothing(tmp_path):
    """The last good checkpoint is the rollback source: a trip right after resuming from it must not set it aside."""
    history = [{"loss": 4.0, "step": 1}]
    folder = _resumed_folder(tmp_path, 3, history)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(global_step=3, log_history=list(history))
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(folder)
    guard._hold_resumed_checkpoint(args, state, recorded_suspect=False)
    assert guard._pending_checkpoints == []
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    guard._hold_resumed_checkpoint(args, state, recorded_suspect=False)
    assert guard._pending_checkpoints == [(3, str(folder))]


def test_a_last_good_checkpoint_later_than_the_resumed_step_is_dropped(tmp_path):
    """This callback's earlier train() call went further (last good checkpoint-9); the run resumed at step 3 is not on
    that path, so its last good checkpoint is the latest one up to step 3 the resumed state names, or none."""
    history = [{"loss": 4.0, "step": 1}]
    _resumed_folder(tmp_path, 3, history)
    args = SimpleNamespace(output_dir=str(tmp_path))
    guard = RKSPCallback()
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-9")
    guard._resume_backoff(args, TrainerState(global_step=3, log_history=list(history)), None, None)
    assert guard.last_good_checkpoint is None
    guard.last_good_checkpoint = str(tmp_path / "checkpoint-2")
    guard._resume_backoff(args, TrainerState(global_step=3, log_history=list(history)), None, None)
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")


def test_a_stop_without_suspects_says_when_resume_true_would_take_another_runs_checkpoint(tmp_path, caplog):
    guard = _tripped_at_step_4(tmp_path)
    (tmp_path / "checkpoint-3").rmdir()  # nothing to set aside: the rename warning, which says it too, is not given
    guard._to_log.suspect_checkpoints = []
    guard._to_log.action = "stop"
    for name in ("checkpoint-2", "checkpoint-10"):  # checkpoint-10: an earlier run's, in the same output_dir
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING):
        guard._log_event(SimpleNamespace(output_dir=str(tmp_path), report_to=None), TrainerState(), None)
    assert "RKSP guard: after the stop, resume from the last good checkpoint" in caplog.text
    assert f"(not resume_from_checkpoint=True: it would take {tmp_path / 'checkpoint-10'}" in caplog.text
