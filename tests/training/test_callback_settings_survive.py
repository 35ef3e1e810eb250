"""`RKSPCallback`'s settings do what they say and survive a checkpoint: every constructor argument comes back from
`state()` with its value, `save_artifacts=False` writes no profile files, the initial score is the profile's M≈1 score,
and a resume from checkpoint-1 without the callback's state does not re-profile trained weights as an
initialisation."""

from __future__ import annotations

import inspect
import os

from conftest import TokenDataset, cpu_training_args, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_koopman.training import RKSPCallback

ARTIFACTS = ("rksp_profile.json", "rksp_profile.png", "rksp_report.md")

# a value other than the default for every argument that state() carries
NOT_DEFAULT = dict(profile_at_init=False, probe_batch_size=3, num_samples=300, rank=None, seed=5, layers="transformer.h",
                   every_n_steps=7, monitor_num_samples=64, guard=False, loss_threshold=40.0,
                   grad_norm_threshold=400.0, relative_loss_threshold=2.5, check_activations=False,
                   on_divergence="rollback", max_rollbacks=5,
                   lr_backoff=0.25, restore_on_stop=False, snapshot_every_n_steps=3, rollback_source="memory",
                   check_every_n_steps=2, auto_kss=True, save_artifacts=False)


def test_every_setting_comes_back_from_state_with_its_value():
    defaults = {k: p.default for k, p in inspect.signature(RKSPCallback).parameters.items()}
    changed = {k: v for k, v in NOT_DEFAULT.items() if v != defaults[k] or v is None}
    assert set(NOT_DEFAULT) | {"risk_estimator"} == set(RKSPCallback().state()["args"])  # every argument carried
    restored = RKSPCallback(**RKSPCallback(**NOT_DEFAULT).state()["args"])
    assert {k: restored.state()["args"][k] for k in NOT_DEFAULT} == NOT_DEFAULT
    assert len(changed) >= len(NOT_DEFAULT) - 1  # rank: None is the default and the only value left as it is


def test_save_artifacts_false_writes_no_profile_files(tmp_path):
    callback = RKSPCallback(num_samples=128, guard=False, save_artifacts=False)
    Trainer(model=tiny_gpt2(), args=cpu_training_args(tmp_path, TrainingArguments, max_steps=1, save_strategy="no"),
            train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.profile is not None  # it profiled ...
    assert not [name for name in ARTIFACTS if (tmp_path / name).exists()]  # ... and wrote nothing


def test_the_initial_score_is_the_profiles_score(tmp_path):
    callback = RKSPCallback(num_samples=128, guard=False, save_artifacts=False)
    Trainer(model=tiny_gpt2(), args=cpu_training_args(tmp_path, TrainingArguments, max_steps=1, save_strategy="no"),
            train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.init_score == callback.profile.score and callback.state()["attributes"]["init_score"] is not None
    assert callback.state()["attributes"]["init_score"] == callback.profile.score


def test_a_resume_from_checkpoint_1_without_the_callbacks_state_does_not_reprofile(tmp_path):
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, save_strategy="steps", save_steps=1)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
            callbacks=[RKSPCallback(num_samples=128, guard=False)]).train()
    before = (tmp_path / "rksp_profile.json").read_bytes(), os.stat(tmp_path / "rksp_profile.json").st_mtime_ns
    resumed = RKSPCallback(num_samples=128, guard=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=2, save_strategy="no", restore_callback_states_from_checkpoint=False)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(),
            callbacks=[resumed]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.profile is None  # trained weights are not profiled as an initialisation
    after = (tmp_path / "rksp_profile.json").read_bytes(), os.stat(tmp_path / "rksp_profile.json").st_mtime_ns
    assert after == before
