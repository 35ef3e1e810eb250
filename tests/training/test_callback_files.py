"""What the callback and its guard write into `output_dir`: whole files or none, paths that survive a change of spelling
(a symbolic link, another working directory), and a folder it cannot write into."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import TokenDataset, bad_batch_at, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from transformers import Trainer

from hf_koopman.training import RKSPCallback
from hf_koopman.training.safety_net import RECORD_NAME, SUSPECT_PREFIX


def test_a_resume_through_a_symbolic_link_keeps_the_last_good_checkpoint(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model, data = bad_batch_at(4)  # trips at step 4: checkpoint-2 is the last good one, checkpoint-3 suspect
    first = _guard()
    Trainer(model=model, args=_args(tmp_path / "link", learning_rate=1e-3), train_dataset=data,
            callbacks=[first]).train()
    assert first.last_good_checkpoint == str(tmp_path / "link" / "checkpoint-2")
    model, data = bad_batch_at(3)  # resumed from checkpoint-2 through the real path: trips at step 3
    resumed = _guard()
    Trainer(model=model, args=_args(real, learning_rate=1e-3), train_dataset=data,
            callbacks=[resumed]).train(resume_from_checkpoint=True)
    assert resumed.divergence is not None and resumed.divergence["step"] == 3
    assert (real / "checkpoint-2").is_dir()  # the last good checkpoint, not set aside as the resumed suspect
    assert "deleted since" not in resumed._checkpoint_on_disk()


@pytest.mark.parametrize("carry", [shutil.move, shutil.copytree])
def test_a_run_folder_moved_or_copied_before_the_resume_keeps_its_last_good_checkpoint(tmp_path, carry):
    old, new = tmp_path / "scratch" / "run", tmp_path / "shared" / "run"
    model, data = bad_batch_at(4)  # trips at step 4: checkpoint-2 is the last good one, checkpoint-3 suspect
    first = _guard()
    Trainer(model=model, args=_args(old, learning_rate=1e-3), train_dataset=data, callbacks=[first]).train()
    assert first.last_good_checkpoint == str(old / "checkpoint-2")
    new.parent.mkdir()
    carry(old, new)  # e.g. from a preempted node's scratch disk to shared storage
    model, data = bad_batch_at(3)  # resumed from checkpoint-2 in its new place: trips at step 3
    resumed = _guard()
    Trainer(model=model, args=_args(new, learning_rate=1e-3), train_dataset=data,
            callbacks=[resumed]).train(resume_from_checkpoint=True)
    assert resumed.divergence is not None and resumed.divergence["step"] == 3
    # the good checkpoint in its new place, not set aside as the resumed suspect, nor advised as deleted
    assert resumed.last_good_checkpoint == str(new / "checkpoint-2") and (new / "checkpoint-2").is_dir()
    assert "deleted since" not in resumed._checkpoint_on_disk()
    record = json.loads((new / RECORD_NAME).read_text())
    assert record["last_good_checkpoint"] == str(new / "checkpoint-2") and record["last_good_checkpoint_on_disk"]


def test_another_runs_checkpoint_of_the_same_name_is_never_taken_for_a_rotated_last_good_one(tmp_path):
    a, b = tmp_path / "runA", tmp_path / "runB"
    Trainer(model=tiny_gpt2(seed=1), args=_args(b, max_steps=3), train_dataset=TokenDataset(n=64)).train()  # diverges
    model, data = bad_batch_at(None)  # run A: rotation (save_total_limit=1) removes its validated checkpoint-2
    Trainer(model=model, args=_args(a, learning_rate=1e-3, max_steps=3, save_total_limit=1), train_dataset=data,
            callbacks=[_guard()]).train()
    assert not (a / "checkpoint-2").exists() and (b / "checkpoint-2").is_dir()
    model, data = bad_batch_at(4)  # run A continued in B's folder: trips at step 4
    resumed = _guard()
    Trainer(model=model, args=_args(b, learning_rate=1e-3), train_dataset=data,
            callbacks=[resumed]).train(resume_from_checkpoint=str(a / "checkpoint-3"))
    assert resumed.divergence is not None and resumed.divergence["step"] == 4
    assert resumed.last_good_checkpoint == str(a / "checkpoint-2")  # not run B's diverged checkpoint-2
    assert "deleted since" in resumed._checkpoint_on_disk()


def test_every_process_takes_a_copied_last_good_checkpoint_whether_or_not_it_sees_the_copy(tmp_path, monkeypatch):
    import torch
    from transformers import TrainerState

    from hf_koopman.training import safety_net

    old, new = tmp_path / "scratch" / "run", tmp_path / "shared" / "run"
    model, data = bad_batch_at(4)
    Trainer(model=model, args=_args(old, learning_rate=1e-3), train_dataset=data, callbacks=[_guard()]).train()
    new.parent.mkdir()
    shutil.copytree(old, new)
    state = TrainerState.load_from_json(str(new / "checkpoint-2" / "trainer_state.json"))
    monkeypatch.setattr(safety_net, "is_distributed", lambda: True)
    monkeypatch.setattr(safety_net, "reduce_max", lambda t: torch.tensor([2.0]))  # another process saw the copy
    (new / "checkpoint-2" / "trainer_state.json").unlink()  # this process has no copy of the folder
    guard = _guard()
    guard.last_good_checkpoint = str(old / "checkpoint-2")  # from the record or the stored guard state
    guard._hold_resumed_checkpoint(guard_args(new), state, recorded_suspect=False)
    assert guard.last_good_checkpoint == str(new / "checkpoint-2") and guard._pending_checkpoints == []


def test_the_record_is_written_at_the_event_not_only_when_training_ends(tmp_path):
    from transformers import TrainerCallback

    class Preempted(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise RuntimeError("preempted")

    model, data = bad_batch_at(4)
    guard = _guard(on_divergence="rollback")
    with pytest.raises(RuntimeError, match="preempted"):  # killed after the rollback, before train() ends
        Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=data,
                callbacks=[guard, Preempted()]).train()
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert [(e["step"], e["action"]) for e in record["events"]] == [(4, "rollback")]


def test_a_stop_on_the_last_step_of_an_epoch_writes_no_epoch_checkpoint(tmp_path):
    model, data = bad_batch_at(16)  # 64 rows, 4 per step: step 16 ends epoch 1, and trips
    guard = _guard()  # stop
    Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3, max_steps=-1, num_train_epochs=2,
                                    save_strategy="epoch"), train_dataset=data, callbacks=[guard]).train()
    assert guard.divergence is not None and guard.divergence["step"] == 16
    # the epoch-end save after the stopping step is cancelled: no diverged checkpoint to push, none to set aside
    assert not [p.name for p in tmp_path.iterdir() if "checkpoint-16" in p.name]


def test_the_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    guard = _guard(on_divergence="rollback")
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(n=128),
            callbacks=[guard]).train()
    record = tmp_path / RECORD_NAME
    before = record.read_text()
    original = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        if self.name.endswith(".partial"):
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    guard.events.append(dict(guard.events[-1], step=99))
    with pytest.raises(OSError):
        guard._write_record(guard_args(tmp_path), SimpleState())
    assert record.read_text() == before and json.loads(before)["events"]  # the earlier record, intact


class SimpleState:
    is_world_process_zero = True


def guard_args(output_dir):
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(output_dir))


def test_profile_files_that_cannot_be_written_are_a_warning_and_leave_no_half_files(tmp_path, monkeypatch, caplog):
    callback = RKSPCallback(num_samples=128, guard=False)
    args = _args(tmp_path, max_steps=1, learning_rate=1e-3, save_strategy="no")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    earlier = {name: (tmp_path / name).read_bytes() for name in ("rksp_profile.json", "rksp_report.md")}
    original = Path.write_text

    def full_disk_at_the_report(self, *a, **kw):
        if self.name == "rksp_report.md":
            raise OSError(28, "No space left on device")
        return original(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full_disk_at_the_report)
    again = RKSPCallback(num_samples=128, guard=False)
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        Trainer(model=tiny_gpt2(n_embd=48), args=args, train_dataset=TokenDataset(), callbacks=[again]).train()
    assert "could not write the profile files" in caplog.text and "save_artifacts=False" in caplog.text
    # all or nothing: the earlier run's files are as they were, not a new JSON beside an old report
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("_rksp-staging-", "_rksp_guard"))]


def test_profile_files_that_cannot_all_be_moved_into_place_leave_the_earlier_ones(tmp_path, monkeypatch, caplog):
    callback = RKSPCallback(num_samples=128, guard=False)
    args = _args(tmp_path, max_steps=1, learning_rate=1e-3, save_strategy="no")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    names = [name for name in ("rksp_profile.json", "rksp_profile.png", "rksp_report.md") if (tmp_path / name).exists()]
    earlier = {name: (tmp_path / name).read_bytes() for name in names}
    real, moved = os.replace, []

    def replace(src, dst):  # the first new file moves into place, the second cannot (a full disk, a quota)
        if os.path.dirname(os.fspath(dst)) == os.fspath(tmp_path):
            moved.append(dst)
            if len(moved) == 2:
                raise OSError(122, "Disk quota exceeded")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        Trainer(model=tiny_gpt2(n_embd=48), args=args, train_dataset=TokenDataset(),
                callbacks=[RKSPCallback(num_samples=128, guard=False)]).train()
    monkeypatch.undo()
    assert "could not write the profile files" in caplog.text
    assert {name: (tmp_path / name).read_bytes() for name in names} == earlier  # not a new JSON beside an old report
    assert not [p for p in os.listdir(tmp_path) if p.startswith("_rksp-staging-")]


def test_a_new_run_says_it_replaces_the_earlier_runs_profile_files(tmp_path, caplog):
    args = _args(tmp_path, max_steps=1, learning_rate=1e-3, save_strategy="no")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
            callbacks=[RKSPCallback(num_samples=128, guard=False)]).train()
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
                callbacks=[RKSPCallback(num_samples=128, guard=False)]).train()
    assert "held an earlier run's rksp_profile.json" in caplog.text
